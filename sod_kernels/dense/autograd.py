"""The differentiable per-token divergence, shared by every backend.

``TokenDivergence.apply`` computes, for the distilled rows ``row_index`` only, the vocabulary-wide
divergence ``D`` between student and teacher (docs/math.md) and returns it as a tensor that carries a
gradient to the student's hidden states, weight and bias.  Everything downstream (step weights,
reductions, ``coef``) is ordinary O(tokens) PyTorch, so autograd hands the backend exactly
``dL/dD_i`` per row, and the backend folds it into each recomputed logit tile.

A backend is a module with two functions (see :mod:`sod_kernels.chunked_torch` for the contract):
``divergence_forward(...) -> (D, lse_s, lse_t, logp_s_y, logp_t_y)`` and
``divergence_backward(..., grad_divergence) -> (d_hidden, d_weight, d_bias)``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import chunked_torch
from ._validation import check_positive


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors, ``"torch"`` otherwise; checks that Triton can run."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before sod_kernels "
                         f"is imported to run the kernels on {device.type} tensors; use backend='torch' or 'auto'")
    return backend


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``: the losses compute in their inputs' dtypes with
    float32 statistics whatever the caller's autocast state (forward and backward alike)."""
    kind = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return torch.autocast(device_type=kind, enabled=False)


def refuse_double_backward(what: str) -> None:
    """Called first in every backward: with ``create_graph=True`` autograd runs backward with grad mode on,
    and these gradients are not themselves differentiable, so refuse instead of returning a gradient that
    silently drops out of a second-order computation (docs/math.md)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} supports first-order gradients only: double backward (create_graph=True, "
                           "Hessian-vector products) is not supported")


def check_softcap(value, name: str) -> float | None:
    """A logit soft-cap: None, or a finite number > 0 (returned as a float)."""
    return None if value is None else check_positive(value, name)


def single_pass_outputs(ctx, res) -> tuple:
    """The forward's outputs of a single-pass distillation loss: keeps ``res.grads`` for the backward and
    returns ``(loss, D, logp_student(y), logp_teacher(y))``, the last three non-differentiable (empty sampled
    log-probs where the loss did not form them)."""
    ctx.grads = res.grads
    lp_s = res.lp_s if res.lp_s is not None else res.D.new_empty(0)
    lp_t = res.lp_t if res.lp_t is not None else res.D.new_empty(0)
    ctx.mark_non_differentiable(res.D, lp_s, lp_t)
    return res.loss, res.D, lp_s, lp_t


def single_pass_gradients(ctx, grad_loss: torch.Tensor, what: str, recompute_hint: str) -> tuple:
    """The backward of a single-pass loss: the student gradients its forward formed for an upstream gradient
    of 1 (``ctx.grads``), scaled by the real upstream gradient; usable once (the forward's buffers are
    released), with a clear error on a second backward naming ``what`` and ``recompute_hint``."""
    refuse_double_backward(what)
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(f"{what}'s single-pass gradients were already used: call backward once per forward "
                           f"(retain_graph is not supported by the single pass; {recompute_hint})")
    if torch.equal(grad_loss, grad_loss.new_ones(())):
        return grads
    return tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)


def backend_module(name: str) -> ModuleType:
    if name == "torch":
        return chunked_torch
    from . import triton_divergence  # imported lazily: Triton is only needed for this path
    return triton_divergence


def zero_student_grads(hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Gradients when no row is computed (or no upstream gradient): exact zeros where needed, else None."""
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if (need_bias and bias is not None) else None)


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
