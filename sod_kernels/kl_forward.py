"""Forward kernels of the vocabulary-wide divergence (SPEC section 3): split tiles + split merge.

``kl_forward_kernel`` -- one program per (row block of ``BLOCK_M`` distilled rows, vocabulary split).
The rows are gathered through ``row_index``.  A program sweeps its split in ``BLOCK_V``-column tiles; for
each tile it runs two K-loops of ``tl.dot`` (student over Hs, teacher over Ht, fp32 accumulators),
scales by 1/temperature, adds the biases, and updates per row, entirely in registers, for the model W
whose probabilities weight the KL sum (the student for reverse KL, the teacher for forward KL) and the
other model O:

- running maxima ``m_w, m_o`` and rescaled sums ``l_w = sum exp(z_w - m_w)``, ``l_o`` (online log-sum-exp);
- the KL accumulator under the same rescaling, kept in the max-shifted frame
  ``A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o))``.  This is SPEC's
  ``A = sum exp(z_w - m_w) (z_w - z_o)`` minus ``(m_w - m_o) l_w`` -- the same quantity, shifted so that
  constant offsets between the two models' logits never enter the sum; when a max moves, ``A'`` is
  rescaled by ``exp(m_w - m_w_new)`` and shifted by the frame change times ``l_w``.

It writes ``NUM_PARTIALS = 5`` floats per (row, split) to ``partial [5, splits, Na]`` (float32).
``kl_merge_kernel`` combines the splits with the same algebra (rescale every partial sum and accumulator
to the common maxima): ``lse = M + log L``, and SPEC's ``D = A / L_w - lse_w + lse_o``, evaluated as
``A' / L_w - ((lse_w - lse_o) - (M_w - M_o))`` (reverse KL: W = student; forward KL: W = teacher).  It also
computes the sampled tokens' log-probabilities ``z(y) - lse`` from one gathered dot product per row and
model (``kl_tiles.gathered_logit``), which keeps the target out of the tile loop (in the tile loop the
hit-test tile cost 18 spilled registers).  Only the first ``vocab = Vs`` teacher rows are read (a padded
teacher weight is never copied or sliced).

Design, with the headline size (N = 16384, Hs = 1024, Ht = 2560, V = 151936, bf16) in mind:

- FLOPs: ``2 N V (Hs + Ht)`` = 17.8 TFLOP (~23 ms at the 790 TFLOP/s dense bf16 rate), none wasted: the
  two products are the floor of PERF.md.  The epilogue is ~20 flops per logit pair against the 7168 of
  the two K-loops (<0.3%).
- Bytes: a 128 x 128 tile with K = Hs + Ht = 3584 loads (128 + 128) * 3584 * 2 B = 1.8 MB of operands for
  2 * 128 * 128 * 3584 = 117 MFLOP: 64 FLOP/B.  The H100 needs ~260 FLOP/B from HBM (790 TFLOP/s over
  3 TB/s), so operands must come from L2.  With the grouped ordering (:func:`kl_tiles.grouped_program`)
  the ~132 resident programs cover ``~132 / splits`` row blocks x all splits (26 row blocks x 5 splits at
  the headline size): their hidden states (0.9 MB per 128-row block, ~24 MB together) stay in L2 while
  they sweep, and each weight tile is fetched from HBM once per group of resident row blocks instead of
  once per row block.  HBM traffic is then about ``V (Hs + Ht) 2 B * (row blocks / resident row blocks)
  + N (Hs + Ht) 2 B`` = 1.09 GB * 128 / 26 + 0.12 GB ~ 5.5 GB (~1.8 ms at 3 TB/s) against ~23 ms of
  tensor-core time: compute bound as far as HBM goes.  Without the grouping the hidden states would be
  re-read from HBM once per vocabulary tile (~140 GB, 45+ ms).  The 64 FLOP/B asks ~12 TB/s of L2 at the
  full tensor rate; whether L2 keeps up is not measured here (no GPU in development).
- Registers: the student tile stays live through the teacher K-loop, so two fp32 accumulators of
  ``BLOCK_M x BLOCK_V``: 128 x 128 over 8 warps is 64 + 64 registers per thread (128 x 256 would need
  256 and spill).  BLOCK_M >= 64 per warpgroup and num_warps a multiple of 4 let Triton emit HGMMA on
  Hopper; masked columns get a finite ``MIN_LOGIT`` so no second (masked) copy of a tile is live.
  Compiled for sm_90 (benchmarks/codegen.py): 227-248 registers, 96 KB shared memory, no spills.
- Splits: the vocabulary is split so that ``row blocks x splits`` is ``FORWARD_WAVES`` waves of programs
  (small N still fills the GPU).  The partials cost ``5 * splits * Na`` floats: O(tokens), never
  O(tokens x V).  The merge kernel reads ``5 * splits`` floats and two gathered hidden/weight rows per
  distilled row: negligible.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kl_tiles import gathered_logit, grouped_program, logit_tile

# Rows of the partial-statistics buffer ``partial[NUM_PARTIALS, splits, Na]``.
# W is the model weighting the KL sum (student for reverse KL, teacher for forward KL), O the other one.
P_MAX_W, P_SUM_W, P_MAX_O, P_SUM_O, P_ACC = (tl.constexpr(i) for i in range(5))
NUM_PARTIALS = 5
MERGE_BLOCK_K = 64  # hidden columns per step of the merge kernel's gathered target-logit dot products
# Masked columns' logit and the running maxima's start: finite, far below any real logit, so that
# exp() of it is 0 and frame shifts never compute inf - inf.
MIN_LOGIT = tl.constexpr(-1e30)
INITIAL_MAX = MIN_LOGIT
MERGE_BLOCK_ROWS = 128  # rows per program of kl_merge_kernel
MERGE_NUM_WARPS = 4


@triton.jit
def kl_forward_kernel(sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, row_index_ptr, partial_ptr,
                      n_rows, vocab, hs, ht, stride_sh, stride_sw, stride_th, stride_tw, tiles_per_split,
                      num_splits, inv_temp,
                      HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr,
                      EVEN_HS: tl.constexpr, EVEN_HT: tl.constexpr,
                      CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Partial softmax/KL statistics of one (row block, vocabulary split).

    sh ``[N, Hs]``, sw ``[Vs, Hs]``, sb ``[Vs]``, th ``[N, Ht]``, tw ``[Vt, Ht]``, tb ``[Vt]`` (input dtype;
    biases read only if HAS_*BIAS); row_index ``[n_rows]`` int64; partial
    ``[NUM_PARTIALS, num_splits, n_rows]`` float32, written.  ``vocab`` = Vs.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    row_block, split = grouped_program(pid, num_row_blocks, num_splits, GROUP_M)

    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = tl.load(row_index_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)

    # "w" is the model whose probabilities weight the KL sum (student for reverse KL, teacher for forward
    # KL), "o" the other one: D = A / l_w - lse_w + lse_o with A = sum exp(z_w - m_w) (z_w - z_o).
    m_w = tl.full((BLOCK_M,), INITIAL_MAX, tl.float32)
    m_o = tl.full((BLOCK_M,), INITIAL_MAX, tl.float32)
    l_w = tl.zeros((BLOCK_M,), tl.float32)
    l_o = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M,), tl.float32)

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
        if FORWARD_KL:
            z_w = zt
            z_o = zs
        else:
            z_w = zs
            z_o = zt
        # Masked columns get a finite logit far below any real one: exp() of it is exactly 0 and the
        # difference of two masked logits is 0, so no tile needs a second (masked) copy.  The epilogue is
        # ordered so that at most three logit-sized tiles are live (registers).
        z_w = tl.where(v_ok[None, :], z_w, MIN_LOGIT)
        z_o = tl.where(v_ok[None, :], z_o, MIN_LOGIT)
        m_w_new = tl.maximum(m_w, tl.max(z_w, axis=1))
        m_o_new = tl.maximum(m_o, tl.max(z_o, axis=1))
        l_o = l_o * tl.exp(m_o - m_o_new) + tl.sum(tl.exp(z_o - m_o_new[:, None]), axis=1)
        frame = m_w_new - m_o_new
        diff = z_w - z_o - frame[:, None]  # (z_w - m_w) - (z_o - m_o); z_o dies here
        alpha_w = tl.exp(m_w - m_w_new)
        e_w = tl.exp(z_w - m_w_new[:, None])  # 0 on masked columns
        acc = alpha_w * (acc - (frame - (m_w - m_o)) * l_w) + tl.sum(e_w * diff, axis=1)
        l_w = l_w * alpha_w + tl.sum(e_w, axis=1)
        m_w = m_w_new
        m_o = m_o_new

    out = partial_ptr + split.to(tl.int64) * n_rows + offs_m
    plane = num_splits.to(tl.int64) * n_rows
    tl.store(out + P_MAX_W * plane, m_w, mask=row_ok)
    tl.store(out + P_SUM_W * plane, l_w, mask=row_ok)
    tl.store(out + P_MAX_O * plane, m_o, mask=row_ok)
    tl.store(out + P_SUM_O * plane, l_o, mask=row_ok)
    tl.store(out + P_ACC * plane, acc, mask=row_ok)


@triton.jit
def kl_merge_kernel(partial_ptr, sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, row_index_ptr, target_ptr, d_ptr,
                    lse_s_ptr, lse_t_ptr, lp_s_ptr, lp_t_ptr, n_rows, num_splits, hs, ht, stride_sh, stride_sw,
                    stride_th, stride_tw, inv_temp,
                    HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_TARGET: tl.constexpr,
                    FORWARD_KL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge ``partial [NUM_PARTIALS, num_splits, n_rows]`` into D, lse_s, lse_t, each ``[n_rows]``
    float32, with log-sum-exp algebra over the splits; with HAS_TARGET also the sampled tokens'
    log-probabilities ``lp_s, lp_t [n_rows]`` from gathered dot products ``h[row] . W[y[row]]``
    (target ``[N]`` int64; the other inputs as in ``kl_forward_kernel``)."""
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < n_rows
    plane = num_splits.to(tl.int64) * n_rows
    m_w = tl.full((BLOCK_R,), INITIAL_MAX, tl.float32)
    m_o = tl.full((BLOCK_R,), INITIAL_MAX, tl.float32)
    l_w = tl.zeros((BLOCK_R,), tl.float32)
    l_o = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    src = partial_ptr + offs
    for _ in range(0, num_splits):
        part_m_w = tl.load(src + P_MAX_W * plane, mask=ok, other=0.0)
        part_m_o = tl.load(src + P_MAX_O * plane, mask=ok, other=0.0)
        part_l_w = tl.load(src + P_SUM_W * plane, mask=ok, other=1.0)
        new_w = tl.maximum(m_w, part_m_w)
        new_o = tl.maximum(m_o, part_m_o)
        frame = new_w - new_o
        old_scale = tl.exp(m_w - new_w)
        part_scale = tl.exp(part_m_w - new_w)
        acc = old_scale * (acc - (frame - (m_w - m_o)) * l_w) + part_scale * (
            tl.load(src + P_ACC * plane, mask=ok, other=0.0) - (frame - (part_m_w - part_m_o)) * part_l_w)
        l_w = l_w * old_scale + part_l_w * part_scale
        l_o = l_o * tl.exp(m_o - new_o) + tl.load(src + P_SUM_O * plane, mask=ok, other=1.0) * tl.exp(part_m_o - new_o)
        m_w = new_w
        m_o = new_o
        src += n_rows
    lse_w = m_w + tl.log(l_w)
    lse_o = m_o + tl.log(l_o)
    # D = E_w[z_w - z_o] - (lse_w - lse_o) with E_w[z_w - z_o] = A / l_w + (m_w - m_o) (A is kept in the
    # (m_w, m_o) frame).  Grouped so that D + (lse_w - lse_o), recomputed from the stored float32 values by
    # the backward, returns E_w[z_w - z_o] without the rounding of the O(log V) log-sum-exps: the
    # differences of nearby values are exact (Sterbenz), so gradients of nearly equal distributions keep
    # their relative accuracy.
    tl.store(d_ptr + offs, acc / l_w - ((lse_w - lse_o) - (m_w - m_o)), mask=ok)
    if FORWARD_KL:
        lse_s = lse_o
        lse_t = lse_w
    else:
        lse_s = lse_w
        lse_t = lse_o
    tl.store(lse_s_ptr + offs, lse_s, mask=ok)
    tl.store(lse_t_ptr + offs, lse_t, mask=ok)
    if HAS_TARGET:
        rows = tl.load(row_index_ptr + offs, mask=ok, other=0).to(tl.int64)
        y = tl.load(target_ptr + rows).to(tl.int64)
        zy_s = gathered_logit(sh_ptr, rows, stride_sh, sw_ptr, y, stride_sw, sb_ptr, hs, inv_temp, HAS_SBIAS,
                              BLOCK_R, BLOCK_K)
        zy_t = gathered_logit(th_ptr, rows, stride_th, tw_ptr, y, stride_tw, tb_ptr, ht, inv_temp, HAS_TBIAS,
                              BLOCK_R, BLOCK_K)
        tl.store(lp_s_ptr + offs, zy_s - lse_s, mask=ok)
        tl.store(lp_t_ptr + offs, zy_t - lse_t, mask=ok)

def codegen_specs() -> list[dict]:
    """Headline-size (bf16, H100) compile specs of this module's kernels; format in benchmarks/codegen.py."""
    from .triton_configs import HEADLINE, block_constexprs, headline_launch

    cfg, _, _ = headline_launch()
    hs, ht = HEADLINE["hs"], HEADLINE["ht"]
    models = {"sh_ptr": "*bf16", "sw_ptr": "*bf16", "sb_ptr": "*bf16", "th_ptr": "*bf16", "tw_ptr": "*bf16",
              "tb_ptr": "*bf16", "row_index_ptr": "*i64"}
    sizes = {"hs": "i32", "ht": "i32", "stride_sh": "i32", "stride_sw": "i32", "stride_th": "i32", "stride_tw": "i32"}
    aligned = ["n_rows", *sizes]
    signature = {**models, "partial_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", **sizes, "tiles_per_split": "i32",
                 "num_splits": "i32", "inv_temp": "fp32"}
    specs = []
    for forward_kl in (False, True):
        constexprs = {"HAS_SBIAS": False, "HAS_TBIAS": False, "FORWARD_KL": forward_kl,
                      "EVEN_HS": hs % cfg.block_k == 0, "EVEN_HT": ht % cfg.block_k == 0, "CAST_FP32": False,
                      "DOT_PRECISION": "tf32", **block_constexprs(cfg)}
        specs.append({"name": "kl_forward_kernel (" + ("forward_kl" if forward_kl else "reverse_kl") + ")",
                      "fn": kl_forward_kernel, "signature": signature, "constexprs": constexprs,
                      "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "divisible_by_16": aligned + ["vocab"]})
    merge_signature = {"partial_ptr": "*fp32", **models, "target_ptr": "*i64", "d_ptr": "*fp32", "lse_s_ptr": "*fp32",
                       "lse_t_ptr": "*fp32", "lp_s_ptr": "*fp32", "lp_t_ptr": "*fp32", "n_rows": "i32",
                       "num_splits": "i32", **sizes, "inv_temp": "fp32"}
    specs.append({"name": "kl_merge_kernel (reverse_kl, target)", "fn": kl_merge_kernel, "signature": merge_signature,
                  "constexprs": {"HAS_SBIAS": False, "HAS_TBIAS": False, "HAS_TARGET": True, "FORWARD_KL": False,
                                 "BLOCK_R": MERGE_BLOCK_ROWS, "BLOCK_K": MERGE_BLOCK_K},
                  "num_warps": MERGE_NUM_WARPS, "num_stages": 1, "divisible_by_16": aligned, "expect_hgmma": False})
    return specs
