"""Backward kernel of the vocabulary-wide divergence: d(hidden), d(weight), d(bias) of the student.

``kl_backward_kernel`` -- one program per (row block of ``BLOCK_M`` distilled rows, vocabulary tile of
``BLOCK_V`` columns), in the grouped order of :func:`kl_tiles.grouped_program`.  A program

1. recomputes the student logit tile (K-loop of ``tl.dot`` over Hs) and ``p_s = exp(z_s - lse_s)``;
2. (gradient filtering, reverse KL, see below) stops here if every ``p_s`` of the tile is negligible;
3. recomputes the teacher logit tile (K-loop over Ht) and forms d(logits) in registers from the saved
   per-row ``lse_s, lse_t, D`` and the upstream ``grad_divergence`` ``g`` (SPEC section 6, raw logits
   ``x = z * tau``): reverse KL ``dx = g p_s (log p_s - log p_t - D) / tau``, evaluated as
   ``g p_s ((z_s - z_t) - c) / tau`` with the per-row ``c = D + (lse_s - lse_t) = E_ps[z_s - z_t]`` so that
   no rounded O(log V) log-sum-exp enters the per-element difference; forward KL
   ``dx = g (p_s - p_t) / tau``;
4. contracts it, chunk by chunk of ``BLOCK_K`` hidden columns, with the student weight tile
   (``dx @ W[tile]`` -> d(hidden) rows) and with the gathered hidden rows (``dx^T @ h`` -> d(weight) tile),
   and adds both into float32 gradient buffers with relaxed ``tl.atomic_add``; d(bias) gets the column
   sums of ``dx``.

Why atomics rather than two owner kernels (rows-owner for d(hidden), vocabulary-owner for d(weight)):
an owner kernel keeps its output block in registers while it loops over the other dimension, i.e. a
``BLOCK_M x Hs`` (or ``BLOCK_V x Hs``) float32 accumulator: 128 x 1024 x 4 B = 512 KB at the headline
size, far beyond a program's registers (64K x 4 B per SM) and shared memory (228 KB).  Tiling Hs across
programs instead would make each program recompute its logit tiles ``Hs / BLOCK_K`` times (16x the
17.8 TFLOP recompute), and the two-kernel layout recomputes every logit tile twice anyway (+17.8 TFLOP,
~23 ms).  The atomic layout recomputes each logit tile exactly once: ``2 N V (Hs + Ht)`` recompute +
``4 N V Hs`` for the two gradient products = 38 TFLOP at the headline size, the floor in PERF.md.  The
price is atomic traffic: ``N V Hs (1/BLOCK_V + 1/BLOCK_M)`` float32 adds, ~40 G adds (160 GB) at the
headline size with 128 x 128 tiles, resolved in L2 (the grouped ordering keeps the d(hidden) rows and
d(weight) tiles being updated in L2 while their programs are resident).  On near-uniform (worst-case)
inputs this traffic, not the tensor cores, may bound the kernel -- unmeasured, no GPU in development.
Gradient filtering removes it, with the teacher recompute, for every skipped tile.

Gradient filtering (reverse KL; on by default for 16-bit inputs, threshold
``triton_configs.GRADIENT_FILTER_16BIT`` = 2**-20, off for float32): every skipped element has
``p_s < theta``, so its d(logit) is at most ``g theta |log p_s - log p_t - D| / tau``; with
``p_s |log p_s| <= theta |log theta|`` (14 theta) for ``p_s < theta < 1/e``, the skipped part of a row's
d(logits) is bounded by ``g theta (14 + |log p_t| + D) / tau`` per element: below ``1.1e-4 g / tau``
for any teacher log-probability above -100 (against O(g / tau) entries where the student's mass is).
This is an approximation, sized for 16-bit gradients.  LM-like inputs (peaked softmaxes; most tokens
at p_s < 1e-8) skip most tiles; near-uniform inputs over V < 1e6 never do (p_s ~ 1/V > theta).  The
tests check the filtered gradients against the float64 reference on peaked inputs (SPEC's 16-bit
tolerance) and that skipped tiles are exactly zero.  Forward KL is never filtered: its d(logits) needs p_t of every tile.

Memory: d(hidden) ``[N, Hs]``, d(weight) ``[Vs, Hs]``, d(bias) ``[Vs]`` float32 buffers (the
gradients themselves, accumulated in fp32 and cast to the input dtype by the caller) plus nothing of size
tokens x vocabulary: d(logits) lives only in registers (and, converted to the input dtype, in shared
memory as a ``tl.dot`` operand).  Compiled for sm_90 at the headline config (benchmarks/codegen.py):
236-255 registers, 160 KB shared memory, no spills, HGMMA for all four products.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kl_tiles import grouped_program, logit_tile


@triton.jit
def _finish_tile(p_s, zs, rows, row_ok, offs_m, offs_v, v_ok, safe_v, sh_ptr, sw_ptr, th_ptr, tw_ptr, tb_ptr,
                 lse_s, lse_t_ptr, d_ptr, grad_ptr, dh_ptr, dw_ptr, db_ptr, hs, ht, stride_sh, stride_sw, stride_th,
                 stride_tw, inv_temp,
                 HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                 NEED_DB: tl.constexpr, EVEN_HS: tl.constexpr, EVEN_HT: tl.constexpr, CAST_FP32: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Teacher recompute, d(logits) and the atomic gradient updates of one tile, given the student's
    probabilities ``p_s`` and logits ``zs`` (``[BLOCK_M, BLOCK_V]`` float32)."""
    zt = logit_tile(th_ptr, rows, stride_th, tw_ptr, safe_v, stride_tw, tb_ptr, ht, inv_temp,
                    HAS_TBIAS, EVEN_HT, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    lse_t = tl.load(lse_t_ptr + offs_m, mask=row_ok, other=0.0)
    scale = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0) * inv_temp
    if FORWARD_KL:
        dx = p_s - tl.exp(zt - lse_t[:, None])
    else:
        # log p_s - log p_t - D = (z_s - z_t) - c with the per-row c = D + (lse_s - lse_t) = E_ps[z_s - z_t]:
        # no O(log V) log-sum-exp enters the per-element difference (see kl_merge_kernel).
        c = tl.load(d_ptr + offs_m, mask=row_ok, other=0.0) + (lse_s - lse_t)
        dx = p_s * ((zs - zt) - c[:, None])
    dx = tl.where(row_ok[:, None] & v_ok[None, :], dx * scale[:, None], 0.0)

    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dx, axis=0), mask=v_ok, sem="relaxed")
    if NEED_DH or NEED_DW:
        if CAST_FP32:
            dx_op = dx
        else:
            dx_op = dx.to(sw_ptr.dtype.element_ty)
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = sw_ptr + safe_v.to(tl.int64)[:, None] * stride_sw + offs_k[None, :]
        h_ptrs = sh_ptr + rows[:, None] * stride_sh + offs_k[None, :]
        dh_ptrs = dh_ptr + rows[:, None] * hs + offs_k[None, :]
        dw_ptrs = dw_ptr + safe_v.to(tl.int64)[:, None] * hs + offs_k[None, :]
        for k in range(0, hs, BLOCK_K):
            k_ok = (k + offs_k) < hs
            if NEED_DH:
                if EVEN_HS:
                    w = tl.load(w_ptrs)
                else:
                    w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                if CAST_FP32:
                    w = w.to(tl.float32)
                dh = tl.dot(dx_op, w, input_precision=DOT_PRECISION)
                tl.atomic_add(dh_ptrs, dh, mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_DW:
                if EVEN_HS:
                    h = tl.load(h_ptrs)
                else:
                    h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
                if CAST_FP32:
                    h = h.to(tl.float32)
                dw = tl.dot(tl.trans(dx_op), h, input_precision=DOT_PRECISION)
                tl.atomic_add(dw_ptrs, dw, mask=v_ok[:, None] & k_ok[None, :], sem="relaxed")
            w_ptrs += BLOCK_K
            h_ptrs += BLOCK_K
            dh_ptrs += BLOCK_K
            dw_ptrs += BLOCK_K


@triton.jit
def kl_backward_kernel(sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, row_index_ptr, lse_s_ptr, lse_t_ptr, d_ptr,
                       grad_ptr, dh_ptr, dw_ptr, db_ptr, n_rows, vocab, hs, ht, stride_sh, stride_sw, stride_th,
                       stride_tw, inv_temp, filter_threshold,
                       HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr,
                       NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                       FILTER: tl.constexpr, EVEN_HS: tl.constexpr, EVEN_HT: tl.constexpr,
                       CAST_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Accumulate one (row block, vocabulary tile)'s contribution to the student gradients.

    Inputs as in ``kl_forward_kernel``; lse_s, lse_t, d (= D), grad: ``[n_rows]`` float32 per distilled
    row.  Outputs (float32, pre-zeroed, accumulated atomically): dh ``[N, Hs]`` (row stride Hs),
    dw ``[Vs, Hs]``, db ``[Vs]``, each touched only if the matching NEED_* is set.  With FILTER (reverse
    KL only) a tile whose student probabilities are all below ``filter_threshold`` is skipped after the
    student recompute.
    """
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(n_rows, BLOCK_M)
    num_v_tiles = tl.cdiv(vocab, BLOCK_V)
    row_block, v_tile = grouped_program(pid, num_row_blocks, num_v_tiles, GROUP_M)

    offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_rows
    rows = tl.load(row_index_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    offs_v = v_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < vocab
    safe_v = tl.minimum(offs_v, vocab - 1)

    zs = logit_tile(sh_ptr, rows, stride_sh, sw_ptr, safe_v, stride_sw, sb_ptr, hs, inv_temp,
                    HAS_SBIAS, EVEN_HS, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    lse_s = tl.load(lse_s_ptr + offs_m, mask=row_ok, other=0.0)
    p_s = tl.exp(zs - lse_s[:, None])
    if FILTER:
        tile_max = tl.max(tl.max(tl.where(row_ok[:, None] & v_ok[None, :], p_s, 0.0), axis=1), axis=0)
        if tile_max >= filter_threshold:
            _finish_tile(p_s, zs, rows, row_ok, offs_m, offs_v, v_ok, safe_v, sh_ptr, sw_ptr, th_ptr, tw_ptr, tb_ptr,
                         lse_s, lse_t_ptr, d_ptr, grad_ptr, dh_ptr, dw_ptr, db_ptr, hs, ht, stride_sh, stride_sw,
                         stride_th, stride_tw, inv_temp, HAS_TBIAS, FORWARD_KL, NEED_DH, NEED_DW, NEED_DB, EVEN_HS,
                         EVEN_HT, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    else:
        _finish_tile(p_s, zs, rows, row_ok, offs_m, offs_v, v_ok, safe_v, sh_ptr, sw_ptr, th_ptr, tw_ptr, tb_ptr,
                     lse_s, lse_t_ptr, d_ptr, grad_ptr, dh_ptr, dw_ptr, db_ptr, hs, ht, stride_sh, stride_sw,
                     stride_th, stride_tw, inv_temp, HAS_TBIAS, FORWARD_KL, NEED_DH, NEED_DW, NEED_DB, EVEN_HS,
                     EVEN_HT, CAST_FP32, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)


def codegen_specs() -> list[dict]:
    """Headline-size (bf16, H100) compile specs of this module's kernel; format in benchmarks/codegen.py."""
    from .triton_configs import HEADLINE, block_constexprs, headline_launch

    cfg, _, _ = headline_launch()
    hs, ht = HEADLINE["hs"], HEADLINE["ht"]
    signature = {"sh_ptr": "*bf16", "sw_ptr": "*bf16", "sb_ptr": "*bf16", "th_ptr": "*bf16", "tw_ptr": "*bf16",
                 "tb_ptr": "*bf16", "row_index_ptr": "*i64", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32",
                 "d_ptr": "*fp32", "grad_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
                 "n_rows": "i32", "vocab": "i32", "hs": "i32", "ht": "i32", "stride_sh": "i32", "stride_sw": "i32",
                 "stride_th": "i32", "stride_tw": "i32", "inv_temp": "fp32",
                 "filter_threshold": "fp32"}
    specs = []
    for forward_kl in (False, True):
        constexprs = {"HAS_SBIAS": False, "HAS_TBIAS": False, "FORWARD_KL": forward_kl, "NEED_DH": True,
                      "NEED_DW": True, "NEED_DB": False, "FILTER": not forward_kl, "EVEN_HS": hs % cfg.block_k == 0,
                      "EVEN_HT": ht % cfg.block_k == 0, "CAST_FP32": False, "DOT_PRECISION": "tf32",
                      **block_constexprs(cfg)}
        label = "forward_kl" if forward_kl else "reverse_kl, filtered"
        specs.append({"name": f"kl_backward_kernel ({label}, d hidden + d weight)", "fn": kl_backward_kernel,
                      "signature": signature, "constexprs": constexprs, "num_warps": cfg.num_warps,
                      "num_stages": cfg.num_stages,
                      "divisible_by_16": ["n_rows", "vocab", "hs", "ht", "stride_sh", "stride_sw", "stride_th",
                                          "stride_tw"]})
    return specs
