"""Thin ``nn.Module`` wrappers around the functional API."""

from __future__ import annotations

import torch

from .dense.loss import fused_sod_loss


class SODLoss(torch.nn.Module):
    """``SODLoss(**options)(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask, ...)``.

    ``options`` are any keyword arguments of :func:`sod_kernels.fused_sod_loss` (divergence,
    step_divergence, epsilon, delta, temperature, coef, reduction, return_stats, backend, ...); keywords
    given to ``forward`` override them for that call.
    """

    def __init__(self, **options):
        super().__init__()
        # Validate the option names now, not at the first forward.
        allowed = set(fused_sod_loss.__kwdefaults__)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"SODLoss got unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        self.options = dict(options)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask=None, **kwargs):
        return fused_sod_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask,
                              **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
