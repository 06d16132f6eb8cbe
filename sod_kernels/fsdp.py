"""FSDP2 (``torch.distributed.fsdp.fully_shard``) helpers for the fused losses: docs/scaling.md.

The fused losses read the lm_head's weight instead of calling the head module, so FSDP2 never runs the
forward hooks that all-gather the weight, re-gather it for the backward and reduce-scatter its gradient.
Outside a forward pass of the unit that owns it, a sharded parameter is a ``DTensor`` holding this rank's
rows.

- :func:`fsdp_forward` runs a function as a forward pass of an FSDP2 unit, so the unit's parameters are full
  tensors inside it and their gradients are reduced by FSDP as after ``module.forward``.
- :func:`full_weight` is a frozen (teacher) parameter's full value as a plain tensor that stays valid until
  the loss's backward (the fused losses keep the teacher weight to recompute the teacher's logits there, and
  FSDP2 frees a unit's gathered parameters when it reshards).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TypeVar

import torch

_METHOD = "_sod_kernels_forward"
R = TypeVar("R")


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
    except ImportError as exc:  # torch < 2.6: FSDP2 is not public
        raise ImportError("sod_kernels.fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from exc
    return FSDPModule, register_fsdp_forward_method


def _call(self, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def fsdp_forward(module: torch.nn.Module, fn: Callable[..., R], *args, **kwargs) -> R:
    """``fn(module, *args, **kwargs)`` run as a forward pass of ``module``.

    For an FSDP2 unit (a module passed to ``fully_shard``): its parameters are all-gathered before ``fn`` runs
    (read them from the ``module`` that ``fn`` receives, not before the call: outside, they are sharded
    DTensors), resharded after it according to the unit's ``reshard_after_forward``, gathered again for the
    backward of what ``fn`` returns, and their gradients are reduce-scattered as FSDP does for
    ``module.forward``.  Under a mixed-precision policy with ``cast_forward_inputs``, floating-point tensors in
    ``args`` / ``kwargs`` are cast like forward inputs.  For any other module: plain ``fn(module, ...)``.

    Example (the student's head in its own unit)::

        hidden = model(input_ids)                         # the body; FSDP gathers and frees its units
        loss = fsdp_forward(model.lm_head, lambda head: fused_sod_loss(
            hidden, head.weight, teacher_hidden, full_weight(teacher.lm_head.weight), response_mask))
        loss.backward()                                   # d(head.weight) reduce-scattered by FSDP
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    fsdp_module, register = _fsdp()
    if not isinstance(module, fsdp_module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        return fn(module, *args, **kwargs)
    if _METHOD not in module.__dict__:
        setattr(module, _METHOD, types.MethodType(_call, module))
        register(module, _METHOD)
    return getattr(module, _METHOD)(fn, *args, **kwargs)


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """The full value of a parameter that receives no gradient (a frozen teacher's lm_head), detached.

    A ``DTensor`` (a sharded FSDP2 parameter outside its unit's forward) is all-gathered into a new plain
    tensor (a collective: every rank of its mesh must call it); a plain tensor (an unsharded parameter) is
    returned detached, without a copy.  Shape ``[V, H]`` for an lm_head weight.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no public DTensor, so nothing can be sharded this way
        DTensor = ()  # noqa: N806
    if isinstance(weight, DTensor):
        return weight.detach().full_tensor()
    return weight.detach()
