"""The options of one call, as every loss's autograd functions and backends see them: one frozen object
instead of a dozen positional arguments (and ``(None,) * 13`` at the end of a backward)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PassOptions:
    """How the per-token work of one call runs.

    backend:         ``"torch"`` or ``"triton"`` (resolved).
    memory:          ``"fast"`` or ``"low"`` (what each backend does with it is documented by each loss).
    chunk_size:      rows per chunk, or None for the backend's budget.
    temperature:     logits are divided by it.
    divergence:      ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"`` (distillation losses; ``"jsd"`` reaches a
                     backend only with ``0 < beta < 1``: the ends are mapped to the KLs by the loss).
    beta:            the generalized JSD's weight: ``M = (1 - beta) p_s + beta p_t``,
                     ``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M)`` (only for ``"jsd"``).
    student_softcap: ``cap tanh(x / cap)`` of the student's raw logits before ``1/tau``, or None.
    teacher_softcap: the same for the teacher (dense teacher only), or None.
    with_entropy:    also the entropy (log-prob losses).
    impl:            ``"default"`` or ``"dual_gemm"`` (the dense KL's experimental dual-GEMM single pass; set by
                     ``fused_sod_loss`` only where that pass supports the call).
    """

    backend: str = "torch"
    memory: str = "fast"
    chunk_size: int | None = None
    temperature: float = 1.0
    divergence: str = "reverse_kl"
    beta: float = 0.5
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    with_entropy: bool = False
    impl: str = "default"

    def softcaps(self) -> dict:
        """The soft-cap keywords that are set (backends take them as keyword arguments)."""
        return {k: v for k, v in (("student_softcap", self.student_softcap),
                                  ("teacher_softcap", self.teacher_softcap)) if v is not None}


@dataclass(frozen=True)
class SinglePassPlan:
    """What a single pass needs besides the tensors: the row chunks, the weight function
    ``chunk_weights(start, stop, D, signal) -> w`` of a chunk's rows, ``coef``, the normalizer and whether
    the weights use the sampled signal ``|logp_s(y) - logp_t(y)|`` instead of ``D``.  ``hard_loss_weight``
    (``lambda >= 0``) adds ``lambda * sum_rows (-logp_s(y)) / normalizer`` (the hard-label cross-entropy of the
    rows' ``target_ids``, unweighted by the step weights and not multiplied by ``coef``) to the loss and its
    gradient ``lambda / normalizer * (p_s - onehot(y)) / tau`` (times the soft-cap slope) to d(logits)."""

    chunks: list[tuple[int, int]]
    chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor]
    coef: float
    normalizer: float
    sampled_signal: bool = False
    hard_loss_weight: float = 0.0


def input_grads(ctx, grads: tuple) -> tuple:
    """``grads`` for the leading inputs of an autograd function's forward, then None for the rest."""
    return tuple(grads) + (None,) * (len(ctx.needs_input_grad) - len(grads))


@dataclass
class SinglePassResult:
    """What a backend's single-pass chunk routine returns (read by
    :func:`sod_kernels.core.runtime.single_pass_outputs`): the loss (0-D, float32, or float64 where the backend
    computes in float64; the hard-label term included), the per-row soft divergence ``D`` and sampled-token
    log-probs ``logp_s(y)``, ``logp_t(y)`` (``[Na]``; the latter two None without targets), and the student's
    gradients ``(d_hidden, d_weight, d_bias)`` for an upstream gradient of 1 (None where not needed)."""

    loss: torch.Tensor
    D: torch.Tensor
    lp_s: torch.Tensor | None
    lp_t: torch.Tensor | None
    grads: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
