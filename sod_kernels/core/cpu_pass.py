"""Shared pieces of the CPU single passes over whole-vocabulary row chunks (the dense and the sparse
``cpu_backend``): the chunk row sizing, a head's weight and bias in the compute dtype, and the student's
gradient accumulators, folded per chunk and finished into the inputs' dtypes and shapes.

Knows no loss: the callers form ``d(logits)`` of a chunk; this module only sizes, gathers and folds.
"""

from __future__ import annotations

import torch

from . import cpu_products
from .chunks import LMHead, gather_rows

ROW_MULTIPLE = 32   # chunk sizes are multiples of this when they exceed it
MAX_ROWS = 8192     # the largest chunk a byte budget sizes


def cpu_chunk_rows(n_rows: int, row_bytes: int, budget: int) -> int:
    """Rows per chunk: ``budget`` bytes of blocks at ``row_bytes`` bytes per row (all ``[C, V]`` blocks of the
    chunk), a multiple of :data:`ROW_MULTIPLE` rows when above it, at most :data:`MAX_ROWS` and ``n_rows``
    (at least 1)."""
    rows = budget // max(row_bytes, 1)
    rows = min(max(rows, 1), MAX_ROWS)
    if rows > ROW_MULTIPLE:
        rows -= rows % ROW_MULTIPLE
    return max(min(rows, max(n_rows, 1)), 1)


class ComputeHead:
    """One model's ``weight [V, H]`` (unit column stride) and ``bias [V]`` (zeros for none) in the compute dtype
    ``dt`` (a 16-bit weight is converted once per call); its hidden states ``[N, H]`` are converted per chunk."""

    def __init__(self, head: LMHead, dt: torch.dtype):
        self.weight = head.used_weight.to(dt)
        if self.weight.stride(-1) != 1:
            self.weight = self.weight.contiguous()
        bias = head.used_bias
        self.has_bias = bias is not None
        self.bias = torch.zeros(head.vocab, dtype=dt) if bias is None else bias.to(dt).contiguous()
        self.hidden = head.hidden
        self.dt = dt

    def rows(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """The hidden states of ``rows`` (a slice or int64 indices) in the compute dtype, ``[C, H]``."""
        h = gather_rows(self.hidden, rows)
        return h if h.dtype == self.dt else h.to(self.dt)


class StudentGrads:
    """The student's gradient accumulators of a single pass over ``n`` distilled rows, in the compute dtype:
    ``d_hidden [n, H]`` (each chunk writes its rows once), ``d_weight [V, H]`` and ``d_bias [V]`` (sums over
    the chunks; no bias, no ``d_bias``); each is None where not needed."""

    def __init__(self, n: int, head: ComputeHead, *, need_hidden: bool, need_weight: bool, need_bias: bool):
        V, H = head.weight.shape
        dt = head.dt
        self.d_hidden = torch.empty(n, H, dtype=dt) if need_hidden else None
        self.d_weight = torch.zeros(V, H, dtype=dt) if need_weight else None
        self.d_bias = torch.zeros(V, dtype=dt) if (need_bias and head.has_bias) else None

    @property
    def active(self) -> bool:
        """Whether any gradient is wanted (else the pass skips the gradient epilogue)."""
        return self.d_hidden is not None or self.d_weight is not None or self.d_bias is not None

    def fold(self, d_logits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor, start: int,
             stop: int) -> None:
        """Fold the chunk ``[start, stop)``'s ``d(logits) [C, V]``: ``d_hidden[start:stop] = d(logits) W``,
        ``d_weight += d(logits)^T h`` (``hidden_rows [C, H]``), ``d_bias += column sums``
        (:func:`~sod_kernels.core.cpu_products.fold`: vocabulary groups on the CPU pool)."""
        d_hidden = None if self.d_hidden is None else self.d_hidden[start:stop]
        cpu_products.fold(d_logits, hidden_rows, weight, d_hidden, self.d_weight, self.d_bias)

    def finish(self, head: LMHead, row_index: torch.Tensor, contiguous: bool) -> tuple:
        """``(d_hidden [N, H], d_weight [Vw, H], d_bias [Vw])`` in the dtypes and shapes of ``head``'s tensors:
        zero rows of ``d_hidden`` outside ``row_index [n]`` (``contiguous``: it is ``arange(n)``) and zero rows
        for a padded vocabulary; None where not needed."""
        h, w, b = head.hidden, head.weight, head.bias
        d_hidden, d_weight, d_bias = self.d_hidden, self.d_weight, self.d_bias
        if d_hidden is not None:
            if contiguous and d_hidden.shape[0] == h.shape[0]:
                d_hidden = d_hidden.to(h.dtype)
            else:
                d_hidden = torch.zeros_like(h).index_copy_(0, row_index, d_hidden.to(h.dtype))
        if d_weight is not None:
            d_weight = zero_padded(d_weight.to(w.dtype), w.shape[0])
        if d_bias is not None:
            d_bias = zero_padded(d_bias.to(b.dtype), b.shape[0])
        return d_hidden, d_weight, d_bias


def zero_padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x [R, ...]`` with zero rows appended up to ``rows`` (``x`` itself when ``R == rows``)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])
