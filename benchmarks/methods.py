"""The methods the benchmark compares, each turned into a callable that runs one iteration.

- ``naive``: materialize both logit matrices, ``log_softmax``, the per-token reverse KL, the same SOD step
  weights (:func:`sod_kernels.step_weights_from_divergence`), the token-mean weighted loss, ``.backward()``.
- ``naive_compiled``: the same function under ``torch.compile``.
- ``liger`` / ``liger_compiled``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` with ``beta=1`` (reverse KL),
  ``weight_hard_loss=0, weight_soft_loss=1``, ``compiled=False`` / ``True``.  Liger has no step weights:
  it computes the *unweighted* token-mean reverse KL, which is the same work minus the O(N) weighting.
  Its chunked loss is written in PyTorch (``torch.func.grad_and_value`` per chunk of 1024 rows, optionally
  ``torch.compile``-d), so it runs on CPU tensors too.  It forms the student gradients inside its forward
  pass; its "fwd" time therefore already contains the gradient work.
- ``sod_triton``: ``sod_kernels.fused_sod_loss(..., backend="triton")`` (CUDA only).
- ``sod_torch``: ``sod_kernels.fused_sod_loss(..., backend="torch")`` (the chunked PyTorch backend).

Modes: ``fwd`` computes the loss with gradients enabled (as the forward of a training step: whatever a
method saves for its backward counts) and drops it; ``fwd_bwd`` also calls ``.backward()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .floors import check_mode
from .inputs import BenchInputs

METHODS = ("naive", "naive_compiled", "liger", "liger_compiled", "sod_triton", "sod_torch")
LIGER_IGNORE_INDEX = -100
LIGER_REVERSE_KL_BETA = 1.0     # Liger's generalized JSD at beta=1 is KL(student || teacher)
NAIVE_FOOTPRINT_COPIES = 5      # float32 N x V buffers the naive fwd+bwd holds at its peak (measured ~5)
WEIGHTED_LOSS = "step-weighted token-mean reverse KL (SOD)"
UNWEIGHTED_LOSS = "unweighted token-mean reverse KL (Liger has no step weights)"


@dataclass(frozen=True)
class MethodInfo:
    """Static facts about a method: what loss it computes and whether it is compiled."""

    name: str
    loss_kind: str
    compiled: bool
    description: str


METHOD_INFO = {
    "naive": MethodInfo("naive", WEIGHTED_LOSS, False, "materialized logits, log_softmax, KL, autograd"),
    "naive_compiled": MethodInfo("naive_compiled", WEIGHTED_LOSS, True, "naive under torch.compile"),
    "liger": MethodInfo("liger", UNWEIGHTED_LOSS, False, "LigerFusedLinearJSDLoss(beta=1, compiled=False)"),
    "liger_compiled": MethodInfo("liger_compiled", UNWEIGHTED_LOSS, True,
                                 "LigerFusedLinearJSDLoss(beta=1, compiled=True)"),
    "sod_triton": MethodInfo("sod_triton", WEIGHTED_LOSS, False, "fused_sod_loss(backend='triton')"),
    "sod_torch": MethodInfo("sod_torch", WEIGHTED_LOSS, False, "fused_sod_loss(backend='torch'), chunked PyTorch"),
}


def check_method(name: str) -> str:
    """Return ``name`` if it is a known method, else raise ``ValueError``."""
    if name not in METHOD_INFO:
        raise ValueError(f"method must be one of {METHODS}, got {name!r}")
    return name


def liger_installed() -> bool:
    """Whether liger-kernel can be imported (it is optional: GPU machines start without it)."""
    return importlib.util.find_spec("liger_kernel") is not None


def method_unavailable_reason(name: str, device: str) -> str | None:
    """None if ``name`` can run on ``device``, else a short reason ("not installed", "needs CUDA", ...)."""
    check_method(name)
    if name.startswith("liger") and not liger_installed():
        return "liger-kernel not installed"
    if name == "sod_triton":
        if not device.startswith("cuda"):
            return "Triton backend needs a CUDA device"
        if importlib.util.find_spec("sod_kernels.dense.triton_backend") is None:
            return "sod_kernels.dense.triton_backend not present"
    return None


def predicted_extra_bytes(name: str, tokens: int, vocab: int) -> int | None:
    """Predicted peak extra memory where it is dominated by N x V buffers (naive methods), else None."""
    if name.startswith("naive"):
        return NAIVE_FOOTPRINT_COPIES * tokens * vocab * torch.finfo(torch.float32).bits // 8
    return None


def naive_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """docs/math.md's loss the obvious way: full ``[N, V]`` logits, float32 log-softmaxes, reverse KL, SOD weights.

    ``student_hidden [N, Hs]``, ``student_weight [V, Hs]``, ``teacher_hidden [N, Ht]``,
    ``teacher_weight [V', Ht]`` (``V' >= V``), ``step_ids [1, N]``.  Returns the token-mean loss.
    """
    from sod_kernels import step_weights_from_divergence

    vocab = student_weight.shape[0]
    logp_s = torch.log_softmax((student_hidden @ student_weight.T).float(), dim=-1)
    with torch.no_grad():
        logp_t = torch.log_softmax((teacher_hidden @ teacher_weight[:vocab].T).float(), dim=-1)
    divergence = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    weights = step_weights_from_divergence(divergence.detach().unsqueeze(0), step_ids).token_weights[0]
    distilled = (step_ids[0] >= 0).sum().clamp(min=1)
    return (weights * divergence).sum() / distilled


def _loss_fn(name: str, inputs: BenchInputs) -> Callable[[], torch.Tensor]:
    """A zero-argument function computing the method's loss on ``inputs``."""
    x = inputs
    if name in ("naive", "naive_compiled"):
        fn = torch.compile(naive_sod_loss) if name == "naive_compiled" else naive_sod_loss
        return lambda: fn(x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, x.step_ids)
    if name in ("liger", "liger_compiled"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=LIGER_REVERSE_KL_BETA,
                                         ignore_index=LIGER_IGNORE_INDEX, compiled=name == "liger_compiled")
        labels = torch.where(x.step_ids[0] >= 0, x.target_ids, torch.full_like(x.target_ids, LIGER_IGNORE_INDEX))
        return lambda: module(x.student_hidden, x.student_weight, x.teacher_hidden, x.teacher_weight, labels)
    from sod_kernels import fused_sod_loss

    backend = "triton" if name == "sod_triton" else "torch"
    return lambda: fused_sod_loss(x.student_hidden.unsqueeze(0), x.student_weight, x.teacher_hidden.unsqueeze(0),
                                  x.teacher_weight, step_ids=x.step_ids, backend=backend)


def make_step(name: str, inputs: BenchInputs, mode: str) -> Callable[[], torch.Tensor]:
    """One iteration of ``name`` in ``mode`` (``fwd`` or ``fwd_bwd``); returns the detached loss."""
    check_method(name)
    check_mode(mode)
    loss_fn = _loss_fn(name, inputs)

    def step() -> torch.Tensor:
        loss = loss_fn()
        if mode == "fwd_bwd":
            loss.backward()
        return loss.detach()

    return step
