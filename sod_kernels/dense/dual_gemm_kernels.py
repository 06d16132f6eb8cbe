"""Experimental dual-GEMM kernels of the dense KL loss (``fused_sod_loss(..., impl="dual_gemm")``).

The default single pass (:mod:`sod_kernels.dense.triton_backend`) writes both models' logits of a row chunk as
float32 ``[C, V]`` blocks (two cuBLAS products) and reads them twice (statistics, then ``d(logits)``): 24 bytes
per (row, column) of epilogue traffic.  Here one Triton kernel computes both logit tiles and keeps the statistics
in its epilogue, where the float32 accumulators are:

- ``dual_gemm_stats_kernel`` (grid: row blocks of ``BLOCK_M`` x vocabulary splits; row blocks on the fast axis,
  so the programs running together share the weight tiles in L2).  A program sweeps its split in tiles of
  ``BLOCK_N`` columns; per tile it runs two K-loops with ``tl.dot`` (float32 accumulation): ``xs = h_s W_s^T``
  over ``Hs`` and ``xt = h_t W_t^T`` over ``Ht``, then ``z = (x + b) / tau`` and, in float32:

  * the tile's statistics ``(m_w, l_w, m_o, l_o, A')`` (W the model weighting the KL sum: the student for
    reverse KL, the teacher for forward KL; ``A' = sum e^(z_w - m_w) ((z_w - m_w) - (z_o - m_o))``), merged into
    the program's running statistics with the split-merge algebra and written at the end as
    ``part [5, C, splits]``: exactly the partials layout of :func:`sod_kernels.dense.kernels.kl_partials`, so
    :func:`sod_kernels.dense.kernels.kl_row_finish` merges them unchanged (``D``, lse, frame, weights, loss
    slots, gradient scale).  ``D`` is therefore computed from exact float32 logits;
  * the tile frame ``frame [3, C, tiles]`` float32: the tile's maxima ``m_s``, ``m_t`` and (reverse KL) the
    tile's centre ``r = A'/l_w``;
  * two 16-bit ``[C, V]`` arrays for the gradient: ``a = exp(z_s - m_s)`` (in ``(0, 1]``: relative rounding
    ``2^-11`` (fp16) per entry whatever its size, where storing ``z_s - m_s`` would give ``|z_s - m_s| 2^-11``;
    entries below fp16's normal range are below ``6e-5`` of the tile's largest probability) and, for reverse KL,
    ``b = (z_s - m_s) - (z_t - m_t) - r`` (``z_s - z_t`` centred per tile on its ``p_s``-weighted mean, so the
    entries carrying most of the probability are small and stored almost exactly), for forward KL
    ``b = exp(z_t - m_t)`` (the forward-KL gradient ``p_s - p_t`` needs both probabilities accurate where each
    is large);
  * with targets, the raw target logits ``x(y) + b(y)`` of both models (``gx [2, C]``, written by the one tile
    that holds ``y``), which :func:`kl_row_finish` reads as a one-column block.

- ``dual_logit_grad_kernel`` (grid: rows x column blocks) forms ``d(logits)`` in the gradient dtype from the
  16-bit arrays, the tile frame and the row statistics: ``p_s = a exp(m_s - lse_s)``; reverse KL
  ``g = p_s (b + (r - c') + ((m_s - M_s) - (m_t - M_t)))`` (``c'`` the row's centre, ``M`` its maxima: the
  shifted form of ``p_s (log p_s - log p_t - D)``), forward KL ``g = p_s - b exp(m_t - lse_t)``; times the
  row's scale, plus the hard-label term ``hard_row (p_s - onehot(y))``.

What it trades: ``d(logits)`` carries the rounding of the stored 16-bit entries (fp16 by default: about
``2^-11`` relative per entry; bf16 ``2^-8``); ``D``, the loss, the weights and the sampled log-probs are exact
float32 as on the default path.  fp16 entries of the reverse KL's ``b`` saturate at 65504 (a difference of
logits that large is clamped): use bf16 storage for logits of that size.  No soft-caps and no JSD (the loss routes
those to the default path).

Bytes per (row, column): the two 16-bit arrays written once and read once (8), ``d(logits)`` written (2 for
16-bit inputs), against 8 + 16 + 2 on the default path (float32 blocks written, read twice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.kernels import MIN_LOGIT, interpreting
from .kernels import add_hard_label, kl_orientation

# The headline configuration (sm_90, 16-bit inputs): 64 x 128 logit tiles, 64-wide K steps, 8 warps (two
# warpgroups), 3 pipeline stages: warpgroup MMA, 225 registers, no spills, 72 KiB shared memory (benchmarks.codegen,
# Triton 3.9).  128 x 128 tiles (two 64-register float32 accumulators per thread plus the epilogue) spill at 255
# registers; 128 x 64 compiles without spills at 253.  Under the interpreter tiny tiles, so small tests
# cross tile, split and K-step boundaries.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 128, 64
NUM_WARPS, NUM_STAGES = 8, 3
INTERPRETER_BLOCKS = (16, 32, 16)
GRAD_BLOCK_V = 2048
INTERPRETER_GRAD_BLOCK_V = 64
FRAME_PLANES = 3
MIN_PROGRAMS = 4 * 132  # row blocks x splits: several waves of an H100/H200
STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = tl.constexpr(65504.0)
FORCE_WIDE = False  # tests: 64-bit offsets at any size


@triton.jit
def _tile_product(acc, h_ptr, w_ptr, rows, cols, row_ok, col_ok, k_dim, stride_h, stride_w,
                  BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  WIDE: tl.constexpr):
    """``acc + h[rows] @ w[cols]^T`` over the K dimension ``k_dim`` in steps of ``BLOCK_K`` (float32 accumulation;
    float32 inputs multiply in IEEE float32, not TF32; ``UPCAST``: 16-bit tiles converted to float32 first, for
    the interpreter only)."""
    ks = tl.arange(0, BLOCK_K)
    if WIDE:  # 64-bit offsets only where 32 bits could overflow (they cost registers)
        a_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
        b_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    else:
        a_ptrs = h_ptr + rows[:, None] * stride_h + ks[None, :]
        b_ptrs = w_ptr + cols[:, None] * stride_w + ks[None, :]
    for k in range(0, k_dim, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k_ok = (k + ks) < k_dim
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's 16-bit tl.dot is wrong (Triton 3.9): multiply the exact float32 values
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE or UPCAST:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def dual_gemm_stats_kernel(hs_ptr, ws_ptr, ht_ptr, wt_ptr, sb_ptr, tb_ptr, y_ptr, part_ptr, frame_ptr, a_ptr, b_ptr,
                           gx_ptr, n_rows, vocab, hs_dim, ht_dim, stride_hs, stride_ws, stride_ht, stride_wt,
                           stride_a, tiles_per_split, num_splits, n_tiles, inv_temp, HAS_SBIAS: tl.constexpr,
                           HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr, HAS_TARGETS: tl.constexpr,
                           CLAMP: tl.constexpr, WIDE: tl.constexpr, S_EVEN_K: tl.constexpr, T_EVEN_K: tl.constexpr,
                           S_IEEE: tl.constexpr, T_IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (row block, split): both logit tiles of every tile of the split, the statistics (``part [5, n_rows,
    num_splits]``), the tile frame (``frame [3, n_rows, n_tiles]``), the 16-bit arrays ``a``, ``b`` ``[n_rows, V]``
    (row stride ``stride_a``) and with targets the raw target logits ``gx [2, n_rows]`` (see the module
    docstring)."""
    rb = tl.program_id(0)
    split = tl.program_id(1)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    offs_n = tl.arange(0, BLOCK_N)
    if HAS_TARGETS:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    big_w = tl.full([BLOCK_M], MIN_LOGIT, tl.float32)
    big_o = tl.full([BLOCK_M], MIN_LOGIT, tl.float32)
    sum_w = tl.zeros([BLOCK_M], tl.float32)
    sum_o = tl.zeros([BLOCK_M], tl.float32)
    acc_a = tl.zeros([BLOCK_M], tl.float32)
    tile0 = split * tiles_per_split
    tile_end = tl.minimum(tile0 + tiles_per_split, n_tiles)
    for tile in range(tile0, tile_end):
        cols = tile * BLOCK_N + offs_n
        col_ok = cols < vocab
        xs = _tile_product(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), hs_ptr, ws_ptr, rows, cols, row_ok, col_ok,
                           hs_dim, stride_hs, stride_ws, BLOCK_K, S_EVEN_K, S_IEEE, UPCAST, WIDE)
        xt = _tile_product(tl.zeros([BLOCK_M, BLOCK_N], tl.float32), ht_ptr, wt_ptr, rows, cols, row_ok, col_ok,
                           ht_dim, stride_ht, stride_wt, BLOCK_K, T_EVEN_K, T_IEEE, UPCAST, WIDE)
        if HAS_SBIAS:
            xs += tl.load(sb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_TBIAS:
            xt += tl.load(tb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_TARGETS:
            hit = cols[None, :] == y[:, None]
            mine = row_ok & (y >= tile * BLOCK_N) & (y < tile * BLOCK_N + BLOCK_N)
            tl.store(gx_ptr + rows, tl.sum(tl.where(hit, xs, 0.0), axis=1), mask=mine)
            tl.store(gx_ptr + n_rows + rows, tl.sum(tl.where(hit, xt, 0.0), axis=1), mask=mine)
        zs = tl.where(col_ok[None, :], xs * inv_temp, MIN_LOGIT)
        zt = tl.where(col_ok[None, :], xt * inv_temp, MIN_LOGIT)
        z_w, z_o = kl_orientation(zs, zt, FORWARD_KL)
        m_w = tl.max(z_w, axis=1)
        m_o = tl.max(z_o, axis=1)
        sh_w = z_w - m_w[:, None]
        sh_o = z_o - m_o[:, None]
        e_w = tl.exp(sh_w)
        e_o = tl.exp(sh_o)
        l_w = tl.sum(e_w, axis=1)
        l_o = tl.sum(e_o, axis=1)
        a_t = tl.sum(e_w * (sh_w - sh_o), axis=1)
        # the 16-bit arrays (a = exp(z_s - m_s) in (0, 1]; b: see the module docstring)
        if FORWARD_KL:
            a_val = e_o
            b_val = e_w
            r = tl.zeros([BLOCK_M], tl.float32)
        else:
            r = a_t / l_w
            a_val = e_w
            b_val = (sh_w - sh_o) - r[:, None]
            if CLAMP:
                b_val = tl.minimum(tl.maximum(b_val, -FP16_MAX), FP16_MAX)
        ok2 = row_ok[:, None] & col_ok[None, :]
        if WIDE:
            at = rows.to(tl.int64)[:, None] * stride_a + cols[None, :]
        else:
            at = rows[:, None] * stride_a + cols[None, :]
        tl.store(a_ptr + at, a_val.to(a_ptr.dtype.element_ty), mask=ok2)
        tl.store(b_ptr + at, b_val.to(b_ptr.dtype.element_ty), mask=ok2)
        plane = n_rows * n_tiles
        fr = frame_ptr + rows * n_tiles + tile
        if FORWARD_KL:
            tl.store(fr, m_o, mask=row_ok)
            tl.store(fr + plane, m_w, mask=row_ok)
        else:
            tl.store(fr, m_w, mask=row_ok)
            tl.store(fr + plane, m_o, mask=row_ok)
        tl.store(fr + 2 * plane, r, mask=row_ok)
        # merge the tile into the running statistics (the split-merge algebra of merge_kl_splits)
        new_w = tl.maximum(big_w, m_w)
        new_o = tl.maximum(big_o, m_o)
        run_w = big_w - new_w
        run_o = big_o - new_o
        til_w = m_w - new_w
        til_o = m_o - new_o
        scale_run = tl.exp(run_w)
        scale_til = tl.exp(til_w)
        acc_a = scale_run * (acc_a + sum_w * (run_w - run_o)) + scale_til * (a_t + l_w * (til_w - til_o))
        sum_w = sum_w * scale_run + l_w * scale_til
        sum_o = sum_o * tl.exp(run_o) + l_o * tl.exp(til_o)
        big_w = new_w
        big_o = new_o
    out = part_ptr + rows * num_splits + split
    plane = n_rows * num_splits
    tl.store(out, big_w, mask=row_ok)
    tl.store(out + plane, sum_w, mask=row_ok)
    tl.store(out + 2 * plane, big_o, mask=row_ok)
    tl.store(out + 3 * plane, sum_o, mask=row_ok)
    tl.store(out + 4 * plane, acc_a, mask=row_ok)


@triton.jit
def dual_logit_grad_kernel(a_ptr, b_ptr, frame_ptr, grad_ptr, max_s_ptr, lse_s_ptr, max_t_ptr, lse_t_ptr,
                           centre_ptr, scale_ptr, target_ptr, hard_ptr, n_rows, vocab, n_tiles, stride_a, stride_g,
                           FORWARD_KL: tl.constexpr, HAS_HARD: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    """``grad[row, cols] = scale[row] * dD/dz`` (plus the hard-label term with ``HAS_HARD``) from the 16-bit
    arrays ``a``, ``b`` and the tile frame ``[3, n_rows, n_tiles]`` (tiles of ``BLOCK_N`` columns), in
    ``grad``'s dtype."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    at = row.to(tl.int64) * stride_a + cols
    a = tl.load(a_ptr + at, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + at, mask=ok, other=0.0).to(tl.float32)
    plane = n_rows * n_tiles
    fr = frame_ptr + row * n_tiles + cols // BLOCK_N
    m_s = tl.load(fr, mask=ok, other=0.0)
    m_t = tl.load(fr + plane, mask=ok, other=0.0)
    p_s = a * tl.exp(m_s - tl.load(lse_s_ptr + row))
    if FORWARD_KL:
        g = p_s - b * tl.exp(m_t - tl.load(lse_t_ptr + row))
    else:
        r = tl.load(fr + 2 * plane, mask=ok, other=0.0)
        shift = (r - tl.load(centre_ptr + row)) + ((m_s - tl.load(max_s_ptr + row)) -
                                                    (m_t - tl.load(max_t_ptr + row)))
        g = p_s * (b + shift)
    g = g * tl.load(scale_ptr + row)
    if HAS_HARD:
        g = add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr)
    g = tl.where(ok, g, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------- launches
def tile_config() -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K)`` of the dual-GEMM kernel (tiny tiles under the interpreter)."""
    return INTERPRETER_BLOCKS if interpreting() else (BLOCK_M, BLOCK_N, BLOCK_K)


def split_plan(n_rows: int, vocab: int) -> tuple[int, int, int]:
    """``(tiles, tiles per split, splits)`` of a chunk of ``n_rows`` rows: splits enough for ``MIN_PROGRAMS``
    programs (under the interpreter at most 3 splits, so tests cover the split merge and multi-tile splits)."""
    bm, bn, _ = tile_config()
    n_tiles = max(triton.cdiv(vocab, bn), 1)
    row_blocks = max(triton.cdiv(n_rows, bm), 1)
    wanted = min(n_tiles, 3) if interpreting() else min(n_tiles, max(1, -(-MIN_PROGRAMS // row_blocks)))
    per = triton.cdiv(n_tiles, wanted)
    return n_tiles, per, triton.cdiv(n_tiles, per)


def dual_gemm_stats(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor,
                    sb: torch.Tensor | None, tb: torch.Tensor | None, targets: torch.Tensor | None,
                    part: torch.Tensor, frame: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    gx: torch.Tensor | None, *, forward_kl: bool, temperature: float, tiles_per_split: int) -> None:
    """One launch of :func:`dual_gemm_stats_kernel` over a chunk: ``hs [C, Hs]``, ``ht [C, Ht]`` (unit column
    stride), ``ws [V, Hs]``, ``wt [V', Ht]`` (the first ``V`` rows used), biases ``[V]`` or None, ``targets [C]``
    int32 or None; outputs ``part [5, C, splits]``, ``frame [3, C, tiles]`` float32, ``a``, ``b`` ``[C, V]``
    16-bit (row stride shared), ``gx [2, C]`` float32 (with targets)."""
    n_rows, vocab = hs.shape[0], ws.shape[0]
    if not n_rows:
        return
    bm, bn, bk = tile_config()
    n_tiles, splits = frame.shape[2], part.shape[2]
    f32 = torch.float32
    # 32-bit element offsets unless a [C, V] array, a hidden block or the used weights could exceed them
    wide = FORCE_WIDE or max(n_rows * a.stride(0), n_rows * max(hs.stride(0), ht.stride(0)),
               (vocab + n_tiles * bn) * max(ws.stride(0), wt.stride(0))) >= 2 ** 31
    dual_gemm_stats_kernel[(triton.cdiv(n_rows, bm), splits)](
        hs, ws, ht, wt, sb if sb is not None else part, tb if tb is not None else part,
        targets if targets is not None else part, part, frame, a, b, gx if gx is not None else part,
        n_rows, vocab, hs.shape[1], ht.shape[1], hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
        a.stride(0), tiles_per_split, splits, n_tiles, 1.0 / temperature,
        HAS_SBIAS=sb is not None, HAS_TBIAS=tb is not None, FORWARD_KL=forward_kl, HAS_TARGETS=targets is not None,
        CLAMP=a.dtype == torch.float16, WIDE=wide, S_EVEN_K=hs.shape[1] % bk == 0, T_EVEN_K=ht.shape[1] % bk == 0,
        S_IEEE=hs.dtype == f32, T_IEEE=ht.dtype == f32, UPCAST=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def dual_logit_grad(a: torch.Tensor, b: torch.Tensor, frame: torch.Tensor, stats, scale: torch.Tensor,
                    out: torch.Tensor, *, forward_kl: bool, hard: tuple | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``d(logits)`` of the chunk from the 16-bit arrays, the tile frame and the
    row statistics ``stats`` (:class:`~sod_kernels.dense.kernels.KLRowStats` views), ``scale [C]`` float32, and
    ``hard = (target [C] int32, hard_scale [C] float32)`` or None."""
    n_rows, vocab = a.shape
    if not n_rows:
        return out
    _, bn, _ = tile_config()
    block = INTERPRETER_GRAD_BLOCK_V if interpreting() else GRAD_BLOCK_V
    target, hard_scale = hard if hard is not None else (scale, scale)
    dual_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        a, b, frame, out, stats.max_s, stats.lse_s, stats.max_t, stats.lse_t, stats.centre, scale, target,
        hard_scale, n_rows, vocab, frame.shape[2], a.stride(0), out.stride(0), FORWARD_KL=forward_kl,
        HAS_HARD=hard is not None, BLOCK_N=bn, BLOCK_V=block, num_warps=8)
    return out


# --------------------------------------------------------------------------------------------- codegen
def codegen_specs() -> list[dict]:
    """The dual-GEMM kernel at the headline configuration (bf16 inputs, Hs = 1024, Ht = 2560, biases, fp16 and
    bf16 stored arrays, reverse and forward KL, with targets), which must compile to warpgroup MMA without spills,
    and the gradient kernel (no MMA)."""
    specs = []
    for forward_kl, store, targets in ((False, "fp16", True), (False, "bf16", False), (True, "fp16", False)):
        tag = ("forward" if forward_kl else "reverse") + f" {store}" + (" targets" if targets else "")
        specs.append({
            "name": f"dual_gemm_stats_kernel[{tag} {BLOCK_M}x{BLOCK_N}x{BLOCK_K}]", "fn": dual_gemm_stats_kernel,
            "signature": {"hs_ptr": "*bf16", "ws_ptr": "*bf16", "ht_ptr": "*bf16", "wt_ptr": "*bf16",
                          "sb_ptr": "*bf16", "tb_ptr": "*bf16", "y_ptr": "*i32", "part_ptr": "*fp32",
                          "frame_ptr": "*fp32", "a_ptr": f"*{store}", "b_ptr": f"*{store}", "gx_ptr": "*fp32",
                          "n_rows": "i32", "vocab": "i32", "hs_dim": "i32", "ht_dim": "i32", "stride_hs": "i32",
                          "stride_ws": "i32", "stride_ht": "i32", "stride_wt": "i32", "stride_a": "i32",
                          "tiles_per_split": "i32", "num_splits": "i32", "n_tiles": "i32", "inv_temp": "fp32"},
            "constexprs": {"HAS_SBIAS": True, "HAS_TBIAS": True, "FORWARD_KL": forward_kl, "HAS_TARGETS": targets,
                           "CLAMP": store == "fp16", "WIDE": False, "S_EVEN_K": True, "T_EVEN_K": True, "S_IEEE": False,
                           "T_IEEE": False, "UPCAST": False, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N,
                           "BLOCK_K": BLOCK_K},
            "num_warps": NUM_WARPS, "num_stages": NUM_STAGES, "expect_hgmma": True,
            "divisible_by_16": ["vocab", "hs_dim", "ht_dim", "stride_hs", "stride_ws", "stride_ht", "stride_wt",
                                "stride_a"],
        })
    for forward_kl, hard in ((False, True), (True, False)):
        tag = ("forward" if forward_kl else "reverse") + (" hard" if hard else "")
        specs.append({
            "name": f"dual_logit_grad_kernel[{tag} fp16 bv{GRAD_BLOCK_V}]", "fn": dual_logit_grad_kernel,
            "signature": {"a_ptr": "*fp16", "b_ptr": "*fp16", "frame_ptr": "*fp32", "grad_ptr": "*bf16",
                          "max_s_ptr": "*fp32", "lse_s_ptr": "*fp32", "max_t_ptr": "*fp32", "lse_t_ptr": "*fp32",
                          "centre_ptr": "*fp32", "scale_ptr": "*fp32", "target_ptr": "*i32", "hard_ptr": "*fp32",
                          "n_rows": "i32", "vocab": "i32", "n_tiles": "i32", "stride_a": "i32", "stride_g": "i32"},
            "constexprs": {"FORWARD_KL": forward_kl, "HAS_HARD": hard, "BLOCK_N": BLOCK_N, "BLOCK_V": GRAD_BLOCK_V},
            "num_warps": 8, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_a", "stride_g"],
        })
    return specs
