"""Runtime helpers every loss shares: backend resolution, autocast off, the first-order-only guard, the
soft-cap option, the single pass's backend module and saved gradients, and zero gradients for an empty batch."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .validation import check_positive


def env_switch(name: str) -> bool:
    """An on/off environment switch that defaults to on: unset, empty, ``1``/``on``/``true``/``yes`` -> True;
    ``0``/``off``/``false``/``no`` -> False; anything else is a ``ValueError`` naming the variable."""
    value = os.environ.get(name, "1").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("", "1", "on", "true", "yes"):
        return True
    raise ValueError(f"{name} must be 1/on or 0/off, got {os.environ.get(name)!r}")


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


def backend_module(name: str, package: str, torch_module: str = "torch_backend") -> ModuleType:
    """The module of a loss family's two-pass backend, by name: ``<package>.triton_backend`` for the Triton
    backend (imported lazily: Triton is only needed there), ``<package>.<torch_module>`` for the torch backend.
    ``package``: the family's package name (its ``__package__``)."""
    if name == "triton":
        return importlib.import_module(".triton_backend", package)
    return importlib.import_module(f".{torch_module}", package)


def single_pass_module(name: str, device: torch.device, package: str) -> ModuleType | None:
    """The module of a loss family's single pass, by name: ``<package>.triton_backend`` for the Triton backend
    (imported lazily: Triton is only needed there), ``<package>.cpu_backend`` for the torch backend on CPU
    tensors (whole-vocabulary rows, compiled epilogues), None for the torch backend on other devices (it runs
    two passes).  ``package``: the family's package name (its ``__package__``)."""
    if name == "triton":
        return importlib.import_module(".triton_backend", package)
    if name == "torch" and device.type == "cpu":
        return importlib.import_module(".cpu_backend", package)
    return None


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


def zero_student_grads(hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Gradients when no row is computed (or no upstream gradient): exact zeros where needed, else None."""
    return (torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if (need_bias and bias is not None) else None)


def needs_student_grad(hidden, weight, bias) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad))


def single_pass_forward(ctx, routine, problem, plan) -> tuple:
    """Run a backend's single-pass chunk routine for an autograd forward and return its outputs
    (:func:`single_pass_outputs`).  ``routine(problem, chunks, chunk_weights, *, coef, normalizer, need_hidden,
    need_weight, need_bias, sampled_signal[, hard_loss_weight])`` is the contract of every single pass
    (``hard_loss_weight`` is passed only when it is not 0) (for example
    :func:`sod_kernels.dense.triton_backend.single_pass_loss`); ``plan`` a
    :class:`~sod_kernels.core.options.SinglePassPlan`."""
    need = ctx.needs_input_grad
    extra = {"hard_loss_weight": plan.hard_loss_weight} if plan.hard_loss_weight else {}
    res = routine(problem, plan.chunks, plan.chunk_weights, coef=plan.coef, normalizer=plan.normalizer,
                  need_hidden=need[0], need_weight=need[1], need_bias=need[2], sampled_signal=plan.sampled_signal,
                  **extra)
    return single_pass_outputs(ctx, res)
