"""The differentiable per-token divergence, shared by every backend.

``TokenDivergence.apply`` computes, for the distilled rows ``row_index`` only, the vocabulary-wide
divergence ``D`` between student and teacher (docs/math.md) and returns it as a tensor that carries a
gradient to the student's hidden states, weight and bias.  Everything downstream (step weights,
reductions, ``coef``) is ordinary O(tokens) PyTorch, so autograd hands the backend exactly
``dL/dD_i`` per row, and the backend folds it into each recomputed logit tile.

A backend is a module with two functions (see :mod:`sod_kernels.dense.torch_backend` for the contract):
``divergence_forward(...) -> (D, lse_s, lse_t, logp_s_y, logp_t_y)`` and
``divergence_backward(..., grad_divergence) -> (d_hidden, d_weight, d_bias)``.

With ``target_ids`` the student's sampled log-prob ``logp_s(y)`` is differentiable too (a hard-label term,
``hard_loss_weight``, puts ``-logp_s(y)`` in the loss): its upstream gradient reaches the backend's
``divergence_backward`` as ``grad_target_logprob`` (with ``target_ids``), only when it is present, so a
backend without a hard-label term is never handed those keywords.  ``"jsd"`` adds ``beta=`` to both calls.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..core.options import PassOptions, input_grads
from ..core import runtime
from ..core.runtime import no_autocast, refuse_double_backward, zero_student_grads


def backend_module(name: str) -> ModuleType:
    """The two-pass backend ``name`` (``"torch"`` or ``"triton"``, the latter imported lazily)."""
    return runtime.backend_module(name, __package__)


class TokenDivergence(torch.autograd.Function):
    """``D[i]`` for the rows ``row_index`` (plus non-differentiable lse and sampled log-probs).

    Inputs: student_hidden ``[N, Hs]``, student_weight ``[Vs, Hs]``, student_bias ``[Vs]`` or None,
    teacher_hidden ``[N, Ht]``, teacher_weight ``[Vt, Ht]``, teacher_bias or None, row_index ``[Na]``
    int64, target_ids ``[N]`` int64 or None, and :class:`~sod_kernels.core.options.PassOptions` (divergence,
    temperature, backend; ``chunk_size`` / ``memory`` go to the Triton backend, the soft-caps to any backend).
    The backward is first-order only: differentiating the gradient again raises an error.
    Outputs (each ``[Na]``, float32 or float64): D, lse_student, lse_teacher, logp_student(y),
    logp_teacher(y) (the last two empty when target_ids is None).  D and logp_student(y) carry the student's
    gradient (the upstream gradients arrive as None where unused: ``set_materialize_grads(False)``).
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_index, target_ids, options: PassOptions):
        kwargs = _backend_kwargs(options)
        with no_autocast(student_hidden.device):
            outs = backend_module(options.backend).divergence_forward(
                student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                row_index, target_ids, divergence=options.divergence, temperature=options.temperature, **kwargs)
        D, lse_s, lse_t, lp_s, lp_t = outs[:5]
        if len(outs) > 5:  # the backend's per-row frame for its backward (Triton: maxima and centre)
            kwargs["frame"] = outs[5]
        if lp_s is None:
            lp_s, lp_t = D.new_empty(0), D.new_empty(0)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                              teacher_bias, row_index, lse_s, lse_t, D, target_ids)
        ctx.options, ctx.kwargs = options, kwargs
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse_s, lse_t, lp_t)
        if target_ids is None:
            ctx.mark_non_differentiable(lp_s)
        return D, lse_s, lse_t, lp_s, lp_t

    @staticmethod
    def backward(ctx, grad_D, grad_lse_s, grad_lse_t, grad_lp_s, grad_lp_t):
        refuse_double_backward("fused_sod_loss")
        sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D, target_ids = ctx.saved_tensors
        options: PassOptions = ctx.options
        kwargs = ctx.kwargs
        if grad_lp_s is not None and target_ids is not None:  # the hard-label term's upstream gradient
            kwargs = {**kwargs, "target_ids": target_ids, "grad_target_logprob": grad_lp_s.contiguous()}
            if grad_D is None:
                grad_D = torch.zeros_like(D)
        grads = student_grads(ctx, options, (sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D), grad_D, kwargs)
        return input_grads(ctx, grads)


def student_grads(ctx, options, saved: tuple, grad_D, kwargs: dict) -> tuple:
    """``(d_hidden, d_weight, d_bias)`` of ``sum_i grad_D[i] D[i]`` from the backend's ``divergence_backward``
    on the saved ``(sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D)`` (exact zeros without rows or upstream
    gradient); ``options`` holds ``backend``, ``divergence`` and ``temperature``, ``kwargs`` the backend's
    other keywords."""
    sh, sw, sb, row_index = saved[0], saved[1], saved[2], saved[6]
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if grad_D is None or row_index.numel() == 0:
        return zero_student_grads(sh, sw, sb, need_h, need_w, need_b)
    with no_autocast(sh.device):
        return backend_module(options.backend).divergence_backward(
            *saved, grad_D.contiguous(), divergence=options.divergence, temperature=options.temperature,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b, **kwargs)


def _backend_kwargs(options: PassOptions) -> dict:
    """The backend's keywords: ``chunk_size`` and ``memory`` for the Triton backend (the torch backend sizes its
    tiles itself), the soft-caps that are set for either, and ``beta`` for ``"jsd"`` only."""
    kwargs = {"chunk_size": options.chunk_size, "memory": options.memory} if options.backend == "triton" else {}
    kwargs.update(options.softcaps())
    if options.divergence == "jsd":
        kwargs["beta"] = options.beta
    return kwargs
