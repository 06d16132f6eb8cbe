"""The generalized Jensen-Shannon divergence (SPEC section 14) of the vocabulary-parallel losses.

``M = (1 - beta) p_s + beta p_t``, ``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M)``, at temperature ``tau``,
with ``log M = logaddexp(log p_s + log(1 - beta), log p_t + log beta)`` per entry from the shifted log-probs
``log p = (z - M_z) - norm`` (``M_z`` the row's maximum, ``norm = log sum exp(z - M_z)``: no rounding of an
O(log V) log-sum-exp).  ``beta`` is strictly inside ``(0, 1)`` here: the ends are the KLs, mapped by the front.

Dense teacher, vocabulary-parallel.  ``D`` needs the *global* log-sum-exps, known only after the statistics
round of :mod:`sod_kernels.parallel.stats`, so the JSD is a second round:

- each rank sweeps its shard (rows x vocabulary tiles, chunked PyTorch on either backend: the Triton kernels of
  :mod:`sod_kernels.dense` offer no JSD) and sums ``D' = sum beta p_t (log p_t - log M) + (1 - beta) p_s
  (log p_s - log M)`` and ``c' = sum p_s (log p_s - log M)`` over its columns (:func:`jsd_partials_torch`);
- one all-gather of the ``[2, Na]`` partials, summed in rank order on every rank (:func:`merge_jsd`: bitwise the
  same ``D`` and ``c`` everywhere, as the other merges) gives ``D`` and ``c``.

Cost: one more pass of the shard's student *and* teacher products in forward (``2 Na Vr (Hs + Ht)`` FLOPs) and
``2 world`` more floats per distilled token; the backward (:func:`jsd_shard_backward_torch`) recomputes both
models' tiles once, as the KL backward does.

Gradient (student only, local to the shard): ``dD/dz_s(j) = (1 - beta) p_s(j) (r_j - c)`` with
``r = log p_s - log M`` and ``c = E_{p_s}[r]``; on raw logits ``/ tau`` times the soft-cap's slope.  The
hard-label term's ``d lp_s(y) / dz_s(j) = onehot_y(j) - p_s(j)`` (onehot only on the rank owning ``y``) is
folded into the same sweep.

The sparse teacher's JSD (over the ``k + 1`` coarse-grained cells) needs no second round: it is
:func:`sod_kernels.sparse.rows.coarse_grained_rows` on the merged tail statistics.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..core.chunks import even_chunks
from ..core.loop import TileGrads, TorchRows, run_chunks
from ..core.rows import chunk_row_index
from ..core.tiles import compute_dtype, rows_per_tile, tile_logits, tile_logits_and_slope, vocab_tile
from .stats import KLStats, in_dtype, owned_targets

JSD_PARTIALS = 2  # D', c'


def log_mixture(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """``log M = logaddexp(log p_s + log(1 - beta), log p_t + log beta)`` entrywise (any shape; ``0 < beta < 1``)."""
    return torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))


class JSDFrame(NamedTuple):
    """Per-row constants ``[Na]`` of the JSD sweeps (float32, float64 for float64 inputs): each model's maximum
    ``M`` and ``norm = log sum exp(z - M)`` over the full vocabulary (``log p = (z - M) - norm``), and, after the
    second round, ``c = E_{p_s}[log p_s - log M]`` (None before)."""

    max_s: torch.Tensor
    max_t: torch.Tensor
    norm_s: torch.Tensor
    norm_t: torch.Tensor
    c: torch.Tensor | None = None

    @classmethod
    def from_stats(cls, stats: KLStats) -> JSDFrame:
        return cls(stats.frame[0], stats.frame[1], stats.norm_s, stats.norm_t)

    def stacked(self) -> torch.Tensor:
        """``[5, Na]`` (to save for backward)."""
        return torch.stack([self.max_s, self.max_t, self.norm_s, self.norm_t, self.c])

    @classmethod
    def unstacked(cls, frame: torch.Tensor) -> JSDFrame:
        return cls(*frame.unbind(0))

    def rows(self, start: int, stop: int) -> JSDFrame:
        return JSDFrame(*(None if x is None else x[start:stop, None] for x in self))


def _tile_logprobs(zs, zt, f: JSDFrame):
    """In place: ``zs``, ``zt`` (``[R, BV]`` scaled logits) -> ``log p_s``, ``log p_t`` in the rows' frames."""
    return zs.sub_(f.max_s).sub_(f.norm_s), zt.sub_(f.max_t).sub_(f.norm_t)


def _rows(sh, th, row_index, dt: torch.dtype) -> TorchRows:
    """The tile path's chunks of the distilled rows ``row_index [Na]``: the student's and the teacher's hidden
    states there in ``dt`` (``[R, Hs]``, ``[R, Ht]``)."""
    rows, contiguous = chunk_row_index(row_index, sh.shape[0])
    return TorchRows((sh, th), rows, contiguous, dt)


def jsd_partials_torch(sh, sw, sb, th, tw, tb, row_index, frame: JSDFrame, *, beta: float, temperature: float,
                       chunk_size: int | None = None, student_softcap: float | None = None,
                       teacher_softcap: float | None = None) -> torch.Tensor:
    """This rank's ``[2, Na]`` partial sums ``(D', c')`` over its ``Vr`` columns (chunked PyTorch, any device).

    ``sh [N, Hs]``, ``sw [Vr, Hs]``, ``sb [Vr]`` or None; ``th [N, Ht]``, ``tw [>= Vr, Ht]`` (first ``Vr`` rows),
    ``tb`` or None; ``row_index [Na]`` int64; ``frame`` the global maxima and norms (:class:`JSDFrame`).
    Float32 (float64 for float64 inputs); every entry is a finite sum (``p log`` terms of finite logits).
    """
    V = sw.shape[0]
    dt = compute_dtype(sh.dtype)
    ws, bs = in_dtype(sw, sb, V, dt)
    wt, bt = in_dtype(tw, tb, V, dt)
    out = torch.zeros(JSD_PARTIALS, row_index.numel(), dtype=dt, device=sh.device)
    BV = vocab_tile(V)

    def epilogue(c):
        start, stop = c.start, c.stop
        hs, ht = c.hidden
        f = frame.rows(start, stop)
        for v0 in range(0, V, BV):
            v1 = min(v0 + BV, V)
            zs = tile_logits(hs, ws[v0:v1], None if bs is None else bs[v0:v1], temperature, student_softcap)
            zt = tile_logits(ht, wt[v0:v1], None if bt is None else bt[v0:v1], temperature, teacher_softcap)
            ls, lt = _tile_logprobs(zs, zt, f)
            lm = log_mixture(ls, lt, beta)
            p_s, p_t = ls.exp(), lt.exp()
            r_s = ls.sub_(lm).mul_(p_s)               # p_s (log p_s - log M)
            r_t = lt.sub_(lm).mul_(p_t)               # p_t (log p_t - log M)
            out[1, start:stop] += r_s.sum(1)
            out[0, start:stop] += (r_t.mul_(beta).add_(r_s, alpha=1.0 - beta)).sum(1)

    with torch.no_grad():
        run_chunks(even_chunks(row_index.numel(), rows_per_tile(V, chunk_size)), _rows(sh, th, row_index, dt),
                   epilogue)
    return out


def merge_jsd(gathered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``[2, Na, world]`` partials -> ``(D [Na], c [Na])``, summed in rank order."""
    total = gathered[:, :, 0].clone()
    for r in range(1, gathered.shape[-1]):
        total += gathered[:, :, r]
    return total[0], total[1]


def jsd_shard_backward_torch(sh, sw, sb, th, tw, tb, row_index, frame: JSDFrame, grad_D, *, beta: float,
                             temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                             y_local=None, grad_lp=None, chunk_size: int | None = None,
                             student_softcap: float | None = None, teacher_softcap: float | None = None):
    """This rank's gradients of ``sum_i grad_D[i] D[i] (+ grad_lp[i] log p_s(y_i))`` (chunked PyTorch, any device).

    Per row, on this rank's columns: ``d(z_s) = grad_D (1 - beta) p_s (r - c) + grad_lp (onehot(y) - p_s)``
    (``r = log p_s - log M``; ``onehot(y)`` only where this rank owns ``y``), then ``/ tau`` and times the
    student soft-cap's slope.  ``frame`` holds ``c`` (:class:`JSDFrame`); ``grad_D`` / ``grad_lp`` ``[Na]`` (either
    None: no such term); ``y_local [N]`` the target ids minus this rank's first id (with ``grad_lp``).
    Returns ``(d_hidden [N, Hs] this rank's share, d_weight [Vr, Hs], d_bias [Vr])`` in the inputs' dtypes
    (None where not needed).
    """
    V = sw.shape[0]
    dt = compute_dtype(sh.dtype)
    ws, bs = in_dtype(sw, sb, V, dt)
    wt, bt = in_dtype(tw, tb, V, dt)
    grads = TileGrads(sh, ws, sb, dt, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                      like=(sh, sw, sb))
    if not grads.active:
        return grads.finish()
    BV = vocab_tile(V)

    def epilogue(c):
        start, stop = c.start, c.stop
        hs, ht = c.hidden
        f = frame.rows(start, stop)
        g_d = None if grad_D is None else grad_D[start:stop, None].to(dt) * ((1.0 - beta) / temperature)
        g_y = None if grad_lp is None else grad_lp[start:stop, None].to(dt) / temperature
        if g_y is not None:
            local, owned = owned_targets(y_local[c.rows], 0, V)
        for v0 in range(0, V, BV):
            v1 = min(v0 + BV, V)
            w_tile, b_tile = ws[v0:v1], None if bs is None else bs[v0:v1]
            zs, slope = tile_logits_and_slope(hs, w_tile, b_tile, temperature, student_softcap)
            zt = tile_logits(ht, wt[v0:v1], None if bt is None else bt[v0:v1], temperature, teacher_softcap)
            ls, lt = _tile_logprobs(zs, zt, f)
            p_s = ls.exp()
            dx = torch.zeros_like(p_s)
            if g_d is not None:  # (1 - beta) p_s (r - c)
                dx += (ls - log_mixture(ls, lt, beta)).sub_(f.c).mul_(p_s).mul_(g_d)
            if g_y is not None:  # onehot(y) - p_s
                dx -= p_s.mul_(g_y)
                hit = torch.nonzero(owned & (local >= v0) & (local < v1)).squeeze(1)
                dx[hit, local[hit] - v0] += g_y[hit, 0]
            c.fold_tile(dx, slice(v0, v1), w_tile, slope)

    with torch.no_grad():
        run_chunks(even_chunks(row_index.numel(), rows_per_tile(V, chunk_size)), _rows(sh, th, row_index, dt),
                   epilogue, grads)
    return grads.finish()


# ------------------------------------------------------------------------------------------ sparse teacher
