"""Non-finite values at the library's edges: masked positions never influence a result, and a NaN or Inf
where a mask reads a value is an error naming the argument."""

from __future__ import annotations

import torch


def masked_finite(x, mask, name: str, *, check: bool = True, where: str = "response_mask"):
    """``x`` with ``0`` wherever ``mask`` is 0 (``torch.where``: a NaN or Inf there never reaches a result).

    With ``check``, a ``ValueError`` naming ``name`` when a position where ``mask != 0`` holds NaN or +-Inf
    (one host sync). Anything that is not two tensors of one shape is returned unchanged, for the caller's
    own type and shape checks to report.
    """
    if not (isinstance(x, torch.Tensor) and isinstance(mask, torch.Tensor)) or x.shape != mask.shape \
            or not x.is_floating_point():
        return x
    inside = mask != 0
    if check:
        check_finite(x, name, inside=inside, where=f"where {where} is 1")
    return torch.where(inside, x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_finite(x: torch.Tensor, name: str, *, inside: torch.Tensor | None = None, where: str = "") -> None:
    """``ValueError`` naming ``name`` and the first offending position when ``x`` (where ``inside`` is True,
    if given) holds NaN or +-Inf. One host sync."""
    bad = ~torch.isfinite(x)
    if inside is not None:
        bad &= inside
    if x.numel() and bool(bad.any()):
        position = tuple(torch.nonzero(bad)[0].tolist())
        value = x[position].item()
        at = f" {where}" if where else ""
        raise ValueError(f"{name} must be finite{at}; it holds {value} at position {position}")
