"""The differentiable per-token divergence, shared by every backend.

``TokenDivergence.apply`` computes, for the distilled rows ``row_index`` only, the vocabulary-wide
divergence ``D`` between student and teacher (docs/math.md) and returns it as a tensor that carries a
gradient to the student's hidden states, weight and bias.  Everything downstream (step weights,
reductions, ``coef``) is ordinary O(tokens) PyTorch, so autograd hands the backend exactly
``dL/dD_i`` per row, and the backend folds it into each recomputed logit tile.

A backend is a module with two functions (see :mod:`sod_kernels.dense.torch_backend` for the contract):
``divergence_forward(...) -> (D, lse_s, lse_t, logp_s_y, logp_t_y)`` and
``divergence_backward(..., grad_divergence) -> (d_hidden, d_weight, d_bias)``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..core.runtime import no_autocast, refuse_double_backward, zero_student_grads
from . import torch_backend


def backend_module(name: str) -> ModuleType:
    if name == "torch":
        return torch_backend
    from . import triton_backend  # imported lazily: Triton is only needed for this path
    return triton_backend


class TokenDivergence(torch.autograd.Function):
    """``D[i]`` for the rows ``row_index`` (plus non-differentiable lse and sampled log-probs).

    Inputs: student_hidden ``[N, Hs]``, student_weight ``[Vs, Hs]``, student_bias ``[Vs]`` or None,
    teacher_hidden ``[N, Ht]``, teacher_weight ``[Vt, Ht]``, teacher_bias or None, row_index ``[Na]``
    int64, target_ids ``[N]`` int64 or None, divergence name, temperature, backend name, backend options
    (a dict: ``chunk_size`` / ``memory`` for the Triton backend; ``student_softcap`` / ``teacher_softcap``
    for any backend, passed to its forward and backward).
    The backward is first-order only: differentiating the gradient again raises an error.
    Outputs (each ``[Na]``, float32 or float64): D, lse_student, lse_teacher, logp_student(y),
    logp_teacher(y) (the last two empty when target_ids is None).
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_index, target_ids, divergence, temperature, backend, options=None):
        ops = backend_module(backend)
        options = dict(options or {})
        with no_autocast(student_hidden.device):
            outs = ops.divergence_forward(
                student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_index, target_ids, divergence=divergence, temperature=temperature, **options)
        D, lse_s, lse_t, lp_s, lp_t = outs[:5]
        if len(outs) > 5:  # the backend's per-row frame for its backward (Triton: maxima and centre)
            options["frame"] = outs[5]
        if lp_s is None:
            lp_s, lp_t = D.new_empty(0), D.new_empty(0)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, row_index, lse_s, lse_t, D)
        ctx.options = (divergence, temperature, backend, options)
        ctx.mark_non_differentiable(lse_s, lse_t, lp_s, lp_t)
        return D, lse_s, lse_t, lp_s, lp_t

    @staticmethod
    def backward(ctx, grad_D, *unused):
        refuse_double_backward("fused_sod_loss")
        sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D = ctx.saved_tensors
        divergence, temperature, backend, options = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if grad_D is None or row_index.numel() == 0:
            dh, dw, db = zero_student_grads(sh, sw, sb, need_h, need_w, need_b)
        else:
            with no_autocast(sh.device):
                dh, dw, db = backend_module(backend).divergence_backward(
                    sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D, grad_D.contiguous(),
                    divergence=divergence, temperature=temperature, need_hidden=need_h, need_weight=need_w,
                    need_bias=need_b, **options)
        return dh, dw, db, None, None, None, None, None, None, None, None, None
