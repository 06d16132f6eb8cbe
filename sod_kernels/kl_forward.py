"""Forward kernels of the vocabulary-wide divergence (SPEC section 3): split tiles + split merge.

``kl_forward_kernel`` -- one program per (row block of ``BLOCK_M`` distilled rows, vocabulary split).
The rows are gathered through ``row_index``.  A program sweeps its split in ``BLOCK_V``-column tiles; for
each tile it runs two K-loops of ``tl.dot`` (student over Hs, teacher over Ht, fp32 accumulators),
scales by 1/temperature, adds the biases, and updates per row, entirely in registers:

- the student's running max ``m_s`` and rescaled sum ``l_s = sum exp(z_s - m_s)``, same for the teacher;
- the KL accumulator under the same rescaling: reverse KL ``A = sum exp(z_s - m_s) (z_s - z_t)``
  (forward KL: ``A = sum exp(z_t - m_t) (z_t - z_s)``);
- the logits of the sampled token ``y`` when the tile holds it (only one split does).

It writes ``NUM_PARTIALS = 7`` floats per (row, split) to ``partial [7, splits, Na]`` (float32).
``kl_merge_kernel`` then combines the splits with log-sum-exp algebra (rescale every partial sum and
accumulator to the common max): ``lse = M + log L``, reverse KL ``D = A / L_s - lse_s + lse_t``, forward KL
``D = A / L_t - lse_t + lse_s``, ``log p(y) = z(y) - lse``.  Only the first ``vocab = Vs`` teacher rows are
read (a padded teacher weight is never copied or sliced).

Design, with the headline size (N = 16384, Hs = 1024, Ht = 2560, V = 151936, bf16) in mind:

- FLOPs: ``2 N V (Hs + Ht)`` = 17.8 TFLOP... of which none is wasted (the two products are all there
  is); the online softmax/KL epilogue is ~15 flops per logit pair, <1% of the 7168 flops per pair of
  the two K-loops.
- Bytes: a 128 x 128 tile with K = Hs + Ht = 3584 loads (128 + 128) * 3584 * 2 B = 1.8 MB for
  2 * 128 * 128 * 3584 = 117 MFLOP: 64 FLOP/B.  The H100 needs ~260 FLOP/B from HBM (790 TFLOP/s over
  3 TB/s), so the operands must come from L2.  With the grouped ordering (:func:`kl_tiles.grouped_program`)
  the ~132 resident programs cover ``~132 / splits`` row blocks x all splits: their hidden states
  (0.9 MB per 128-row block) stay in L2 while they sweep, and each weight tile is fetched from HBM once
  per group of row blocks rather than once per row block.  HBM traffic is then about
  ``(V (Hs + Ht) * 2 B) * (row blocks / resident row blocks) + N (Hs + Ht) * 2 B``, ~5 GB at the headline
  size (~2 ms at 3 TB/s) against ~11 ms of tensor-core time at 790 TFLOP/s: compute bound.
  Without the grouping each program would stream its split's weights alone and the hidden states would be
  re-read from HBM once per vocabulary tile (~140 GB).
- Registers: the student tile stays live through the teacher K-loop, so two fp32 accumulators of
  ``BLOCK_M x BLOCK_V``: 128 x 128 over 8 warps is 64 + 64 registers per thread (128 x 256 would spill).
  BLOCK_M >= 64 per warpgroup and num_warps a multiple of 4 let Triton emit HGMMA on Hopper.
- Splits: the vocabulary is split so that ``row blocks x splits`` is a few waves of programs (small N
  still fills the GPU).  The partials cost ``7 * splits * Na`` floats: O(tokens), never O(tokens x V).
- The merge kernel reads ``7 * splits`` floats per row and writes 3-5: negligible.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kl_tiles import grouped_program, logit_tile

# Rows of the partial-statistics buffer ``partial[NUM_PARTIALS, splits, Na]``.
P_MAX_S, P_SUM_S, P_MAX_T, P_SUM_T, P_ACC, P_ZY_S, P_ZY_T = range(7)
NUM_PARTIALS = 7


@triton.jit
def kl_forward_kernel(sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, row_index_ptr, target_ptr, partial_ptr,
                      n_rows, vocab, hs, ht, stride_sh, stride_sw, stride_th, stride_tw, tiles_per_split,
                      num_splits, inv_temp,
                      HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
                      FORWARD_KL: tl.constexpr, EVEN_HS: tl.constexpr, EVEN_HT: tl.constexpr,
                      CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Partial softmax/KL statistics of one (row block, vocabulary split).

    sh ``[N, Hs]``, sw ``[Vs, Hs]``, sb ``[Vs]``, th ``[N, Ht]``, tw ``[Vt, Ht]``, tb ``[Vt]`` (input dtype;
    biases read only if HAS_*BIAS); row_index ``[n_rows]`` int64; target ``[N]`` int64 (if HAS_TARGET);
    partial ``[NUM_PARTIALS, num_splits, n_rows]`` float32, written.  ``vocab`` = Vs.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    row_block, split = grouped_program(pid, num_row_blocks, num_splits, GROUP_M)

    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = tl.load(row_index_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    if HAS_TARGET:
        y = tl.load(target_ptr + rows)

    neg_inf = float("-inf")
    m_s = tl.full((BLOCK_M,), neg_inf, tl.float32)
    m_t = tl.full((BLOCK_M,), neg_inf, tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    zy_s = tl.zeros((BLOCK_M,), tl.float32)
    zy_t = tl.zeros((BLOCK_M,), tl.float32)

    v_begin = split * tiles_per_split * BLOCK_V
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(vocab - v_begin, BLOCK_V))
    for tile in range(0, n_tiles):
        offs_v = v_begin + tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < vocab
        safe_v = tl.minimum(offs_v, vocab - 1)
        zs = logit_tile(sh_ptr, rows, stride_sh, sw_ptr, safe_v, stride_sw, sb_ptr, hs, inv_temp,
                        HAS_SBIAS, EVEN_HS, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        zt = logit_tile(th_ptr, rows, stride_th, tw_ptr, safe_v, stride_tw, tb_ptr, ht, inv_temp,
                        HAS_TBIAS, EVEN_HT, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        zs = tl.where(v_ok[None, :], zs, neg_inf)
        zt = tl.where(v_ok[None, :], zt, neg_inf)
        m_s_new = tl.maximum(m_s, tl.max(zs, axis=1))
        m_t_new = tl.maximum(m_t, tl.max(zt, axis=1))
        alpha_s = tl.exp(m_s - m_s_new)
        alpha_t = tl.exp(m_t - m_t_new)
        e_s = tl.exp(zs - m_s_new[:, None])
        e_t = tl.exp(zt - m_t_new[:, None])
        l_s = l_s * alpha_s + tl.sum(e_s, axis=1)
        l_t = l_t * alpha_t + tl.sum(e_t, axis=1)
        diff = tl.where(v_ok[None, :], zs - zt, 0.0)
        if FORWARD_KL:
            acc = acc * alpha_t - tl.sum(e_t * diff, axis=1)
        else:
            acc = acc * alpha_s + tl.sum(e_s * diff, axis=1)
        m_s = m_s_new
        m_t = m_t_new
        if HAS_TARGET:
            hit = offs_v[None, :] == y[:, None]
            zy_s += tl.sum(tl.where(hit, zs, 0.0), axis=1)
            zy_t += tl.sum(tl.where(hit, zt, 0.0), axis=1)

    out = partial_ptr + split.to(tl.int64) * n_rows + offs_m
    plane = num_splits.to(tl.int64) * n_rows
    tl.store(out + P_MAX_S * plane, m_s, mask=row_ok)
    tl.store(out + P_SUM_S * plane, l_s, mask=row_ok)
    tl.store(out + P_MAX_T * plane, m_t, mask=row_ok)
    tl.store(out + P_SUM_T * plane, l_t, mask=row_ok)
    tl.store(out + P_ACC * plane, acc, mask=row_ok)
    if HAS_TARGET:
        tl.store(out + P_ZY_S * plane, zy_s, mask=row_ok)
        tl.store(out + P_ZY_T * plane, zy_t, mask=row_ok)


@triton.jit
def kl_merge_kernel(partial_ptr, d_ptr, lse_s_ptr, lse_t_ptr, lp_s_ptr, lp_t_ptr, n_rows, num_splits,
                    HAS_TARGET: tl.constexpr, FORWARD_KL: tl.constexpr, BLOCK_R: tl.constexpr):
    """Merge ``partial [NUM_PARTIALS, num_splits, n_rows]`` into D, lse_s, lse_t (and log p(y)), each
    ``[n_rows]`` float32, with log-sum-exp algebra over the splits."""
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < n_rows
    plane = num_splits.to(tl.int64) * n_rows
    neg_inf = float("-inf")
    m_s = tl.full((BLOCK_R,), neg_inf, tl.float32)
    m_t = tl.full((BLOCK_R,), neg_inf, tl.float32)
    l_s = tl.zeros((BLOCK_R,), tl.float32)
    l_t = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    zy_s = tl.zeros((BLOCK_R,), tl.float32)
    zy_t = tl.zeros((BLOCK_R,), tl.float32)
    for split in range(0, num_splits):
        src = partial_ptr + split.to(tl.int64) * n_rows + offs
        pm_s = tl.load(src + P_MAX_S * plane, mask=ok, other=0.0)
        pm_t = tl.load(src + P_MAX_T * plane, mask=ok, other=0.0)
        new_s = tl.maximum(m_s, pm_s)
        new_t = tl.maximum(m_t, pm_t)
        old_scale_s = tl.exp(m_s - new_s)
        old_scale_t = tl.exp(m_t - new_t)
        part_scale_s = tl.exp(pm_s - new_s)
        part_scale_t = tl.exp(pm_t - new_t)
        l_s = l_s * old_scale_s + tl.load(src + P_SUM_S * plane, mask=ok, other=0.0) * part_scale_s
        l_t = l_t * old_scale_t + tl.load(src + P_SUM_T * plane, mask=ok, other=0.0) * part_scale_t
        p_acc = tl.load(src + P_ACC * plane, mask=ok, other=0.0)
        if FORWARD_KL:
            acc = acc * old_scale_t + p_acc * part_scale_t
        else:
            acc = acc * old_scale_s + p_acc * part_scale_s
        m_s = new_s
        m_t = new_t
        if HAS_TARGET:
            zy_s += tl.load(src + P_ZY_S * plane, mask=ok, other=0.0)
            zy_t += tl.load(src + P_ZY_T * plane, mask=ok, other=0.0)
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    if FORWARD_KL:
        d = acc / l_t - lse_t + lse_s
    else:
        d = acc / l_s - lse_s + lse_t
    tl.store(d_ptr + offs, d, mask=ok)
    tl.store(lse_s_ptr + offs, lse_s, mask=ok)
    tl.store(lse_t_ptr + offs, lse_t, mask=ok)
    if HAS_TARGET:
        tl.store(lp_s_ptr + offs, zy_s - lse_s, mask=ok)
        tl.store(lp_t_ptr + offs, zy_t - lse_t, mask=ok)
