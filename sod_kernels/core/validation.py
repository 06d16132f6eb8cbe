"""Input checks shared by every public entry point (docs/math.md).

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape or value)
with a message that names the argument and says what was expected.  Checks that need to look at tensor
values (a mask that is not 0/1, step ids that skip a number) cost one host synchronisation each; the
public functions take ``check_inputs=False`` for callers that have already validated their data.
"""

from __future__ import annotations

import math
import numbers

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
STEP_DIVERGENCES = ("kl", "sampled", "none")
REDUCTIONS = ("token_mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
MEMORY_MODES = ("fast", "low")


def _require_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        kind = type(x).__module__ + "." + type(x).__name__ if type(x).__module__ != "builtins" else type(x).__name__
        raise TypeError(f"{name} must be a torch.Tensor, got {kind} (convert it with torch.as_tensor)")


def check_tensor(x, name: str, *, ndim: tuple[int, ...] | None = None, floating: bool | None = None,
                 integer: bool | None = None, signed: bool = False) -> torch.Tensor:
    """Check that ``x`` is a tensor with one of the allowed ranks and the right kind of dtype.

    ``integer=True`` accepts any integer dtype; with ``signed=True`` as well, only signed ones (int8..int64),
    for tensors that use -1 as a marker (an unsigned dtype would wrap it to its largest value).
    """
    _require_tensor(x, name)
    if ndim is not None and x.dim() not in ndim:
        want = " or ".join(f"{d}-D" for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating is True and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    not_integer = x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool
    if integer is True and signed and (not_integer or not x.dtype.is_signed):
        raise TypeError(f"{name} must have a signed integer dtype (int8, int16, int32 or int64: -1 is a marker "
                        f"value that an unsigned dtype cannot hold), got dtype {x.dtype}")
    if integer is True and not_integer:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given (non-None) tensors must live on one device; a non-tensor is a ``TypeError`` naming it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    for key, value in present.items():
        _require_tensor(value, key)
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on the same device, got {where}")


def check_shape(x: torch.Tensor, name: str, shape: tuple[int, ...], what: str) -> None:
    _require_tensor(x, name)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_number(value) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive(value, name: str, *, allow_zero: bool = False) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = (value < 0) if allow_zero else (value <= 0)
    if not math.isfinite(value) or bad:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def check_finite_number(value, name: str) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_beta(value, name: str = "beta") -> float:
    """The generalized JSD's mixing weight: a finite number in ``[0, 1]``."""
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value}")
    return value


def resolve_divergence(divergence: str, beta) -> tuple[str, float]:
    """``(divergence, beta)`` as the backends see them: ``"jsd"`` with ``beta = 0`` is the forward KL and with
    ``beta = 1`` the reverse KL (exactly those, as in TRL's GKD; the mixture formula itself would give 0 there);
    ``beta`` is checked (``[0, 1]``) for every divergence and only used by ``"jsd"``."""
    check_choice(divergence, "divergence", DIVERGENCES)
    beta = check_beta(beta)
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl", beta
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl", beta
    return divergence, beta


def check_binary_mask(mask: torch.Tensor, name: str = "response_mask", *, check_values: bool = True) -> None:
    """``mask`` must be bool, integer or floating with every entry 0 or 1."""
    check_tensor(mask, name)
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got dtype {mask.dtype}")
    if check_values and mask.dtype != torch.bool and mask.numel() > 0:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must contain only 0 and 1")


def check_step_ids_values(step_ids: torch.Tensor, name: str = "step_ids") -> None:
    """Step ids of each row: -1 (not distilled) or a 0-based step index; the indices of a row never
    decrease, start at 0 and never skip a number (so every index names a non-empty set of tokens)."""
    check_tensor(step_ids, name, integer=True, signed=True)
    if step_ids.numel() == 0:
        return
    if bool((step_ids < -1).any()):
        raise ValueError(f"{name} must be -1 (not distilled) or a step index >= 0; found values below -1")
    # Running maximum of the ids seen strictly before each position (-1 before the first step).
    seen = torch.cummax(step_ids, dim=-1).values
    before = torch.cat([torch.full_like(seen[..., :1], -1), seen[..., :-1]], dim=-1)
    valid = step_ids >= 0
    if bool((valid & (step_ids < before)).any()):
        raise ValueError(f"{name} must never decrease along a row (ignoring -1 entries)")
    if bool((valid & (step_ids > before + 1)).any()):
        raise ValueError(f"{name} must start at 0 in each row and never skip a step index")


def check_chunk_size(chunk_size) -> None:
    """``chunk_size``: None or a positive int (rows per chunk)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, hidden_name: str,
                  weight_name: str, bias_name: str) -> None:
    """An LM head's inputs: ``hidden [..., H]`` floating (2-D or 3-D), ``weight [V, H]`` of the same dtype
    with ``V >= 1`` and ``H >= 1``, ``bias [V]`` floating or None.  No host synchronisation."""
    check_tensor(hidden, hidden_name, ndim=(2, 3), floating=True)
    check_tensor(weight, weight_name, ndim=(2,), floating=True)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{hidden_name}'s last dimension ({hidden.shape[-1]}) must equal the hidden size of "
                         f"{weight_name} [V, H] ({weight.shape[1]})")
    if weight.shape[1] == 0:
        raise ValueError(f"{weight_name} and {hidden_name} must have a hidden size H >= 1, got {weight_name} of "
                         f"shape {tuple(weight.shape)} and {hidden_name} of shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have at least one vocabulary row, got shape {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have one dtype")
    if bias is not None:
        check_tensor(bias, bias_name, ndim=(1,), floating=True)
        check_shape(bias, bias_name, (weight.shape[0],), f"one entry per row of {weight_name}")


def check_model_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                     teacher_bias) -> tuple[int, ...]:
    """Both models' hidden states and lm_heads (:func:`check_lm_head`), with one leading shape
    ``[B, T]`` or ``[T]``; returns that leading shape."""
    for who, h, w, b in (("student", student_hidden, student_weight, student_bias),
                         ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        check_lm_head(h, w, b, hidden_name=f"{who}_hidden", weight_name=f"{who}_weight", bias_name=f"{who}_bias")
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden's leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {lead}")
    return lead

