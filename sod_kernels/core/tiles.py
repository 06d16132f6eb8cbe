"""Row x vocabulary tiles for the PyTorch paths: the compute dtype, tile and chunk sizes, and the logits of a
tile with the temperature and an optional soft-cap (``cap tanh(x / cap)``), with the cap's slope for a gradient.

Every chunked PyTorch sweep (dense, sparse, log-probs, the vocabulary-parallel shards) cuts its work with
these sizes: a tile of ``R`` rows x ``BV = min(V, VOCAB_TILE)`` columns holds about ``CHUNK_ELEMENTS`` floats,
which keeps both dimensions of each matrix product large (``R`` rows share every weight tile).
"""

from __future__ import annotations

import torch

MIN_LOGIT = -1e30         # start of the running maxima: finite, so frame changes never compute inf - inf
CHUNK_ELEMENTS = 1 << 21  # floats in one rows x vocabulary tile (8 MiB in float32)
VOCAB_TILE = 2048         # vocabulary columns per tile (fewer when V is smaller)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logit math runs in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def vocab_tile(vocab: int) -> int:
    """Vocabulary columns per tile."""
    return max(min(vocab, VOCAB_TILE), 1)


def rows_per_chunk(vocab: int, chunk_size: int | None = None) -> int:
    """Rows per chunk when a block spans the whole vocabulary (``CHUNK_ELEMENTS / V``), or ``chunk_size``."""
    if chunk_size is not None:
        return max(int(chunk_size), 1)
    return max(CHUNK_ELEMENTS // max(vocab, 1), 1)


def rows_per_tile(vocab: int, chunk_size: int | None = None) -> int:
    """Rows per tile: ``CHUNK_ELEMENTS / BV`` (or ``chunk_size``)."""
    if chunk_size is not None:
        return max(int(chunk_size), 1)
    return max(CHUNK_ELEMENTS // vocab_tile(vocab), 1)


def tile_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
            softcap: float | None = None) -> torch.Tensor:
    """``[R, BV]`` logits ``z = (h W^T + b) / tau``, or ``cap tanh((h W^T + b) / cap) / tau`` with a soft-cap."""
    z = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def tile_logits_and_slope(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float,
                      softcap: float | None):
    """``(z, slope)``: :func:`tile_logits` and the soft-cap's derivative ``1 - tanh^2(u) = cosh(u)^-2`` (``u`` the
    raw logit over the cap; exact where the cap saturates, where ``1 - tanh^2`` would round to 0), or
    ``(z, None)`` without a cap."""
    if softcap is None:
        return tile_logits(hidden, weight, bias, temperature), None
    u = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)
    u.div_(softcap)
    slope = torch.cosh(u).square_().reciprocal_()
    z = u.tanh_().mul_(softcap / temperature)
    return z, slope


def apply_softcap(x: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(x / softcap)`` of raw logits ``x`` (any shape), or ``x`` itself for None."""
    return x if softcap is None else torch.tanh(x / softcap) * softcap


def fold_logit_grad(d_logits: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor,
                    rows: torch.Tensor | slice, d_hidden: torch.Tensor | None, d_weight: torch.Tensor | None,
                    d_bias: torch.Tensor | None) -> None:
    """Fold a block's ``d(logits) [C, V']`` into the student's gradient accumulators (each skipped where None):
    ``d_hidden[rows] += d_logits @ weight`` (``rows``: a slice, or an index tensor of distinct rows),
    ``d_weight += d_logits^T hidden_rows`` and ``d_bias += column sums``; ``weight [V', H]`` and ``d_weight``,
    ``d_bias`` cover the block's columns."""
    if d_hidden is not None:
        if isinstance(rows, slice):
            d_hidden[rows].addmm_(d_logits, weight)
        else:
            d_hidden.index_add_(0, rows, d_logits @ weight)
    if d_weight is not None:
        d_weight.addmm_(d_logits.T, hidden_rows)
    if d_bias is not None:
        d_bias += d_logits.sum(0)


def fold_tile_grad(d_logits: torch.Tensor, slope: torch.Tensor | None, hidden_rows: torch.Tensor,
                   weight_tile: torch.Tensor, columns: slice, d_rows: torch.Tensor | None,
                   d_weight: torch.Tensor | None, d_bias: torch.Tensor | None) -> None:
    """Fold one vocabulary tile's ``d(logits) [R, V']`` of a row chunk (the tile ``columns`` of the vocabulary,
    ``V'`` wide): first ``d(logits) *= slope`` in place (the soft-cap's derivative, skipped for None), then
    ``d_rows += d(logits) @ weight_tile`` (``d_rows [R, H]``, the chunk's own), ``d_weight[columns] +=
    d(logits)^T hidden_rows`` and ``d_bias[columns] +=`` column sums (each skipped where None)."""
    if slope is not None:
        d_logits.mul_(slope)
    fold_logit_grad(d_logits, hidden_rows, weight_tile, slice(None), d_rows,
                    None if d_weight is None else d_weight[columns], None if d_bias is None else d_bias[columns])


def grads_like(grads, tensors) -> tuple:
    """The gradients ``grads`` (None where not formed) in the dtypes of the tensors they belong to."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, tensors))

