"""Per-shard partial statistics of the vocabulary-parallel functions, and their merges.

A rank holds the lm_head rows of the vocabulary ids ``[v0, v0 + Vr)``.  For each distilled token it computes,
over its own columns only, the partial statistics in the max-shifted frame of its own maxima (the algebra of
:mod:`sod_kernels.dense.kernels`, docs/math.md):

- KL (``[5, Na]``): ``m_w, l_w, m_o, l_o, A'`` with ``l = sum exp(z - m)`` and
  ``A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o))`` (W = the model whose probabilities weight the KL
  sum: the student for reverse KL, the teacher for forward KL; O = the other).  With sampled targets two
  more rows: the target's student and teacher logits ``z(y)`` where this rank owns ``y``, else 0.
- log-probs (``[3, Na]``, or ``[4, Na]`` with the entropy): ``m, l, z(y)`` (0 where ``y`` is not owned) and
  ``B' = sum exp(z - m) (z - m)``.

The ranks' blocks are all-gathered (``[P, Na, world]``) and merged by rescaling each partial to the global
maxima ``M``: ``L = sum_r exp(m_r - M) l_r`` and ``A = sum_r exp(m_w,r - M_w) (A'_r + l_w,r ((m_w,r - M_w) -
(m_o,r - M_o)))`` (no difference of O(log V) quantities); the target logit is the sum over ranks (exact: one
rank contributes it, the others 0).  Two backends compute the partials: chunked PyTorch (any device,
float64 too) and, on CUDA, the chunked core's float32 logit blocks with the Triton statistics kernels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.chunks import FAST_CHUNK_BYTES, chunk_rows, even_chunks
from ..core.loop import TorchRows, run_chunks
from ..core.rows import chunk_row_index
from ..core.tiles import MIN_LOGIT, apply_softcap, compute_dtype, rows_per_chunk, rows_per_tile, tile_logits, vocab_tile
from ..logprobs.token_logprobs import MIN_CHUNK_ROWS

KL_PARTIALS = 5
LOGPROB_PARTIALS = 3  # m, l, z(y); + B' with the entropy


def in_dtype(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, dtype: torch.dtype):
    return weight[:rows].to(dtype), None if bias is None else bias[:rows].to(dtype)


def owned_targets(target_ids: torch.Tensor, vocab_start: int, shard: int):
    """``(local [..], owned [..])``: ``target_ids - vocab_start`` and whether this rank holds that id."""
    local = target_ids - vocab_start
    return local, (local >= 0) & (local < shard)


def _target_logit(z: torch.Tensor, local: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    col = local.clamp(0, z.shape[1] - 1).unsqueeze(1)
    return torch.where(owned, z.gather(1, col).squeeze(1), torch.zeros((), dtype=z.dtype, device=z.device))


# ------------------------------------------------------------------------------------------------ KL
def kl_partials_torch(sh, sw, sb, th, tw, tb, row_index, y_local, *, forward_kl: bool, temperature: float,
                      chunk_size: int | None = None, student_softcap: float | None = None,
                      teacher_softcap: float | None = None) -> torch.Tensor:
    """KL partials ``[5 (+2 with y_local), Na]`` of this rank's columns (chunked PyTorch, rows x vocabulary
    tiles with an online rescaling; float32, or float64 for float64 inputs).

    ``sh [N, Hs]``, ``sw [Vr, Hs]``, ``sb [Vr]`` or None; ``th [N, Ht]``, ``tw [>= Vr, Ht]`` (first ``Vr`` rows),
    ``tb`` or None; ``row_index [Na]`` int64; ``y_local [N]`` int64 (target id minus this rank's first id) or None;
    ``student_softcap`` / ``teacher_softcap``: ``cap tanh(x / cap)`` of that model's raw logits before ``1/tau``.
    """
    V = sw.shape[0]
    dt = compute_dtype(sh.dtype)
    ws, bs = in_dtype(sw, sb, V, dt)
    wt, bt = in_dtype(tw, tb, V, dt)
    Na = row_index.numel()
    out = torch.zeros(KL_PARTIALS + (2 if y_local is not None else 0), Na, dtype=dt, device=sh.device)
    BV = vocab_tile(V)

    def epilogue(c):
        start, stop, n = c.start, c.stop, c.size
        hs, ht = c.hidden
        m_w = torch.full((n,), MIN_LOGIT, dtype=dt, device=sh.device)
        m_o = m_w.clone()
        l_w, l_o, acc = (torch.zeros(n, dtype=dt, device=sh.device) for _ in range(3))
        if y_local is not None:
            local, owned = owned_targets(y_local[c.rows], 0, V)
        for v0 in range(0, V, BV):
            v1 = min(v0 + BV, V)
            zs = tile_logits(hs, ws[v0:v1], None if bs is None else bs[v0:v1], temperature, student_softcap)
            zt = tile_logits(ht, wt[v0:v1], None if bt is None else bt[v0:v1], temperature, teacher_softcap)
            if y_local is not None:
                inside = owned & (local >= v0) & (local < v1)
                out[5, start:stop] += _target_logit(zs, local - v0, inside)
                out[6, start:stop] += _target_logit(zt, local - v0, inside)
            z_w, z_o = (zt, zs) if forward_kl else (zs, zt)
            new_w, new_o = torch.maximum(m_w, z_w.amax(1)), torch.maximum(m_o, z_o.amax(1))
            acc.add_(l_w * ((m_w - new_w) - (m_o - new_o))).mul_((m_w - new_w).exp_())  # re-frame A'
            l_w.mul_((m_w - new_w).exp_())
            l_o.mul_((m_o - new_o).exp_())
            z_w.sub_(new_w[:, None])
            z_o.sub_(new_o[:, None])
            l_o.add_(z_o.exp().sum(1))
            e_w = z_w.exp()
            l_w.add_(e_w.sum(1))
            acc.add_((e_w * (z_w - z_o)).sum(1))
            m_w, m_o = new_w, new_o
        out[0, start:stop], out[1, start:stop], out[2, start:stop] = m_w, l_w, m_o
        out[3, start:stop], out[4, start:stop] = l_o, acc

    rows_idx, contiguous = chunk_row_index(row_index, sh.shape[0])
    with torch.no_grad():
        run_chunks(even_chunks(Na, rows_per_tile(V, chunk_size)), TorchRows((sh, th), rows_idx, contiguous, dt),
                   epilogue)
    return out


def combine_kl(part: torch.Tensor) -> torch.Tensor:
    """Partials ``[5, C, S]`` (S column ranges of the same rows) -> one partial ``[5, C]`` in the frame of
    the maxima over the ranges."""
    m_w, l_w, m_o, l_o, a = part[:KL_PARTIALS].unbind(0)
    big_w, big_o = m_w.amax(-1), m_o.amax(-1)
    shift_w, shift_o = m_w - big_w[..., None], m_o - big_o[..., None]
    scale_w = shift_w.exp()
    return torch.stack([big_w, (l_w * scale_w).sum(-1), big_o, (l_o * shift_o.exp()).sum(-1),
                        (scale_w * (a + l_w * (shift_w - shift_o))).sum(-1)])


class KLStats(NamedTuple):
    """Merged per-token statistics (``[Na]`` each; float32, float64 for float64 inputs).

    D (unclamped), lse_s / lse_t (of the temperature-scaled logits), ``frame [3, Na]`` = (M_s, M_t, c') for
    the shifted reverse-KL gradient, the target logits zy_s / zy_t (None without targets), and
    ``norm_s`` / ``norm_t`` = ``lse - M`` of each model formed as ``log sum exp(z - M)`` (never as a difference
    of two O(log V) numbers: ``(z - M) - norm`` is a log-probability without the rounding of ``lse``)."""

    D: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    frame: torch.Tensor
    zy_s: torch.Tensor | None
    zy_t: torch.Tensor | None
    norm_s: torch.Tensor
    norm_t: torch.Tensor


def merge_kl(gathered: torch.Tensor, *, forward_kl: bool) -> KLStats:
    """All ranks' partials ``[5 (+2), Na, world]`` -> :class:`KLStats`."""
    big_w, sum_w, big_o, sum_o, a = combine_kl(gathered).unbind(0)
    centre = a / sum_w
    log_w, log_o = sum_w.log(), sum_o.log()
    D = centre - log_w + log_o
    lse_w, lse_o = big_w + log_w, big_o + log_o
    lse_s, lse_t, max_s, max_t = (lse_o, lse_w, big_o, big_w) if forward_kl else (lse_w, lse_o, big_w, big_o)
    norm_s, norm_t = (log_o, log_w) if forward_kl else (log_w, log_o)
    zy_s = zy_t = None
    if gathered.shape[0] > KL_PARTIALS:
        zy_s, zy_t = gathered[5].sum(-1), gathered[6].sum(-1)
    return KLStats(D, lse_s, lse_t, torch.stack([max_s, max_t, centre]), zy_s, zy_t, norm_s, norm_t)


def kl_partials_triton(sh, sw, sb, th, tw, tb, row_index, y_local, *, forward_kl: bool, temperature: float,
                       chunk_size: int | None = None, student_softcap: float | None = None,
                       teacher_softcap: float | None = None) -> torch.Tensor:
    """:func:`kl_partials_torch` on the chunked core (float32 logit blocks, the Triton statistics kernel);
    float32 / bfloat16 / float16 inputs, float32 partials."""
    from ..core.loop import run_chunks
    from ..dense.kernels import kl_partials
    from ..dense.triton_backend import KLProblem, device_blocks

    divergence = "forward_kl" if forward_kl else "reverse_kl"
    p = KLProblem.build(sh, sw, sb, th, tw, tb, row_index, None, divergence, temperature)
    V, Na = p.vocab, p.n_rows
    out = torch.zeros(KL_PARTIALS + (2 if y_local is not None else 0), Na, dtype=torch.float32, device=sh.device)
    sbias, tbias = p.student.used_bias, p.teacher.used_bias

    def epilogue(c):
        start, stop = c.start, c.stop
        xs, xt = c.logits
        part = kl_partials(xs, xt, sbias, tbias, forward_kl=forward_kl, temperature=temperature,
                           student_softcap=student_softcap, teacher_softcap=teacher_softcap)
        out[:KL_PARTIALS, start:stop] = combine_kl(part)
        if y_local is not None:
            local, owned = owned_targets(y_local[c.rows], 0, V)
            for row, x, bias, cap in ((5, xs, sbias, student_softcap), (6, xt, tbias, teacher_softcap)):
                z = _target_logit(x, local, owned)
                if bias is not None:
                    z = torch.where(owned, z + bias[local.clamp(0, V - 1)].float(), z)
                out[row, start:stop] = apply_softcap(z, cap) / temperature

    chunks = even_chunks(Na, chunk_rows(Na, V, 8, budget=FAST_CHUNK_BYTES, chunk_size=chunk_size))
    run_chunks(chunks, device_blocks(p, chunks), epilogue)
    return out


# ----------------------------------------------------------------------------------------- log-probs
def logprob_partials_torch(hidden, weight, bias, row_index, y_local, *, temperature: float, with_entropy: bool,
                           chunk_size: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Log-prob partials ``[3 (+1 with the entropy), Na]``: ``m, l, z(y)`` (and ``B'``) of this rank's
    columns; ``hidden [N, H]``, ``weight [Vr, H]``, ``bias [Vr]`` or None, ``y_local [N]`` (target id minus
    this rank's first id).  Rows in chunks against the whole shard (chunked PyTorch)."""
    dt = compute_dtype(hidden.dtype)
    V = weight.shape[0]
    w, b = in_dtype(weight, bias, V, dt)
    Na = row_index.numel()
    out = torch.zeros(LOGPROB_PARTIALS + int(with_entropy), Na, dtype=dt, device=hidden.device)
    C = rows_per_chunk(V, chunk_size) if chunk_size is not None else max(rows_per_chunk(V), MIN_CHUNK_ROWS)

    def epilogue(c):
        start, stop = c.start, c.stop
        z = tile_logits(c.hidden[0], w, b, temperature, softcap)
        local, owned = owned_targets(y_local[c.rows], 0, V)
        out[2, start:stop] = _target_logit(z, local, owned)
        m = z.amax(1)
        z.sub_(m[:, None])
        e = z.exp()
        out[0, start:stop], out[1, start:stop] = m, e.sum(1)
        if with_entropy:
            out[3, start:stop] = (e * z).sum(1)

    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    with torch.no_grad():
        run_chunks(even_chunks(Na, C), TorchRows((hidden,), rows_idx, contiguous, dt), epilogue)
    return out


def combine_logprob(part: torch.Tensor, with_entropy: bool) -> torch.Tensor:
    """Partials ``[3 (+1), C, S]`` -> ``[3 (+1), C]`` in the frame of the maxima (target logits summed)."""
    m, l = part[0], part[1]
    big = m.amax(-1)
    shift = m - big[..., None]
    scale = shift.exp()
    rows = [big, (l * scale).sum(-1), part[2].sum(-1)]
    if with_entropy:
        rows.append((scale * (part[3] + l * shift)).sum(-1))
    return torch.stack(rows)


class LogprobStats(NamedTuple):
    """Merged per-token statistics ``[Na]``: log-prob of the target, lse, the max ``M``, the shifted mean
    ``E_p[z] - M`` (zeros without entropy) and the entropy (None without it)."""

    logp: torch.Tensor
    lse: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    entropy: torch.Tensor | None


def merge_logprob(gathered: torch.Tensor, *, with_entropy: bool) -> LogprobStats:
    """All ranks' partials ``[3 (+1), Na, world]`` -> :class:`LogprobStats`."""
    merged = combine_logprob(gathered, with_entropy)
    big, total, zy = merged[0], merged[1], merged[2]
    log_total = total.log()
    lse = big + log_total
    if not with_entropy:
        return LogprobStats(zy - lse, lse, big, torch.zeros_like(big), None)
    mean = merged[3] / total
    return LogprobStats(zy - lse, lse, big, mean, log_total - mean)


def logprob_partials_triton(hidden, weight, bias, row_index, y_local, *, temperature: float, with_entropy: bool,
                            chunk_size: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """:func:`logprob_partials_torch` on the chunked core (float32 logit blocks, the Triton statistics
    kernel of :mod:`sod_kernels.core.kernels`); float32 partials."""
    from ..core.kernels import NUM_WARPS, cap_arg, logprob_partial_stats_kernel, vocab_splits
    from ..core.loop import DeviceBlocks, longest_chunk, run_chunks
    from ..logprobs.triton_backend import LogprobProblem

    p = LogprobProblem.build(hidden, weight, bias, row_index, y_local, temperature)
    V, Na, dev = p.head.vocab, p.n_rows, hidden.device
    out = torch.zeros(LOGPROB_PARTIALS + int(with_entropy), Na, dtype=torch.float32, device=dev)

    def epilogue(c):
        start, stop, n, x = c.start, c.stop, c.size, c.logits[0]
        block, cols_per_split, splits = vocab_splits(n, V)
        part = torch.empty(3, n, splits, dtype=torch.float32, device=dev)
        logprob_partial_stats_kernel[(n, splits)](
            x, x if p.head.bias is None else p.head.bias, part, n, V, x.stride(0), cols_per_split, splits,
            1.0 / temperature, cap_arg(softcap), HAS_BIAS=p.head.bias is not None, WITH_ENTROPY=with_entropy,
            BLOCK_V=block, HAS_CAP=softcap is not None, num_warps=NUM_WARPS)
        local, owned = owned_targets(p.target_ids[c.rows], 0, V)
        zy = _target_logit(x, local, owned)
        if p.head.bias is not None:
            zy = torch.where(owned, zy + p.head.bias[local.clamp(0, V - 1)].float(), zy)
        full = torch.stack([part[0], part[1], torch.zeros_like(part[0])] + ([part[2]] if with_entropy else []))
        merged = combine_logprob(full, with_entropy)
        merged[2] = apply_softcap(zy, softcap) / temperature
        out[:, start:stop] = merged

    chunks = p.chunks(False, chunk_size)
    run_chunks(chunks, DeviceBlocks((p.head,), p.row_index, p.contiguous, longest_chunk(chunks)), epilogue)
    return out
