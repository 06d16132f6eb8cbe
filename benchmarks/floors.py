"""The FLOP and byte floors of one pass, and the figures derived from them.

For ``N`` distilled tokens, vocabulary ``V``, student width ``Hs``, teacher width ``Ht``:

- forward: both logit products, ``2 N V (Hs + Ht)`` FLOPs;
- forward+backward, minimum (gradients formed in the forward pass): ``2 N V (Hs + Ht) + 4 N V Hs``
  (``2 N V Hs`` for d(hidden), ``2 N V Hs`` for d(weight));
- forward+backward with recomputation (what a two-pass kernel does): ``2 * 2 N V (Hs + Ht) + 4 N V Hs``.

Achieved TFLOP/s are always computed from the minimum (the floor), so a method that recomputes is not
credited for the extra work it chose to do.

Bytes: hidden states and weights read once per pass, student gradients written once:
forward ``e (N + V)(Hs + Ht)``; forward+backward ``2 e (N + V)(Hs + Ht) + e (N + V) Hs`` with ``e`` the
element size of the inputs.
"""

from __future__ import annotations

MODES = ("fwd", "fwd_bwd")
TERA = 1e12
GIB = float(1 << 30)


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def flop_floor(mode: str, tokens: int, vocab: int, student_width: int, teacher_width: int) -> int:
    """Minimum FLOPs of the loss (forward) or of the loss and its student gradients (fwd_bwd)."""
    forward = 2 * tokens * vocab * (student_width + teacher_width)
    if check_mode(mode) == "fwd":
        return forward
    return forward + 4 * tokens * vocab * student_width


def flop_recompute(mode: str, tokens: int, vocab: int, student_width: int, teacher_width: int) -> int:
    """FLOPs of a two-pass method that recomputes both logit products in the backward pass."""
    forward = 2 * tokens * vocab * (student_width + teacher_width)
    if check_mode(mode) == "fwd":
        return forward
    return 2 * forward + 4 * tokens * vocab * student_width


def byte_floor(mode: str, tokens: int, vocab: int, student_width: int, teacher_width: int,
               element_size: int) -> int:
    """Minimum bytes moved: inputs read once per pass, student gradients written once."""
    read = element_size * (tokens + vocab) * (student_width + teacher_width)
    if check_mode(mode) == "fwd":
        return read
    return 2 * read + element_size * (tokens + vocab) * student_width


def achieved_tflops(flops: int, seconds: float | None) -> float | None:
    """``flops / seconds`` in TFLOP/s (None without a time)."""
    if not seconds:
        return None
    return flops / seconds / TERA


def share_of_rate(achieved: float | None, matmul_tflops: float | None) -> float | None:
    """Achieved rate as a fraction of the matrix-product rate measured in the same run."""
    if achieved is None or not matmul_tflops:
        return None
    return achieved / matmul_tflops
