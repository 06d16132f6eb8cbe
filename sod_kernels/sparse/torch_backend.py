"""Chunked PyTorch backend of :func:`sod_kernels.fused_sparse_sod_loss`: the two-pass tile sweeps (``memory="low"``,
``reduction="none"`` and any device; float64 supported).

Same tiling as :mod:`sod_kernels.dense.torch_backend`: rows in chunks of ``R``, the vocabulary in tiles of ``BV``
columns, never ``N x V``.  Forward, per row chunk: every logit tile is computed once; the logits at the
teacher's ids that fall in the tile are read and those entries set to ``-inf``; an online log-sum-exp
over the masked tiles gives the tail log-sum-exp.  :func:`sod_kernels.sparse.rows.coarse_grained_rows` then
gives the divergence and the per-row gradient terms (``O(N k)`` kept for the backward).  Backward: the tiles
are recomputed, ``d(logits) = c_row exp(z - lse_tail)`` with the ``k`` id values written over their
columns (:func:`sod_kernels.sparse.rows.logit_coefficients`; with a hard-label term also ``-h`` added at the
sampled token's column), and contracted into ``d(hidden)``, ``d(weight)``, ``d(bias)``.

Cost: forward ``2 Na V H`` FLOPs, backward ``2 Na V H + 4 Na V H``.  Extra memory: a few ``R x BV`` tiles,
``O(Na k)`` terms and, for 16-bit weights, one float32 copy of the weight.
"""

from __future__ import annotations

import torch

from ..core.chunks import even_chunks
from ..core.loop import TileGrads, TorchRows, run_chunks
from ..core.rows import chunk_row_index
from ..core.tiles import compute_dtype, rows_per_tile, tile_logits, tile_logits_and_slope, vocab_tile
from .rows import SparseForward, coarse_grained_rows, logit_coefficients

MIN_LOGIT = -1e30


def _head(weight, bias, dt):
    return weight.to(dt), None if bias is None else bias.to(dt)


def _tile(w, b, v0, v1):
    return w[v0:v1], None if b is None else b[v0:v1]


def _ids_in(ids: torch.Tensor, v0: int, v1: int):
    """``(rows, slots, columns)`` of the ids of a chunk that fall in the tile ``[v0, v1)``."""
    r, j = ((ids >= v0) & (ids < v1)).nonzero(as_tuple=True)
    return r, j, ids[r, j] - v0


def sweep_tiles(h, w, b, ids, y, vocab: int, tile: int, temperature: float, softcap: float | None = None):
    """One sweep over the ``tile``-column logit tiles of a row chunk ``h [n, H]`` against ``w [vocab, H]``:
    ``(z_ids [n, k], z_y [n] or None, m [n], l [n])``: the logits at ``ids`` (0 where an id is outside
    ``[0, vocab)``, e.g. held by another rank's shard), at ``y`` (0 where outside; None without ``y``), and the
    running maximum and sum of exponentials of the remaining columns, the tail (``MIN_LOGIT`` and 0 if none);
    ``softcap``: ``cap tanh(x / cap)`` of the raw logits before ``1/tau``, or None."""
    n, k = ids.shape
    dt, device = h.dtype, h.device
    z_ids = torch.zeros(n, k, dtype=dt, device=device)
    z_y = torch.zeros(n, dtype=dt, device=device) if y is not None else None
    m = torch.full((n,), MIN_LOGIT, dtype=dt, device=device)
    l = torch.zeros(n, dtype=dt, device=device)
    for v0 in range(0, vocab, tile):
        v1 = min(v0 + tile, vocab)
        z = tile_logits(h, *_tile(w, b, v0, v1), temperature, softcap)
        if y is not None:
            inside = (y >= v0) & (y < v1)
            col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            z_y = torch.where(inside, z.gather(1, col).squeeze(1), z_y)
        r, j, cols = _ids_in(ids, v0, v1)
        z_ids[r, j] = z[r, cols]
        z[r, cols] = float("-inf")
        new = torch.maximum(m, z.amax(1))
        l = l * (m - new).exp() + (z - new[:, None]).exp_().sum(1)
        m = new
    return z_ids, z_y, m, l


def sparse_forward(hidden, weight, bias, row_index, ids, logprobs, target_ids, *, divergence: str,
                   temperature: float, chunk_size: int | None = None, softcap: float | None = None,
                   memory: str = "fast", beta: float = 0.5, keep_probs: bool = False) -> SparseForward:
    """Per-row coarse-grained divergence of the rows ``row_index``; arguments as
    :func:`sod_kernels.sparse.triton_backend.sparse_forward` (``memory`` changes nothing here: both modes sweep
    rows x vocabulary tiles).  Outputs in float32 (float64 for float64 inputs)."""
    V, dt, device = weight.shape[0], compute_dtype(hidden.dtype), hidden.device
    w, b = _head(weight, bias, dt)
    Na, k = ids.shape
    out = SparseForward.empty(Na, k, device, dt, target_ids is not None, keep_probs)
    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    BV = vocab_tile(V)

    def epilogue(c):
        start, stop = c.start, c.stop
        I = ids[start:stop]
        y = None if target_ids is None else target_ids[start:stop]
        z_ids, z_y, m, l = sweep_tiles(c.hidden[0], w, b, I, y, V, BV, temperature, softcap)
        t = coarse_grained_rows(z_ids, m + l.log(), logprobs[start:stop], divergence=divergence, beta=beta,
                                vocab=V, ids=I, target_ids=y, z_target=z_y)
        out.store(start, stop, t)

    with torch.no_grad():
        run_chunks(even_chunks(Na, rows_per_tile(V, chunk_size)), TorchRows((hidden,), rows_idx, contiguous, dt),
                   epilogue)
    return out


def sparse_backward(hidden, weight, bias, row_index, ids, saved: SparseForward, grad_divergence, *,
                    temperature: float, need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                    chunk_size: int | None = None, softcap: float | None = None, memory: str = "fast",
                    target_ids: torch.Tensor | None = None, grad_target_logprob: torch.Tensor | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i] (+ grad_target_logprob[i] * log p_s(y_i))``; arguments
    and results as :func:`sod_kernels.sparse.triton_backend.sparse_backward`."""
    if grad_target_logprob is not None and target_ids is None:
        raise ValueError("sparse_backward: grad_target_logprob needs target_ids")
    V, dt = weight.shape[0], compute_dtype(hidden.dtype)
    w, b = _head(weight, bias, dt)
    grads = TileGrads(hidden, w, bias, dt, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                      like=(hidden, weight, bias))
    if not grads.active:
        return grads.finish()
    BV = vocab_tile(V)
    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])

    def epilogue(c):
        start, stop = c.start, c.stop
        coefs = _coefficients(saved, grad_divergence, grad_target_logprob, start, stop, dt, temperature)
        tail, values = coefs.tail[:, None], coefs.ids
        lse_tail = saved.lse_tail[start:stop].to(dt)[:, None]
        h = c.hidden[0]
        I = ids[start:stop]
        y = None if coefs.target is None else target_ids[start:stop]
        for v0 in range(0, V, BV):
            v1 = min(v0 + BV, V)
            z, slope = tile_logits_and_slope(h, *_tile(w, b, v0, v1), temperature, softcap)
            dx = z.sub_(lse_tail).exp_().mul_(tail)
            r, j, cols = _ids_in(I, v0, v1)
            dx[r, cols] = values[r, j]   # the id columns: their own values (overwriting the tail formula)
            if y is not None:            # the hard term's one-hot part: -h at the sampled token's column
                ry = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
                dx[ry, y[ry] - v0] += coefs.target[ry]
            # times d(capped logit) / d(raw logit) on every column, then folded
            c.fold_tile(dx, slice(v0, v1), w[v0:v1], slope)

    with torch.no_grad():
        run_chunks(even_chunks(ids.shape[0], rows_per_tile(V, chunk_size)),
                   TorchRows((hidden,), rows_idx, contiguous, dt), epilogue, grads)
    return grads.finish()


def _coefficients(saved: SparseForward, grad_divergence, grad_target_logprob, start: int, stop: int, dt,
                  temperature: float):
    """The rows ``[start, stop)``'s :class:`~sod_kernels.sparse.rows.LogitCoefficients` in ``dt`` for the
    temperature-scaled logits (upstream ``grad_divergence`` of ``D`` and ``grad_target_logprob`` of
    ``log p_s(y)``, the latter None without a hard-label term)."""
    scale = grad_divergence[start:stop].to(dt) / temperature
    hard = None if grad_target_logprob is None else -grad_target_logprob[start:stop].to(dt) / temperature
    pick = lambda x: None if x is None else x[start:stop].to(dt)  # noqa: E731
    return logit_coefficients(saved.grad_ids[start:stop].to(dt), saved.grad_tail[start:stop].to(dt), scale,
                              hard=hard, prob_ids=pick(saved.prob_ids), prob_tail=pick(saved.prob_tail))
