"""The KL loss's epilogue on the chunked core: per-row statistics and ``d(logits)`` of a logit block.

Input: the raw float32 logit blocks ``xs [C, V]`` (student) and ``xt [C, V]`` (teacher, first ``V`` columns)
of one row chunk, as :func:`sod_kernels.core.chunks.logits_into` writes them.  Biases, the optional
soft-cap of each model and ``1/tau`` are applied on load: ``z = (x + b) / tau``, or with a cap ``c``
``z = c tanh((x + b) / c) / tau`` (tanh from one exponential, ``e = exp(-2|u|)``, and the student's
``d(logits)`` times the slope ``1 - tanh^2 = 4 e / (1 + e)^2``).  W is the model whose probabilities weight
the KL sum (the student for reverse KL, the teacher for forward KL), O the other.

- ``kl_partial_stats_kernel`` (grid: rows x vocabulary splits) sweeps its columns in ``BLOCK_V`` blocks with
  an online log-sum-exp for both models and the KL accumulator in the max-shifted frame
  ``A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o))`` (rescaled and re-framed when a max moves), and
  writes 5 floats per (row, split).  :func:`kl_row_stats` merges the splits with the same algebra in a few
  O(C x splits) tensor ops.  Then ``D = A'/L_w - log L_w + log L_o`` (docs/math.md, with nothing of size
  O(log V) subtracted from anything large) and, for the gradient, ``c' = A'/L_w``.
- ``kl_logit_grad_kernel`` (grid: rows x column blocks) writes ``d(logits) = scale_row * g`` in the gradient
  dtype, with ``g = p_s ((z_s - M_s) - (z_t - M_t) - c')`` for reverse KL (the shifted form of
  ``p_s (log p_s - log p_t - D)``: no O(log V) quantity is subtracted; each term still carries the float32
  rounding of the logits, about one ulp of the largest logit per token: docs/math.md) and ``g = p_s - p_t`` for
  forward KL.  ``scale_row`` already holds ``dL/dD / tau``.  With ``HAS_HARD`` it adds the hard-label term
  ``hard_row (p_s - onehot(y_row))`` (:func:`add_hard_label`: the onehot is a comparison of the block's column
  indices with the row's target, no scatter, no atomics; ``hard_row`` is ``lambda / (normalizer tau)`` in the
  single pass or ``-dL/dlogp_s(y) / tau`` in the two-pass backward), before the cap's slope.

- ``kl_row_finish_kernel`` (grid ``(1,)`` per chunk, the single pass): everything between a chunk's statistics and
  its ``d(logits)`` in one launch (:func:`kl_row_finish`): the split merge (:func:`merge_kl_splits`, the same
  algebra as :func:`merge_kl_partials`), ``D``, the frame, the sampled log-probs (the targets' logits gathered
  from the float32 blocks, bias, cap and ``1/tau`` applied), the rows' weights (given, 1, or the step weights of a
  chunk of whole steps: float64 prefix sums of the clamped signal in a fixed order, step means, ``d_1`` from the
  call's step-means buffer or recomputed when the first step is in the chunk), the chunk's ``sum w D`` and
  ``sum -logp_s(y)`` into a per-chunk float64 slot, and the per-row gradient scale.  Per-row results are written
  straight into the call's output buffers at the chunk's offset.  It replaces ~30-60 small tensor operations
  (each a launch and a gap on a GPU) and the host synchronisations of a torch epilogue.

The generalized JSD's kernels (same loaders, same hard-label term) are in :mod:`sod_kernels.dense.jsd_kernels`.

Both kernels are bandwidth bound: the statistics read ``8 C V`` bytes, the gradient reads ``8 C V`` and
writes ``2 C V`` (16-bit gradient) bytes; about ``5 C V`` exponentials in all.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, MIN_LOGIT, NUM_WARPS, STATS_BLOCK_V, bias_arg, cap_arg,
                            interpreting, load_capped_logits, load_logits_and_slope, vocab_splits)

NUM_PARTIALS = 5


# ------------------------------------------------------------------------------------- statistics grid
# The statistics kernels' grid (rows x vocabulary splits), sized for the GPU's resident programs.  At the headline
# chunk (C = 512 rows, V = 151936, BLOCK_V = 2048: 75 column blocks per row) the generic choice
# (core.kernels.vocab_splits: 1024 programs, 2 splits of 38 blocks) is 1.29 waves of the 792 programs an H100/H200
# holds at once (132 SMs x 6: kl_partial_stats_kernel has 40 registers x 256 threads, so 6 programs fit an SM's
# 65536 registers): the second wave runs 29% full, ~35% of the kernel's time with most SMs idle.
# balanced_splits picks the split count among those giving at least STATS_MIN_WAVES waves (up to 3x that many
# splits, at most STATS_MAX_SPLITS) that minimises the modelled time ceil(programs / resident) x blocks per
# program against the ideal C x blocks / resident: 15 splits of 5 blocks at the headline, 7680 programs = 9.7 waves,
# 97% of the ideal (equal programs: 75 = 15 x 5).  The row-finish kernel merges the splits (15 x 5 floats per row);
# the partials are 5 x 512 x 15 floats (150 KB).  The JSD's partial sums kernel (75-80 registers: 3 programs per
# SM) gets its own count the same way.
STATS_SMS = 132              # H100 / H200; the device's own count when it is a CUDA device
KL_STATS_PROGRAMS_PER_SM = 6
STATS_MIN_WAVES = 4
STATS_MAX_SPLITS = 32


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return STATS_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``STATS_SMS`` for a non-CUDA device); no synchronisation."""
    if device.type != "cuda":
        return STATS_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=256)
def _balanced(n_rows: int, n_blocks: int, resident: int) -> tuple[int, int]:
    """``(blocks per split, splits)`` for ``n_rows`` rows of ``n_blocks`` column blocks on ``resident`` programs."""
    rows = max(n_rows, 1)
    low = min(max(1, -(-STATS_MIN_WAVES * resident // rows)), n_blocks, STATS_MAX_SPLITS)
    best = None
    for wanted in range(low, min(3 * low, n_blocks, STATS_MAX_SPLITS) + 1):
        per = -(-n_blocks // wanted)
        splits = -(-n_blocks // per)
        modelled = -(-rows * splits // resident) * per  # waves x blocks per program
        if best is None or modelled < best[0]:
            best = (modelled, per, splits)
    return best[1], best[2]


def balanced_splits(n_rows: int, vocab: int, device: torch.device,
                    programs_per_sm: int = KL_STATS_PROGRAMS_PER_SM) -> tuple[int, int, int]:
    """``(BLOCK_V, columns per split, splits)`` of a statistics kernel over ``n_rows x vocab`` with
    ``programs_per_sm`` resident programs per SM (see the comment above: >= ``STATS_MIN_WAVES`` waves, the last
    one as full as the candidates allow); under the interpreter :func:`sod_kernels.core.kernels.vocab_splits`
    (tiny blocks, two splits)."""
    if interpreting():
        return vocab_splits(n_rows, vocab)
    block = STATS_BLOCK_V
    n_blocks = max(triton.cdiv(vocab, block), 1)
    per, splits = _balanced(n_rows, n_blocks, sm_count(device) * programs_per_sm)
    return block, per * block, splits


@triton.jit
def kl_orientation(zs, zt, FORWARD_KL: tl.constexpr):
    """``(z_w, z_o)``: the logits of the model whose probabilities weigh the KL (the teacher's for the forward KL,
    the student's for the reverse KL) and the other model's."""
    if FORWARD_KL:
        z_w = zt
        z_o = zs
    else:
        z_w = zs
        z_o = zt
    return z_w, z_o


@triton.jit
def kl_partial_stats_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, part_ptr, n_rows, vocab, stride_xs, stride_xt,
                            cols_per_split, num_splits, inv_temp, scap, tcap, HAS_SBIAS: tl.constexpr,
                            HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr, BLOCK_V: tl.constexpr,
                            HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr):
    """``part [5, n_rows, num_splits]`` float32 <- (m_w, l_w, m_o, l_o, A') of one (row, split)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    xt_row = xt_ptr + row.to(tl.int64) * stride_xt
    v_begin = split * cols_per_split
    offs = tl.arange(0, BLOCK_V)
    m_w = -1e30
    m_o = -1e30
    l_w = 0.0
    l_o = 0.0
    acc = 0.0
    for start in range(0, cols_per_split, BLOCK_V):
        cols = v_begin + start + offs
        ok = cols < vocab
        zs = tl.where(ok, load_capped_logits(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS, HAS_SCAP),
                      MIN_LOGIT)
        zt = tl.where(ok, load_capped_logits(xt_row, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS, HAS_TCAP),
                      MIN_LOGIT)
        z_w, z_o = kl_orientation(zs, zt, FORWARD_KL)
        new_w = tl.maximum(m_w, tl.max(z_w, axis=0))
        new_o = tl.maximum(m_o, tl.max(z_o, axis=0))
        alpha_w = tl.exp(m_w - new_w)
        # Re-frame A' to the new maxima, then add this block's terms.
        acc = alpha_w * (acc + l_w * ((m_w - new_w) - (m_o - new_o)))
        l_w = l_w * alpha_w
        l_o = l_o * tl.exp(m_o - new_o)
        e_w = tl.exp(z_w - new_w)
        l_w += tl.sum(e_w, axis=0)
        l_o += tl.sum(tl.exp(z_o - new_o), axis=0)
        acc += tl.sum(e_w * ((z_w - new_w) - (z_o - new_o)), axis=0)
        m_w = new_w
        m_o = new_o
    out = part_ptr + row * num_splits + split
    plane = n_rows * num_splits
    tl.store(out, m_w)
    tl.store(out + plane, l_w)
    tl.store(out + 2 * plane, m_o)
    tl.store(out + 3 * plane, l_o)
    tl.store(out + 4 * plane, acc)


@triton.jit
def add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr):
    """``g + hard[row] (p_s - onehot(target[row]))`` over the block's columns ``cols``: the gradient of
    ``-hard[row] * logp_s(target)`` w.r.t. the (temperature-scaled) student logits; ``target [rows]`` int32
    is relative to the block's first column (a target outside the block matches no column)."""
    y = tl.load(target_ptr + row)
    return g + tl.load(hard_ptr + row) * (p_s - tl.where(cols == y, 1.0, 0.0))


@triton.jit
def kl_logit_grad_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, grad_ptr, max_s_ptr, lse_s_ptr, max_t_ptr, lse_t_ptr,
                         centre_ptr, scale_ptr, target_ptr, hard_ptr, vocab, stride_xs, stride_xt, stride_g,
                         inv_temp, scap, tcap, HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                         FORWARD_KL: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SCAP: tl.constexpr,
                         HAS_TCAP: tl.constexpr, HAS_HARD: tl.constexpr):
    """``grad[row, cols] = scale[row] * g`` (see the module docstring; plus the hard-label term with
    ``HAS_HARD``), in ``grad``'s dtype; with a student soft-cap the sum is multiplied by the cap's slope
    ``dz/dx``."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    zs, slope = load_logits_and_slope(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS, HAS_SCAP)
    zt = load_capped_logits(xt_ptr + row.to(tl.int64) * stride_xt, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS,
                             HAS_TCAP)
    scale = tl.load(scale_ptr + row)
    p_s = tl.exp(zs - tl.load(lse_s_ptr + row))
    if FORWARD_KL:
        g = p_s - tl.exp(zt - tl.load(lse_t_ptr + row))
    else:
        centred = (zs - tl.load(max_s_ptr + row)) - (zt - tl.load(max_t_ptr + row)) - tl.load(centre_ptr + row)
        g = p_s * centred
    g = g * scale
    if HAS_HARD:
        g = add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr)
    if HAS_SCAP:
        g = g * slope
    g = tl.where(ok, g, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)



# ------------------------------------------------------------------------------------------- row finish
# Rows per block of the row-finish kernel: one program walks a chunk's rows in blocks of this many (512 rows: two
# per thread at 8 warps); under the interpreter tiny blocks, so small tests cross block boundaries.
FINISH_BLOCK_R = 512
INTERPRETER_FINISH_BLOCK_R = 8
FINISH_NUM_WARPS = 8
WEIGHTS_NONE, WEIGHTS_GIVEN, WEIGHTS_STEPS = 0, 1, 2


@triton.jit
def merge_kl_splits(part_ptr, rows, ok, n_rows, num_splits):
    """Merge the ``[5, n_rows, num_splits]`` partials (m_w, l_w, m_o, l_o, A') of ``rows`` (a scalar or a
    vector, masked by ``ok``) over the splits in a fixed order: ``(M_w, L_w, M_o, L_o, A)`` with the maxima
    ``M`` over the splits, the sums ``L = sum_s l_s exp(m_s - M)`` and the accumulator re-framed to the
    common maxima, ``A = sum_s exp(m_w,s - M_w) (A'_s + l_w,s ((m_w,s - M_w) - (m_o,s - M_o)))``."""
    plane = n_rows * num_splits
    base = part_ptr + rows * num_splits
    big_w = tl.load(base, mask=ok, other=0.0)
    big_o = tl.load(base + 2 * plane, mask=ok, other=0.0)
    for s in range(1, num_splits):
        big_w = tl.maximum(big_w, tl.load(base + s, mask=ok, other=0.0))
        big_o = tl.maximum(big_o, tl.load(base + 2 * plane + s, mask=ok, other=0.0))
    sum_w = big_w * 0.0
    sum_o = big_w * 0.0
    acc = big_w * 0.0
    for s in range(0, num_splits):
        shift_w = tl.load(base + s, mask=ok, other=0.0) - big_w
        shift_o = tl.load(base + 2 * plane + s, mask=ok, other=0.0) - big_o
        l_w = tl.load(base + plane + s, mask=ok, other=0.0)
        scale_w = tl.exp(shift_w)
        sum_w += l_w * scale_w
        sum_o += tl.load(base + 3 * plane + s, mask=ok, other=0.0) * tl.exp(shift_o)
        acc += scale_w * (tl.load(base + 4 * plane + s, mask=ok, other=0.0) + l_w * (shift_w - shift_o))
    return big_w, sum_w, big_o, sum_o, acc


@triton.jit
def step_mean(prefix_ptr, bounds_ptr, step, chunk_start, ok):
    """``d_k`` (float64) of the steps ``step`` of a chunk of whole steps: ``(P[b1] - P[b0]) / (b1 - b0)`` with the
    chunk's prefix sums ``P`` of the clamped signal and the step's bounds relative to the chunk start."""
    b0 = tl.load(bounds_ptr + step, mask=ok, other=0) - chunk_start
    b1 = tl.load(bounds_ptr + step + 1, mask=ok, other=1) - chunk_start
    total = tl.load(prefix_ptr + b1, mask=ok, other=0.0) - tl.load(prefix_ptr + b0, mask=ok, other=0.0)
    return total / (b1 - b0).to(tl.float64), b0


@triton.jit
def kl_row_finish_kernel(part_ptr, jpart_ptr, num_splits, jsd_splits, xs_ptr, xt_ptr, sb_ptr, tb_ptr, y_ptr,
                         stride_xs, stride_xt, d_ptr, lse_s_ptr, lse_t_ptr, frame_ptr, frame_plane, lp_s_ptr, lp_t_ptr,
                         w_ptr, step_ptr, bounds_ptr, first_ptr, means_ptr, prefix_ptr, params_ptr, scale_ptr, slot_ptr,
                         slot_plane, n_rows, chunk_start, chunk_step0, inv_temp, scap, tcap, beta,
                         FORWARD_KL: tl.constexpr, JSD: tl.constexpr, HAS_TARGETS: tl.constexpr,
                         SAMPLED_SIGNAL: tl.constexpr, HAS_HARD: tl.constexpr, WEIGHTS: tl.constexpr,
                         HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_SCAP: tl.constexpr,
                         HAS_TCAP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Everything a chunk needs between its statistics and its ``d(logits)``, in one program (grid ``(1,)``).

    Pointers at the chunk's first row: ``d, lse_s, lse_t, lp_s, lp_t [n_rows]``, ``frame [3, .]`` (plane stride
    ``frame_plane``: max_s, max_t, centre), ``y [n_rows]`` (targets), ``w [n_rows]`` (given weights),
    ``step [n_rows]`` (step ordinals), ``scale [n_rows]`` (out: the rows' ``w * grad_scale`` for the gradient
    kernel), ``slot`` (out: the chunk's ``sum w D`` and ``sum -lp_s``, float64, plane stride ``slot_plane``).
    Whole-call tensors: ``bounds [S + 1]``, ``first [S]`` (ordinal of each step's sequence's first step),
    ``means [S]`` float64 (the step means: read for first steps of earlier chunks, written for this chunk's),
    ``params`` float64 ``(epsilon, delta, grad_scale)``, ``prefix [n_rows + 1]`` float64 scratch.
    KL: merges the statistics kernel's ``part [5, n_rows, num_splits]``; JSD: ``lse_s``, ``lse_t`` and the
    frame's maxima were written by the JSD partial kernel, which leaves ``jpart [4, n_rows, jsd_splits]`` here.
    """
    offs = tl.arange(0, BLOCK_R)
    zero64 = tl.zeros([BLOCK_R], dtype=tl.float64)
    soft = tl.sum(zero64, axis=0)
    hard = tl.sum(zero64, axis=0)
    carry = tl.sum(zero64, axis=0)
    grad_scale = tl.load(params_ptr + 2)
    if WEIGHTS == 2:
        tl.store(prefix_ptr, carry)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + offs
        ok = rows < n_rows
        if JSD:
            lse_s = tl.load(lse_s_ptr + rows, mask=ok, other=0.0)
            lse_t = tl.load(lse_t_ptr + rows, mask=ok, other=0.0)
            plane = n_rows * jsd_splits
            base = jpart_ptr + rows * jsd_splits
            s_t = tl.zeros([BLOCK_R], dtype=tl.float32)
            s_s = tl.zeros([BLOCK_R], dtype=tl.float32)
            mass_t = tl.zeros([BLOCK_R], dtype=tl.float32)
            mass_s = tl.zeros([BLOCK_R], dtype=tl.float32)
            for s in range(0, jsd_splits):
                s_t += tl.load(base + s, mask=ok, other=0.0)
                s_s += tl.load(base + plane + s, mask=ok, other=0.0)
                mass_t += tl.load(base + 2 * plane + s, mask=ok, other=1.0)
                mass_s += tl.load(base + 3 * plane + s, mask=ok, other=1.0)
            centre = s_s / mass_s
            D = beta * (s_t / mass_t) + (1.0 - beta) * centre
        else:
            big_w, sum_w, big_o, sum_o, acc = merge_kl_splits(part_ptr, rows, ok, n_rows, num_splits)
            sum_w = tl.where(ok, sum_w, 1.0)
            sum_o = tl.where(ok, sum_o, 1.0)
            centre = acc / sum_w
            log_w = tl.log(sum_w)
            log_o = tl.log(sum_o)
            D = centre - log_w + log_o
            if FORWARD_KL:
                lse_s = big_o + log_o
                lse_t = big_w + log_w
                max_s = big_o
                max_t = big_w
            else:
                lse_s = big_w + log_w
                lse_t = big_o + log_o
                max_s = big_w
                max_t = big_o
            tl.store(lse_s_ptr + rows, lse_s, mask=ok)
            tl.store(lse_t_ptr + rows, lse_t, mask=ok)
            tl.store(frame_ptr + rows, max_s, mask=ok)
            tl.store(frame_ptr + frame_plane + rows, max_t, mask=ok)
        tl.store(frame_ptr + 2 * frame_plane + rows, centre, mask=ok)
        tl.store(d_ptr + rows, D, mask=ok)
        if HAS_TARGETS:
            y = tl.load(y_ptr + rows, mask=ok, other=0)
            zs = load_capped_logits(xs_ptr + rows.to(tl.int64) * stride_xs, sb_ptr, y, ok, inv_temp, scap, HAS_SBIAS,
                                    HAS_SCAP)
            zt = load_capped_logits(xt_ptr + rows.to(tl.int64) * stride_xt, tb_ptr, y, ok, inv_temp, tcap, HAS_TBIAS,
                                    HAS_TCAP)
            lp_s = zs - lse_s
            lp_t = zt - lse_t
            tl.store(lp_s_ptr + rows, lp_s, mask=ok)
            tl.store(lp_t_ptr + rows, lp_t, mask=ok)
            if HAS_HARD:
                hard += tl.sum(tl.where(ok, -lp_s.to(tl.float64), 0.0), axis=0)
        if WEIGHTS == 2:
            if SAMPLED_SIGNAL:
                signal = tl.abs(lp_s - lp_t)
            else:
                signal = D
            x = tl.where(ok, tl.maximum(signal.to(tl.float64), 0.0), 0.0)
            csum = tl.cumsum(x, axis=0) + carry
            tl.store(prefix_ptr + 1 + rows, csum, mask=ok)
            carry = tl.sum(tl.where(offs == BLOCK_R - 1, csum, 0.0), axis=0)
        else:
            if WEIGHTS == 1:
                w = tl.load(w_ptr + rows, mask=ok, other=0.0).to(tl.float64)
            else:
                w = zero64 + 1.0
            soft += tl.sum(tl.where(ok, w * D.to(tl.float64), 0.0), axis=0)
            tl.store(scale_ptr + rows, (w * grad_scale).to(tl.float32), mask=ok)
    if WEIGHTS == 2:
        tl.debug_barrier()  # the prefix sums written above are read by other threads below
        epsilon = tl.load(params_ptr)
        cap = 1.0 + tl.load(params_ptr + 1)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + offs
            ok = rows < n_rows
            step = tl.load(step_ptr + rows, mask=ok, other=0)
            d_k, b0 = step_mean(prefix_ptr, bounds_ptr, step, chunk_start, ok)
            first = tl.load(first_ptr + step, mask=ok, other=0)
            inside = first >= chunk_step0
            d_1_here, _ = step_mean(prefix_ptr, bounds_ptr, first, chunk_start, ok & inside)
            d_1_before = tl.load(means_ptr + first, mask=ok & (first < chunk_step0), other=0.0)
            d_1 = tl.where(inside, d_1_here, d_1_before)
            w = tl.minimum((d_1 + epsilon) / (d_k + epsilon), cap)
            w = tl.where(first == step, 1.0, w)
            tl.store(means_ptr + step, d_k, mask=ok & (rows == b0))
            D = tl.load(d_ptr + rows, mask=ok, other=0.0)
            soft += tl.sum(tl.where(ok, w * D.to(tl.float64), 0.0), axis=0)
            tl.store(scale_ptr + rows, (w * grad_scale).to(tl.float32), mask=ok)
    tl.store(slot_ptr, soft)
    tl.store(slot_ptr + slot_plane, hard)


class KLRowStats(NamedTuple):
    """Per-row statistics of one chunk (each ``[C]`` float32).

    D: the divergence (unclamped); lse_s, lse_t: log-sum-exp of the temperature-scaled logits; max_s, max_t:
    their maxima (the frame of ``centre``); centre: ``c' = E_W[(z_w - M_w) - (z_o - M_o)]`` (for the
    generalized JSD, :mod:`sod_kernels.dense.jsd_kernels`: ``D`` is the JSD and ``centre = c = KL(p_s || M)``).
    """

    D: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    max_s: torch.Tensor
    max_t: torch.Tensor
    centre: torch.Tensor


def kl_partials(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                teacher_bias: torch.Tensor | None, *, forward_kl: bool, temperature: float,
                student_softcap: float | None = None, teacher_softcap: float | None = None) -> torch.Tensor:
    """Partial statistics ``[5, C, splits]`` float32 of the logit blocks ``xs``, ``xt`` (``[C, V]`` float32,
    unit column stride); biases ``[V]`` or None; soft-caps (``cap tanh((x + b) / cap)`` before ``1/tau``)
    or None.  Merge with :func:`merge_kl_partials` (partials of several column slices of the same rows may
    be concatenated along the last dimension first)."""
    n_rows, vocab = xs.shape
    block, cols_per_split, splits = balanced_splits(n_rows, vocab, xs.device)
    part = torch.empty((NUM_PARTIALS, n_rows, splits), dtype=torch.float32, device=xs.device)
    if n_rows:
        kl_partial_stats_kernel[(n_rows, splits)](
            xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), part, n_rows, vocab, xs.stride(0),
            xt.stride(0), cols_per_split, splits, 1.0 / temperature, cap_arg(student_softcap),
            cap_arg(teacher_softcap), HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None,
            FORWARD_KL=forward_kl, BLOCK_V=block, HAS_SCAP=student_softcap is not None,
            HAS_TCAP=teacher_softcap is not None, num_warps=NUM_WARPS)
    return part


def merge_kl_partials(part: torch.Tensor, *, forward_kl: bool) -> KLRowStats:
    """Merge ``[5, C, S]`` partials (m_w, l_w, m_o, l_o, A') into per-row :class:`KLRowStats`."""
    m_w, l_w, m_o, l_o, a = part.unbind(0)
    big_w, big_o = m_w.amax(1), m_o.amax(1)
    shift_w, shift_o = m_w - big_w[:, None], m_o - big_o[:, None]
    scale_w = shift_w.exp()
    sum_w = (l_w * scale_w).sum(1)
    sum_o = (l_o * shift_o.exp()).sum(1)
    centre = (scale_w * (a + l_w * (shift_w - shift_o))).sum(1) / sum_w
    log_w, log_o = sum_w.log(), sum_o.log()
    D = centre - log_w + log_o
    lse_w, lse_o = big_w + log_w, big_o + log_o
    if forward_kl:
        return KLRowStats(D, lse_o, lse_w, big_o, big_w, centre)
    return KLRowStats(D, lse_w, lse_o, big_w, big_o, centre)


def kl_row_stats(xs, xt, student_bias, teacher_bias, *, forward_kl: bool, temperature: float,
                 student_softcap: float | None = None, teacher_softcap: float | None = None) -> KLRowStats:
    """:func:`kl_partials` merged: the statistics of whole-vocabulary blocks."""
    part = kl_partials(xs, xt, student_bias, teacher_bias, forward_kl=forward_kl, temperature=temperature,
                       student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    return merge_kl_partials(part, forward_kl=forward_kl)


def hard_args(hard: tuple | None, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(target_ptr, hard_ptr)`` arguments of a gradient kernel: ``hard = (target [C] int32 relative to the
    block's first column, hard_scale [C] float32)`` made contiguous, or ``fallback`` twice (never read)."""
    if hard is None:
        return fallback, fallback
    target, hard_scale = hard
    return target.to(torch.int32).contiguous(), hard_scale.to(torch.float32).contiguous()


def kl_logit_grad(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                  teacher_bias: torch.Tensor | None, stats: KLRowStats, scale: torch.Tensor, out: torch.Tensor, *,
                  forward_kl: bool, temperature: float, student_softcap: float | None = None,
                  teacher_softcap: float | None = None, hard: tuple | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``scale[:, None] * dD/dz`` of each row, plus with
    ``hard = (target [C] int32, hard_scale [C] float32)`` the hard-label term ``hard_scale (p_s - onehot(target))``
    (``target`` relative to the block's first column), all times the student cap's slope ``dz/dx`` with
    ``student_softcap``; ``scale [C]`` float32."""
    n_rows, vocab = xs.shape
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    scale = scale.to(torch.float32).contiguous()
    target, hard_scale = hard_args(hard, scale)
    kl_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), out, stats.max_s, stats.lse_s,
        stats.max_t, stats.lse_t, stats.centre, scale, target, hard_scale, vocab, xs.stride(0),
        xt.stride(0), out.stride(0), 1.0 / temperature, cap_arg(student_softcap), cap_arg(teacher_softcap),
        HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None, FORWARD_KL=forward_kl,
        BLOCK_V=block, HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None,
        HAS_HARD=hard is not None, num_warps=NUM_WARPS)
    return out


class RowOutputs(NamedTuple):
    """Where :func:`kl_row_finish` writes a chunk's per-row results: views of the call's ``[Na]`` float32 buffers
    starting at the chunk's first row (no copies): ``D``, ``lse_s``, ``lse_t``, ``frame`` (``[3, .]``: max_s,
    max_t, centre), and the sampled log-probs ``lp_s``, ``lp_t`` (None without targets)."""

    D: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    frame: torch.Tensor
    lp_s: torch.Tensor | None
    lp_t: torch.Tensor | None


class ChunkWeightArgs(NamedTuple):
    """How :func:`kl_row_finish` forms the weights of a chunk's rows.

    mode: ``WEIGHTS_NONE`` (every weight 1), ``WEIGHTS_GIVEN`` (``given [C]`` float32 at the chunk) or
    ``WEIGHTS_STEPS`` (a chunk of whole steps: ``step [C]`` int64 step ordinals of its rows, the call's
    ``bounds [S + 1]`` int64 step start positions (``Na`` last), ``first_step [S]`` int64 ordinal of each step's
    sequence's first step, ``means [S]`` float64 step means buffer, ``chunk_start`` the chunk's first row,
    ``chunk_step0`` its first step's ordinal, ``prefix`` a float64 scratch of at least ``C + 1`` entries).
    ``params``: float64 ``[3]`` ``(epsilon, delta, grad_scale)`` (``grad_scale`` = ``dL/d(w D) / tau``)."""

    mode: int
    params: torch.Tensor
    given: torch.Tensor | None = None
    step: torch.Tensor | None = None
    bounds: torch.Tensor | None = None
    first_step: torch.Tensor | None = None
    means: torch.Tensor | None = None
    prefix: torch.Tensor | None = None
    chunk_start: int = 0
    chunk_step0: int = 0


def kl_row_finish(part: torch.Tensor, jsd_part: torch.Tensor | None, xs: torch.Tensor, xt: torch.Tensor,
                  student_bias: torch.Tensor | None, teacher_bias: torch.Tensor | None, targets: torch.Tensor | None,
                  out: RowOutputs, weights: ChunkWeightArgs, scale: torch.Tensor, slot: torch.Tensor, *,
                  forward_kl: bool, temperature: float, student_softcap: float | None = None,
                  teacher_softcap: float | None = None, jsd: bool = False, beta: float = 0.5,
                  sampled_signal: bool = False, hard: bool = False) -> None:
    """One launch (grid ``(1,)``) that finishes a chunk of ``C`` rows after its statistics kernel.

    Merges the split partials (``part [5, C, S]`` of :func:`kl_partials`; for the JSD ``jsd_part [4, C, S]`` of
    :func:`sod_kernels.dense.jsd_kernels.jsd_partials` with ``merge_stats``, which already wrote ``lse`` values and
    maxima), writes ``D``, ``lse`` values, frame and the sampled log-probs (``targets [C]`` int32, gathered from the
    float32 blocks ``xs``, ``xt`` with bias, cap and ``1/tau``) into ``out``, forms the rows' weights
    (``weights``), writes ``scale [C]`` float32 (``w * grad_scale``, the gradient kernel's per-row factor) and
    ``slot`` (a ``[2]`` float64 column of the call's ``[2, chunks]`` slots, plane stride ``slot.stride(0)``):
    ``sum w D`` and, with ``hard``, ``sum -lp_s``, both in a fixed order (deterministic, no atomics).
    ``sampled_signal``: step means of ``|lp_s - lp_t|`` instead of ``D``.

    Cost: ``O(C S)`` floats read and ``O(C)`` written, one program (``C / BLOCK_R`` sequential blocks, about
    10 us at 512 rows): it replaces the ~30-60 tensor operations (launches) per chunk of a torch epilogue.
    """
    n_rows = xs.shape[0]
    if not n_rows:
        return
    splits = part.shape[2]
    block = INTERPRETER_FINISH_BLOCK_R if interpreting() else FINISH_BLOCK_R
    f32 = out.D
    w = weights
    steps = w.mode == WEIGHTS_STEPS
    jsd_splits = splits if jsd_part is None else jsd_part.shape[2]
    kl_row_finish_kernel[(1,)](
        part, jsd_part if jsd_part is not None else part, splits, jsd_splits, xs, xt, bias_arg(student_bias, xs),
        bias_arg(teacher_bias, xt), targets if targets is not None else f32, xs.stride(0), xt.stride(0),
        out.D, out.lse_s, out.lse_t, out.frame, out.frame.stride(0),
        out.lp_s if out.lp_s is not None else f32, out.lp_t if out.lp_t is not None else f32,
        w.given if w.mode == WEIGHTS_GIVEN else f32, w.step if steps else f32, w.bounds if steps else f32,
        w.first_step if steps else f32, w.means if steps else w.params, w.prefix if steps else w.params, w.params,
        scale, slot, slot.stride(0), n_rows, int(w.chunk_start), int(w.chunk_step0), 1.0 / temperature,
        cap_arg(student_softcap), cap_arg(teacher_softcap), float(beta),
        FORWARD_KL=forward_kl, JSD=jsd, HAS_TARGETS=targets is not None, SAMPLED_SIGNAL=sampled_signal,
        HAS_HARD=hard, WEIGHTS=w.mode, HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None,
        HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None, BLOCK_R=block,
        num_warps=FINISH_NUM_WARPS)


def codegen_specs() -> list[dict]:
    """The two kernels at the headline launch (bf16 gradient blocks, with biases), plus the reverse-KL pair
    with both soft-caps and the hard-label term on, for ``benchmarks.codegen`` (sm_90 compile check:
    registers, no spills).  The JSD kernels list theirs in :func:`sod_kernels.dense.jsd_kernels.codegen_specs`."""
    vec = {"max_s_ptr": "*fp32", "lse_s_ptr": "*fp32", "max_t_ptr": "*fp32", "lse_t_ptr": "*fp32",
           "centre_ptr": "*fp32", "scale_ptr": "*fp32", "target_ptr": "*i32", "hard_ptr": "*fp32"}
    caps = {"scap": "fp32", "tcap": "fp32"}
    specs = []
    for forward_kl, capped in ((False, False), (True, False), (False, True)):
        tag = ("forward" if forward_kl else "reverse") + (" softcap" if capped else "")
        switches = {"HAS_SBIAS": True, "HAS_TBIAS": True, "FORWARD_KL": forward_kl, "HAS_SCAP": capped,
                    "HAS_TCAP": capped}
        specs.append({
            "name": f"kl_partial_stats_kernel[{tag} bv{STATS_BLOCK_V}]", "fn": kl_partial_stats_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_xs": "i32",
                          "stride_xt": "i32", "cols_per_split": "i32", "num_splits": "i32", "inv_temp": "fp32",
                          **caps},
            "constexprs": {**switches, "BLOCK_V": STATS_BLOCK_V},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "cols_per_split"],
        })
        specs.append({
            "name": f"kl_logit_grad_kernel[{tag} bv{GRAD_BLOCK_V}]", "fn": kl_logit_grad_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "grad_ptr": "*bf16", **vec, "vocab": "i32", "stride_xs": "i32", "stride_xt": "i32",
                          "stride_g": "i32", "inv_temp": "fp32", **caps},
            "constexprs": {**switches, "BLOCK_V": GRAD_BLOCK_V, "HAS_HARD": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "stride_g"],
        })
    finish = {"part_ptr": "*fp32", "jpart_ptr": "*fp32", "num_splits": "i32", "jsd_splits": "i32", "xs_ptr": "*fp32",
              "xt_ptr": "*fp32",
              "sb_ptr": "*bf16", "tb_ptr": "*bf16", "y_ptr": "*i32", "stride_xs": "i32", "stride_xt": "i32",
              "d_ptr": "*fp32", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "frame_ptr": "*fp32", "frame_plane": "i32",
              "lp_s_ptr": "*fp32", "lp_t_ptr": "*fp32", "w_ptr": "*fp32", "step_ptr": "*i64", "bounds_ptr": "*i64",
              "first_ptr": "*i64", "means_ptr": "*fp64", "prefix_ptr": "*fp64", "params_ptr": "*fp64",
              "scale_ptr": "*fp32", "slot_ptr": "*fp64", "slot_plane": "i32", "n_rows": "i32", "chunk_start": "i32",
              "chunk_step0": "i32", "inv_temp": "fp32", "scap": "fp32", "tcap": "fp32", "beta": "fp32"}
    # (tag, forward_kl, jsd, weights, sampled signal, hard term, caps): the step weights of both signals, given
    # weights and none, the JSD's finish, each model's cap.
    for tag, forward_kl, jsd, weights, sampled, hard, capped in (
            ("reverse kl-steps", False, False, WEIGHTS_STEPS, False, False, False),
            ("reverse sampled-steps hard softcap", False, False, WEIGHTS_STEPS, True, True, True),
            ("forward given", True, False, WEIGHTS_GIVEN, False, False, False),
            ("jsd none hard", False, True, WEIGHTS_NONE, False, True, False),
            ("jsd kl-steps softcap", False, True, WEIGHTS_STEPS, False, False, True)):
        specs.append({
            "name": f"kl_row_finish_kernel[{tag} br{FINISH_BLOCK_R}]", "fn": kl_row_finish_kernel,
            "signature": finish,
            "constexprs": {"FORWARD_KL": forward_kl, "JSD": jsd, "HAS_TARGETS": True, "SAMPLED_SIGNAL": sampled,
                           "HAS_HARD": hard, "WEIGHTS": weights, "HAS_SBIAS": True, "HAS_TBIAS": True,
                           "HAS_SCAP": capped, "HAS_TCAP": capped, "BLOCK_R": FINISH_BLOCK_R},
            "num_warps": FINISH_NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["stride_xs", "stride_xt", "frame_plane"],
        })
    return specs
