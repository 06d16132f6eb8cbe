"""The sparse-teacher epilogue on the chunked core: the student's logits at the teacher's ids, the tail
statistics, and ``d(logits)`` of a logit block.

Input: the raw float32 logit block ``x [C, V]`` of one row chunk (:func:`sod_kernels.core.chunks.logits_into`),
bias and ``1/tau`` applied on load (``z = (x + b) / tau``), and the teacher's ``ids [C, k]`` (int64, distinct
within a row; a negative id is skipped: the vocabulary-parallel form passes ``-1`` for the ids that another
rank's shard holds).  Per chunk:

1. ``sparse_gather_mask_kernel`` (grid: rows x id blocks): ``z_ids[r, j] = z[r, ids[r, j]]``, then writes
   ``-inf`` into ``x`` at those columns.  The block is scratch, so masking it in place costs ``C k`` writes.
2. :func:`sod_kernels.core.kernels.logprob_row_stats` on the masked block: its online log-sum-exp is now
   the *tail* log-sum-exp.  ``-inf`` columns add exactly 0; a row whose columns are all ids keeps the
   kernel's starting maximum (``-1e30``), which marks an empty tail.
3. :func:`sod_kernels.sparse.rows.coarse_grained_rows`: ``O(C k)`` tensor math (divergence, gradient terms).
4. ``sparse_tail_grad_kernel`` (grid: rows x column blocks) writes ``g = c_row * exp(z - lse_tail)`` in the
   gradient dtype: the tail part of ``d(logits)``, exactly 0 at the (masked) id columns.
5. ``sparse_scatter_kernel`` (grid: rows x id blocks) writes the ``k`` id values of each row over them.

The single pass (:func:`sod_kernels.sparse.triton_backend.single_pass_loss`) uses its own per-chunk kernels,
listed below the two-pass ones: the gather also reads the sampled token's logit, the row math of step 3 runs in
``sparse_rows_kernel`` (float32), step weights in ``sparse_step_weights_kernel``, and the id columns of
``d(logits)`` are written before ``sparse_tail_fill_kernel`` fills the other columns (no scatter kernel).

Bandwidth: the statistics read ``4 C V`` bytes and the gradient reads ``4 C V`` and writes ``2 C V`` (16-bit
gradient) bytes, as the sampled-token epilogue; the id kernels touch ``O(C k)`` entries.  Deterministic:
ids are distinct within a row, so no two programs write one address.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS, cap_arg, capped_and_slope, interpreting,
                            load_capped_logits, load_capped_logits_slope, load_logits, merge_row_partials)

ID_BLOCK = 128            # ids per program of the gather / scatter kernels
INTERPRETER_ID_BLOCK = 8  # under the interpreter: small blocks so that tests cross block edges
ID_WARPS = 4


@triton.jit
def id_logits(x_row, b_ptr, cols, own, ok, slope_out, inv_temp, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """The logits ``z`` of one row at the columns ``cols`` (0 where not ``own``); with ``HAS_CAP`` the capped
    logits, the cap's slope stored at ``slope_out`` (0 where not ``own``; ``ok``: the slots that exist)."""
    if HAS_CAP:
        z, slope = load_capped_logits_slope(x_row, b_ptr, cols, own, inv_temp, cap, HAS_BIAS)
        tl.store(slope_out, tl.where(own, slope, 0.0), mask=ok)
    else:
        z = load_logits(x_row, b_ptr, cols, own, inv_temp, HAS_BIAS)
    return tl.where(own, z, 0.0)


@triton.jit
def sparse_gather_mask_kernel(x_ptr, b_ptr, ids_ptr, out_ptr, slope_ptr, k, stride_x, stride_ids, stride_out,
                              inv_temp, cap, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CAP: tl.constexpr):
    """``out[row, j] = z(x[row, ids[row, j]])`` (float32; ``z = (x + b) / tau``, with ``HAS_CAP``
    ``cap tanh((x + b) / cap) / tau`` and the cap's slope written to ``slope[row, j]``), then
    ``x[row, ids[row, j]] = -inf``; ``out[row, j] = 0`` and nothing masked where ``ids[row, j] < 0``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs < k
    cols = tl.load(ids_ptr + row * stride_ids + offs, mask=ok, other=-1)
    own = ok & (cols >= 0)
    x_row = x_ptr + row * stride_x
    z = id_logits(x_row, b_ptr, cols, own, ok, slope_ptr + row * stride_out + offs, inv_temp, cap, HAS_BIAS, HAS_CAP)
    tl.store(out_ptr + row * stride_out + offs, z, mask=ok)
    tl.store(x_row + cols, tl.full([BLOCK_K], float("-inf"), tl.float32), mask=own)


@triton.jit
def sparse_tail_grad_kernel(x_ptr, b_ptr, grad_ptr, lse_ptr, coef_ptr, vocab, stride_x, stride_g, inv_temp, cap,
                            HAS_BIAS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    """``grad[row, cols] = coef[row] * exp(z - lse_tail[row])`` in ``grad``'s dtype (0 where ``x = -inf``), times
    the cap's slope with ``HAS_CAP``."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    x_row = x_ptr + row.to(tl.int64) * stride_x
    if HAS_CAP:
        z = load_capped_logits(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS, HAS_CAP)
        _, slope = load_capped_logits_slope(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS)
    else:
        z = load_logits(x_row, b_ptr, cols, ok, inv_temp, HAS_BIAS)
    z = tl.where(ok, z, float("-inf"))
    g = tl.load(coef_ptr + row) * tl.exp(z - tl.load(lse_ptr + row))
    if HAS_CAP:
        g = g * slope
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def sparse_scatter_kernel(grad_ptr, ids_ptr, val_ptr, k, stride_g, stride_ids, stride_val, BLOCK_K: tl.constexpr):
    """``grad[row, ids[row, j]] = val[row, j]`` (float32 values, stored in ``grad``'s dtype); negative ids
    skipped."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = offs < k
    cols = tl.load(ids_ptr + row * stride_ids + offs, mask=ok, other=-1)
    own = ok & (cols >= 0)
    v = tl.load(val_ptr + row * stride_val + offs, mask=own, other=0.0)
    tl.store(grad_ptr + row * stride_g + cols, v.to(grad_ptr.dtype.element_ty), mask=own)


def _id_block() -> int:
    return INTERPRETER_ID_BLOCK if interpreting() else ID_BLOCK


def gather_and_mask(x: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, *, temperature: float,
                    softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z_ids [C, k], slope [C, k] or None)`` float32 of the block ``x [C, V]`` (float32, unit column stride) at
    ``ids [C, k]`` (int64, contiguous; ``-1``: not in this block's columns, giving 0); with ``softcap`` the
    capped logits and the cap's slope ``dz_cap/dx`` at the ids (None without a cap).  ``x`` is left with
    ``-inf`` at those columns."""
    n_rows, k = ids.shape
    out = torch.empty(n_rows, k, dtype=torch.float32, device=x.device)
    slope = torch.empty_like(out) if softcap is not None else None
    if n_rows and k:
        block = _id_block()
        sparse_gather_mask_kernel[(n_rows, triton.cdiv(k, block))](
            x, x if bias is None else bias, ids, out, out if slope is None else slope, k, x.stride(0), ids.stride(0),
            out.stride(0), 1.0 / temperature, cap_arg(softcap), HAS_BIAS=bias is not None, BLOCK_K=block,
            HAS_CAP=softcap is not None, num_warps=ID_WARPS)
    return out, slope


def sparse_logit_grad(x: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, lse_tail: torch.Tensor,
                      tail_coef: torch.Tensor, id_values: torch.Tensor, out: torch.Tensor, *,
                      temperature: float, softcap: float | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``d(logits)``: ``tail_coef [C] * exp(z - lse_tail [C])`` on the masked
    block ``x`` (``-inf`` at the ids; times the cap's slope with ``softcap``), then ``id_values [C, k]`` at
    ``ids`` (already times the slope at the ids with a cap).  Both hold the upstream gradient and ``1/tau``."""
    n_rows, vocab = x.shape
    if not n_rows:
        return out
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    sparse_tail_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        x, x if bias is None else bias, out, lse_tail.to(torch.float32).contiguous(),
        tail_coef.to(torch.float32).contiguous(), vocab, x.stride(0), out.stride(0), 1.0 / temperature,
        cap_arg(softcap), HAS_BIAS=bias is not None, BLOCK_V=block, HAS_CAP=softcap is not None,
        num_warps=NUM_WARPS)
    k = ids.shape[1]
    values = id_values.to(torch.float32).contiguous()
    id_block = _id_block()
    sparse_scatter_kernel[(n_rows, triton.cdiv(k, id_block))](
        out, ids, values, k, out.stride(0), ids.stride(0), values.stride(0), BLOCK_K=id_block, num_warps=ID_WARPS)
    return out


def codegen_specs() -> list[dict]:
    """The three kernels at the headline launch (k = 128 ids, bf16 gradient blocks, with bias), and the gather and
    tail-gradient kernels again with the soft-cap on, for ``benchmarks.codegen`` (sm_90 compile check)."""
    specs = []
    for capped in (False, True):
        tag = "softcap " if capped else ""
        specs += [{
            "name": f"sparse_gather_mask_kernel[{tag}bk{ID_BLOCK}]", "fn": sparse_gather_mask_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "ids_ptr": "*i64", "out_ptr": "*fp32",
                          "slope_ptr": "*fp32", "k": "i32", "stride_x": "i32", "stride_ids": "i32",
                          "stride_out": "i32", "inv_temp": "fp32", "cap": "fp32"},
            "constexprs": {"HAS_BIAS": True, "BLOCK_K": ID_BLOCK, "HAS_CAP": capped},
            "num_warps": ID_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["k", "stride_x", "stride_ids", "stride_out"],
        }, {
            "name": f"sparse_tail_grad_kernel[{tag}bv{GRAD_BLOCK_V}]", "fn": sparse_tail_grad_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "grad_ptr": "*bf16", "lse_ptr": "*fp32",
                          "coef_ptr": "*fp32", "vocab": "i32", "stride_x": "i32", "stride_g": "i32",
                          "inv_temp": "fp32", "cap": "fp32"},
            "constexprs": {"HAS_BIAS": True, "BLOCK_V": GRAD_BLOCK_V, "HAS_CAP": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_x", "stride_g"],
        }]
    specs += _single_pass_specs()
    return specs + [{
        "name": f"sparse_scatter_kernel[bk{ID_BLOCK}]", "fn": sparse_scatter_kernel,
        "signature": {"grad_ptr": "*bf16", "ids_ptr": "*i64", "val_ptr": "*fp32", "k": "i32", "stride_g": "i32",
                      "stride_ids": "i32", "stride_val": "i32"},
        "constexprs": {"BLOCK_K": ID_BLOCK},
        "num_warps": ID_WARPS, "num_stages": 1, "expect_hgmma": False,
        "divisible_by_16": ["k", "stride_g", "stride_ids", "stride_val"],
    }]


# ------------------------------------------------------------------------------------------------------
# The single pass's per-chunk kernels (sod_kernels.sparse.triton_backend.single_pass_loss).
#
# Per chunk of C rows the single pass runs: the logit product; ``sparse_gather_rows_kernel`` (the id logits,
# the cap's slope there and the sampled token's logit, then the ids masked); the statistics kernel of the
# masked block (:func:`sod_kernels.logprobs.kernels.logprob_partials`); ``sparse_rows_kernel`` (the partials'
# merge and all the ``O(C k)`` row math of :func:`sod_kernels.sparse.rows.coarse_grained_rows` in float32,
# D, the sampled log-probs and the cell coefficients, written at the chunk's offset); with in-pass step
# weights ``sparse_step_weights_kernel`` (one program per step: the step means, the weights, the id columns
# of d(logits)); ``sparse_tail_fill_kernel`` (every other column of d(logits), the hard term's target column
# included); then the contraction products.  Every one of them replaces ~10-60 small tensor operations of
# the torch row math (each a launch and a gap on a GPU), and none synchronises with the host.
# ------------------------------------------------------------------------------------------------------
LOG_TAIL_FLOOR = tl.constexpr(-27.631021115928547)  # log(sod_kernels.sparse.rows.TAIL_FLOOR) = log(1e-12)
ROW_TILE_ELEMENTS = 512                 # rows x BLOCK_K of one tile of sparse_rows_kernel (registers, 4 warps)
ROW_WARPS = 4
STEP_BLOCK_N = 256                      # rows per load of a step's signal (sparse_step_weights_kernel)
INTERPRETER_ROW_BLOCK = 4               # under the interpreter: small row tiles so that tests cross tile edges
COLSUM_ROWS, COLSUM_COLUMNS = 16, 256       # sparse_tail_fill_colsum_kernel's tile (4096 entries, 8 warps)
MAX_ROW_BLOCK_K = 4096                  # beyond this many ids per row the single pass keeps the torch row math
DIV_REVERSE, DIV_FORWARD, DIV_JSD = 0, 1, 2



@triton.jit
def sparse_gather_rows_kernel(x_ptr, b_ptr, ids_ptr, y_ptr, zid_ptr, slope_ptr, zy_ptr, k, stride_x, stride_ids,
                              stride_z, inv_temp, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                              HAS_TARGET: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row (``BLOCK_K >= k``): ``zid[row, j] = z(x[row, ids[row, j]])`` (float32; with
    ``HAS_CAP`` the capped logit and the cap's slope in ``slope[row, j]``), with ``HAS_TARGET`` the sampled
    token's logit ``zy[row] = z(x[row, y[row]])`` (taken from the gathered values when ``y`` is an id, so no
    read of a column this program masks), then ``x[row, ids[row, j]] = -inf``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < k
    cols = tl.load(ids_ptr + row * stride_ids + offs, mask=ok, other=-1)
    own = ok & (cols >= 0)
    x_row = x_ptr + row * stride_x
    z = id_logits(x_row, b_ptr, cols, own, ok, slope_ptr + row * stride_z + offs, inv_temp, cap, HAS_BIAS, HAS_CAP)
    tl.store(zid_ptr + row * stride_z + offs, z, mask=ok)
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        match = own & (cols == y)
        n_listed = tl.zeros([1], tl.int32) + tl.max(match.to(tl.int32), axis=0)
        from_ids = tl.sum(tl.where(match, z, 0.0), axis=0)
        # not an id: its column is never masked (ids are distinct per row, one program per row)
        ycol = tl.zeros([1], tl.int64) + y
        take = (ycol >= 0) & (n_listed == 0)
        zt = load_capped_logits(x_row, b_ptr, ycol, take, inv_temp, cap, HAS_BIAS, HAS_CAP)
        tl.store(zy_ptr + row + tl.arange(0, 1), tl.where(n_listed > 0, from_ids, zt))
    tl.store(x_row + cols, tl.full([BLOCK_K], float("-inf"), tl.float32), mask=own)


@triton.jit
def _logaddexp(u, v):
    """``log(e^u + e^v)`` elementwise, ``-inf`` where both are ``-inf`` (no ``inf - inf`` formed)."""
    mx = tl.maximum(u, v)
    mn = tl.minimum(u, v)
    none = mx == float("-inf")
    base = tl.where(none, 0.0, mx)
    return tl.where(none, float("-inf"), base + tl.log(1.0 + tl.exp(mn - base)))


@triton.jit
def _jsd_cell(s, t, log1m_beta, log_beta):
    """``(q r, p (t - log M), r)`` of JSD cells with student / teacher log-masses ``s``, ``t`` (``-inf`` for an
    empty cell): ``log M = logaddexp(s + log(1 - beta), t + log beta)``, ``r = s - log M`` (0 where ``q = 0``)."""
    lm = _logaddexp(s + log1m_beta, t + log_beta)
    q = tl.exp(s)
    p = tl.exp(t)
    has_q = q > 0
    has_p = p > 0
    r = tl.where(has_q, s, 0.0) - tl.where(has_q, lm, 0.0)
    tp = p * (tl.where(has_p, t, 0.0) - tl.where(has_p, lm, 0.0))
    return q * r, tp, r


@triton.jit
def sparse_rows_kernel(part_ptr, zid_ptr, slope_ptr, ids_ptr, a_ptr, tp_ptr, tlogp_ptr, y_ptr, zy_ptr, w_ptr,
                       d_ptr, lps_ptr, lpt_ptr, grad_ptr, idv_ptr, row_ptr,
                       n_rows, num_splits, k, stride_z, stride_ids, stride_a, stride_g, plane_idv, plane_row,
                       grad_scale, hard_scale, log_tail_ids, beta, log1m_beta, log_beta,
                       DIV: tl.constexpr, HAS_CAP: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_HARD: tl.constexpr,
                       W_KNOWN: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    """The coarse-grained row math of ``BLOCK_R`` rows of a chunk (``BLOCK_K >= k``), in float32; the float64
    reference is :func:`sod_kernels.sparse.rows.coarse_grained_rows`, which documents the formulas.

    Inputs (row pointers at the chunk's first row): ``part [3, n_rows, num_splits]`` the statistics partials
    of the masked block (the tail), ``zid``, ``slope [C, k]`` (:func:`sparse_gather_rows_kernel`), ``ids``,
    ``a [C, k]`` (the teacher's log-probs, any float dtype), ``tp``, ``tlogp [C]`` the teacher's tail mass
    ``P`` and ``log P'`` (formed once per call in float64), ``y``, ``zy [C]``, ``w [C]`` (``W_KNOWN``).
    Outputs: ``d``, ``lps``, ``lpt [C]`` (D, log p_s(y), log p_t(y)); the rows' scratch ``row [4, plane_row]``:
    the finite tail log-sum-exp, the tail coefficient before the weight (``grad_tail``), the hard term's tail
    coefficient ``hard_scale Q`` and the target-column coefficient (``-hard_scale`` where ``y`` is a tail
    column, else 0); the id columns of ``d(logits)``: with ``W_KNOWN`` written into ``grad`` at the ids,
    ``((w grad_scale) grad_ids + hard_scale (q - [id = y])) slope``, else the two parts (``grad_ids slope`` and
    ``hard_scale (q - [id = y]) slope``) into ``idv [2, plane_idv]`` for :func:`sparse_step_weights_kernel`.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_rows
    j = tl.arange(0, BLOCK_K)
    cell = ok[:, None] & (j < k)[None, :]
    big_t, log_total, _ = merge_row_partials(part_ptr, r, ok, n_rows, num_splits, WITH_ENTROPY=False,
                                             BLOCK_S=BLOCK_S)
    empty = big_t <= -1e30                         # every column an id: no tail
    lt = tl.where(empty, float("-inf"), big_t + log_total)
    r64 = r.to(tl.int64)
    z = tl.load(zid_ptr + r64[:, None] * stride_z + j[None, :], mask=cell, other=0.0)
    z = tl.where(cell, z, float("-inf"))
    big = tl.maximum(tl.max(z, axis=1), lt)
    big = tl.where(ok, big, 0.0)
    shifted = z - big[:, None]
    tail_shift = lt - big
    lnorm = tl.log(tl.sum(tl.exp(shifted), axis=1) + tl.exp(tail_shift))
    logq = shifted - lnorm[:, None]
    logQ = tail_shift - lnorm
    q = tl.exp(logq)
    Q = tl.exp(logQ)
    P = tl.load(tp_ptr + r, mask=ok, other=0.0)
    logPf = tl.load(tlogp_ptr + r, mask=ok, other=0.0)
    kept = logQ >= LOG_TAIL_FLOOR
    logQf = tl.where(kept, logQ, LOG_TAIL_FLOOR)
    a = tl.load(a_ptr + r64[:, None] * stride_a + j[None, :], mask=cell, other=0.0).to(tl.float32)
    a = tl.minimum(a, 0.0)
    logq_c = tl.where(cell, logq, 0.0)
    if DIV == 0:    # reverse KL
        gap = tl.where(q > 0, logq_c - a, 0.0)
        D = tl.sum(q * gap, axis=1) + Q * (logQf - logPf)
        G = q * (gap + 1.0)
        G_tail = Q * (logQf - logPf + kept.to(tl.float32))
    elif DIV == 1:  # forward KL
        pa = tl.where(cell, tl.exp(a), 0.0)
        D = tl.sum(pa * (a - logq_c), axis=1) + P * (logPf - logQf)
        G = -pa
        G_tail = tl.where(kept, -P, 0.0)
    else:           # generalized JSD over the k + 1 cells
        t_ids = tl.where(cell, a, float("-inf"))
        qr, tp, _ = _jsd_cell(logq, t_ids, log1m_beta, log_beta)
        t_tail = tl.where(P > 0, tl.log(tl.where(P > 0, P, 1.0)), float("-inf"))
        qr_t, tp_t, _ = _jsd_cell(logQ, t_tail, log1m_beta, log_beta)
        D = beta * (tl.sum(tp, axis=1) + tp_t) + (1.0 - beta) * (tl.sum(qr, axis=1) + qr_t)
        G = (1.0 - beta) * qr
        G_tail = (1.0 - beta) * qr_t
    # dD/dz = G_c - q_c sigma with sigma = sum_c G_c.  At the cell holding most of the mass (q_* near 1) that
    # difference cancels in float32; there it is formed as G_* (1 - q_*) - q_* sum_{c != *} G_c with
    # 1 - q_* = sum_{c != *} q_c summed directly (exact identities: the cells' masses sum to 1).
    q_top = tl.max(q, axis=1)
    star_tail = Q > q_top
    star = cell & (j[None, :] == tl.argmax(q, axis=1)[:, None]) & (star_tail == 0)[:, None]
    rest_q = tl.sum(tl.where(star, 0.0, q), axis=1) + tl.where(star_tail, 0.0, Q)
    rest_g = tl.sum(tl.where(star, 0.0, G), axis=1) + tl.where(star_tail, 0.0, G_tail)
    sigma = tl.where(star_tail, G_tail, tl.sum(tl.where(star, G, 0.0), axis=1)) + rest_g
    g_ids = tl.where(star, G * rest_q[:, None] - q * rest_g[:, None], G - q * sigma[:, None])
    g_tail = tl.where(star_tail, G_tail * rest_q - Q * rest_g, G_tail - Q * sigma)
    tl.store(d_ptr + r, D, mask=ok)
    tl.store(row_ptr + r, tl.where(empty, 0.0, lt), mask=ok)
    tl.store(row_ptr + plane_row + r, g_tail, mask=ok)
    hard_ids = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
    if HAS_TARGET:
        ids = tl.load(ids_ptr + r64[:, None] * stride_ids + j[None, :], mask=cell, other=-1)
        y = tl.load(y_ptr + r, mask=ok, other=-1)
        match = cell & (ids == y[:, None])
        listed = tl.max(match.to(tl.int32), axis=1) > 0
        lp_s = tl.load(zy_ptr + r, mask=ok, other=0.0) - (big + lnorm)
        lp_t = tl.where(listed, tl.sum(tl.where(match, a, 0.0), axis=1), logPf - log_tail_ids)
        tl.store(lps_ptr + r, lp_s, mask=ok)
        tl.store(lpt_ptr + r, lp_t, mask=ok)
        if HAS_HARD:  # d(-log p_s(y))/dz = p_s - onehot(y): q at the ids, Q times the tail softmax
            hard_ids = hard_scale * tl.where(match & star, -rest_q[:, None], q - match.to(tl.float32))
            tl.store(row_ptr + 2 * plane_row + r, hard_scale * Q, mask=ok)
            tl.store(row_ptr + 3 * plane_row + r, tl.where(listed, 0.0, -hard_scale), mask=ok)
    if WRITE_GRAD:
        if HAS_CAP:
            slope = tl.load(slope_ptr + r64[:, None] * stride_z + j[None, :], mask=cell, other=0.0)
            g_ids = g_ids * slope
            hard_ids = hard_ids * slope
        if W_KNOWN:
            w = tl.load(w_ptr + r, mask=ok, other=0.0).to(tl.float32)
            vals = (w * grad_scale)[:, None] * g_ids + hard_ids
            cols = tl.load(ids_ptr + r64[:, None] * stride_ids + j[None, :], mask=cell, other=0)
            tl.store(grad_ptr + r64[:, None] * stride_g + cols, vals.to(grad_ptr.dtype.element_ty), mask=cell)
        else:
            at = r64[:, None] * stride_z + j[None, :]
            tl.store(idv_ptr + at, g_ids, mask=cell)
            if HAS_HARD:
                tl.store(idv_ptr + plane_idv + at, hard_ids, mask=cell)


@triton.jit
def _step_signal_sum(d_ptr, lps_ptr, lpt_ptr, lo, hi, SAMPLED: tl.constexpr, BLOCK_N: tl.constexpr):
    """``sum max(signal, 0)`` over the chunk rows ``[lo, hi)`` (``signal = D``, or ``|lp_s - lp_t|`` with
    ``SAMPLED``) in a fixed order: every program that sums one step gets the same bits."""
    acc = tl.zeros([BLOCK_N], tl.float32)
    for i in range(lo, hi, BLOCK_N):
        rr = i + tl.arange(0, BLOCK_N)
        m = rr < hi
        if SAMPLED:
            x = tl.abs(tl.load(lps_ptr + rr, mask=m, other=0.0) - tl.load(lpt_ptr + rr, mask=m, other=0.0))
        else:
            x = tl.load(d_ptr + rr, mask=m, other=0.0)
        acc += tl.where(m, tl.maximum(x, 0.0), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def sparse_step_weights_kernel(d_ptr, lps_ptr, lpt_ptr, bounds_ptr, first_ptr, means_ptr, w_ptr, ids_ptr, idv_ptr,
                               grad_ptr, s0, start, k, stride_ids, stride_z, plane_idv, stride_g, grad_scale,
                               epsilon, max_weight, SAMPLED: tl.constexpr, HAS_HARD: tl.constexpr,
                               WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    """One program per step ``s = s0 + program_id`` of a chunk of whole steps (rows ``[bounds[s], bounds[s+1])``
    of the call, ``start`` its first row; row pointers at the chunk's first row): the step mean ``d_s`` of the
    clamped signal (stored in ``means [S]``), ``w = min((d_1 + eps) / (d_s + eps), 1 + delta)`` (1 for a first
    step) with ``d_1`` the mean of the sequence's first step ``first[s]`` (read from ``means`` when an earlier
    chunk holds it, else summed again here with the same code: the same bits), ``w`` written per row, and
    with ``WRITE_GRAD`` the id columns of ``d(logits)``, ``(w grad_scale) idv[0] + idv[1]``, at the ids.
    ``O(rows + k rows)`` work per step; the plan of :class:`sod_kernels.steps.plan.InPassStepWeights`."""
    s = s0 + tl.program_id(0)
    lo = (tl.load(bounds_ptr + s) - start).to(tl.int32)
    hi = (tl.load(bounds_ptr + s + 1) - start).to(tl.int32)
    d_s = _step_signal_sum(d_ptr, lps_ptr, lpt_ptr, lo, hi, SAMPLED, BLOCK_N) / (hi - lo).to(tl.float32)
    tl.store(means_ptr + s, d_s)
    f = tl.load(first_ptr + s)
    here = f >= s0
    lo_f = (tl.load(bounds_ptr + f) - start).to(tl.int32)
    hi_f = tl.where(here, (tl.load(bounds_ptr + f + 1) - start).to(tl.int32), lo_f)
    count_f = tl.maximum(hi_f - lo_f, 1).to(tl.float32)
    d_1 = tl.where(here, _step_signal_sum(d_ptr, lps_ptr, lpt_ptr, lo_f, hi_f, SAMPLED, BLOCK_N) / count_f,
                   tl.load(means_ptr + f))
    w = tl.minimum((d_1 + epsilon) / (d_s + epsilon), max_weight)
    w = tl.where(f == s, 1.0, w)
    j = tl.arange(0, BLOCK_K)
    for i in range(lo, hi, BLOCK_R):
        r = i + tl.arange(0, BLOCK_R)
        ok = r < hi
        tl.store(w_ptr + r, tl.zeros([BLOCK_R], tl.float32) + w, mask=ok)
        if WRITE_GRAD:
            cell = ok[:, None] & (j < k)[None, :]
            r64 = r.to(tl.int64)
            at = r64[:, None] * stride_z + j[None, :]
            vals = (w * grad_scale) * tl.load(idv_ptr + at, mask=cell, other=0.0)
            if HAS_HARD:
                vals += tl.load(idv_ptr + plane_idv + at, mask=cell, other=0.0)
            cols = tl.load(ids_ptr + r64[:, None] * stride_ids + j[None, :], mask=cell, other=0)
            tl.store(grad_ptr + r64[:, None] * stride_g + cols, vals.to(grad_ptr.dtype.element_ty), mask=cell)


@triton.jit
def sparse_tail_fill_kernel(x_ptr, b_ptr, grad_ptr, row_ptr, w_ptr, y_ptr, vocab, stride_x, stride_g, plane_row,
                            inv_temp, cap, grad_scale, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                            HAS_HARD: tl.constexpr, BLOCK_V: tl.constexpr):
    """``grad[row, v] = (c exp(z_v - lse_tail) + [v = y] t) slope_v`` at every column not masked (``-inf`` in the
    raw block: the ids, whose values an earlier kernel wrote; a raw logit can only be ``-inf`` there by a float32
    overflow of the product, whose entry is then left as is), with ``c = (w grad_scale) row[1] + row[2]`` (``row[2]``
    and the target term ``t = row[3]`` only with ``HAS_HARD``), ``lse_tail = row[0]`` and the cap's slope
    (1 without ``HAS_CAP``); one read of the raw block."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=ok, other=float("-inf"))
    tail = ok & (x != float("-inf"))   # the raw block: a -inf bias entry is a tail column (gradient 0)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_CAP:
        z, slope = capped_and_slope(x, inv_temp, cap)
    else:
        z = x * inv_temp
    c = (tl.load(w_ptr + row) * grad_scale) * tl.load(row_ptr + plane_row + row)
    if HAS_HARD:
        c += tl.load(row_ptr + 2 * plane_row + row)
    g = c * tl.exp(z - tl.load(row_ptr + row))
    if HAS_HARD:
        g += tl.where(cols == tl.load(y_ptr + row), tl.load(row_ptr + 3 * plane_row + row), 0.0)
    if HAS_CAP:
        g = g * slope
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=tail)



@triton.jit
def sparse_tail_fill_colsum_kernel(x_ptr, b_ptr, grad_ptr, row_ptr, w_ptr, y_ptr, dbias_ptr, n_rows, vocab, stride_x,
                                   stride_g, plane_row, inv_temp, cap, grad_scale, HAS_CAP: tl.constexpr,
                                   HAS_HARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """``sparse_tail_fill_kernel`` (with a bias) for one block of columns over all ``n_rows`` rows, in
    ``BLOCK_R``-row tiles, adding the block's column sums of the stored ``d(logits)`` (the tail values it
    writes and the id values already there) to ``dbias`` (float32): ``d(bias)`` without a separate column-sum
    launch nor a second read of the gradient block.  Each program owns its columns and adds its rows in a fixed
    order (no atomics: deterministic)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    okc = cols < vocab
    bias = tl.load(b_ptr + cols, mask=okc, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_V], tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        okr = r < n_rows
        m2 = okr[:, None] & okc[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=m2, other=float("-inf"))
        tail = m2 & (x != float("-inf"))   # the raw block: a -inf bias entry is a tail column (gradient 0)
        at_ids = m2 & (x == float("-inf"))
        x = x + bias[None, :]
        if HAS_CAP:
            z, slope = capped_and_slope(x, inv_temp, cap)
        else:
            z = x * inv_temp
        c = (tl.load(w_ptr + r, mask=okr, other=0.0) * grad_scale) * tl.load(row_ptr + plane_row + r, mask=okr,
                                                                              other=0.0)
        if HAS_HARD:
            c += tl.load(row_ptr + 2 * plane_row + r, mask=okr, other=0.0)
        g = c[:, None] * tl.exp(z - tl.load(row_ptr + r, mask=okr, other=0.0)[:, None])
        if HAS_HARD:
            y = tl.load(y_ptr + r, mask=okr, other=-1)
            g += tl.where(cols[None, :] == y[:, None], tl.load(row_ptr + 3 * plane_row + r, mask=okr,
                                                               other=0.0)[:, None], 0.0)
        if HAS_CAP:
            g = g * slope
        g = g.to(grad_ptr.dtype.element_ty)
        at = grad_ptr + r64[:, None] * stride_g + cols[None, :]
        tl.store(at, g, mask=tail)
        ids_part = tl.load(at, mask=at_ids, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(tail, g.to(tl.float32), ids_part), axis=0)
    tl.store(dbias_ptr + cols, tl.load(dbias_ptr + cols, mask=okc, other=0.0) + acc, mask=okc)


def row_block_k(k: int) -> int:
    """``BLOCK_K`` of the single pass's row kernels: the next power of two ``>= k`` (at least 2)."""
    return max(triton.next_power_of_2(max(k, 1)), 2)


def row_block_r(block_k: int) -> int:
    """Rows per tile of ``sparse_rows_kernel`` / ``sparse_step_weights_kernel``: ``ROW_TILE_ELEMENTS / BLOCK_K``
    (1 to 64; about 16 float32 tiles live per thread at 4 warps), 4 under the interpreter."""
    if interpreting():
        return INTERPRETER_ROW_BLOCK
    return max(1, min(64, ROW_TILE_ELEMENTS // block_k))


def gather_id_logits(x: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, y: torch.Tensor | None,
                zid: torch.Tensor, slope: torch.Tensor | None, zy: torch.Tensor | None, *, temperature: float,
                softcap: float | None) -> None:
    """One launch of ``sparse_gather_rows_kernel`` over the ``C`` rows of ``x [C, V]`` (float32, masked in
    place): ``ids [C, k]`` int64 (unit column stride), ``y [C]`` int64 or None, outputs ``zid``, ``slope``
    (with a cap) ``[C, k]`` float32 of one row stride, ``zy [C]`` float32 (with ``y``)."""
    n_rows, k = ids.shape
    if not n_rows:
        return
    sparse_gather_rows_kernel[(n_rows,)](
        x, x if bias is None else bias, ids, zid if y is None else y, zid, zid if slope is None else slope,
        zid if zy is None else zy, k, x.stride(0), ids.stride(0), zid.stride(0), 1.0 / temperature,
        cap_arg(softcap), HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, HAS_TARGET=y is not None,
        BLOCK_K=row_block_k(k), num_warps=ID_WARPS)


def tail_fill(x: torch.Tensor, bias: torch.Tensor | None, grad: torch.Tensor, rows: torch.Tensor, w: torch.Tensor,
              y: torch.Tensor | None, *, grad_scale: float, temperature: float, softcap: float | None,
              hard: bool, d_bias: torch.Tensor | None = None) -> None:
    """One launch writing the tail columns of ``grad [C, V]`` from the masked block ``x [C, V]``, the rows'
    scratch ``rows [4, >= C]`` of ``sparse_rows_kernel``, the weights ``w [C]`` float32 and (``hard``) the
    targets ``y [C]`` int64: ``sparse_tail_fill_kernel`` (grid: rows x column blocks), or with ``d_bias [V]``
    (float32, contiguous; needs ``bias``) ``sparse_tail_fill_colsum_kernel`` (grid: column blocks), which also
    adds the block's column sums to ``d_bias``."""
    n_rows, vocab = x.shape
    if not n_rows:
        return
    args = (rows, w, y if hard else rows)
    if d_bias is not None:
        block_r, block_v = (4, 16) if interpreting() else (COLSUM_ROWS, COLSUM_COLUMNS)
        sparse_tail_fill_colsum_kernel[(triton.cdiv(vocab, block_v),)](
            x, bias, grad, *args, d_bias, n_rows, vocab, x.stride(0), grad.stride(0), rows.stride(0),
            1.0 / temperature, cap_arg(softcap), float(grad_scale), HAS_CAP=softcap is not None, HAS_HARD=hard,
            BLOCK_R=block_r, BLOCK_V=block_v, num_warps=NUM_WARPS)
        return
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    sparse_tail_fill_kernel[(n_rows, triton.cdiv(vocab, block))](
        x, x if bias is None else bias, grad, *args, vocab, x.stride(0), grad.stride(0),
        rows.stride(0), 1.0 / temperature, cap_arg(softcap), float(grad_scale), HAS_BIAS=bias is not None,
        HAS_CAP=softcap is not None, HAS_HARD=hard, BLOCK_V=block, num_warps=NUM_WARPS)


def rows_terms(part: torch.Tensor, zid: torch.Tensor, slope: torch.Tensor | None, ids: torch.Tensor,
               logprobs: torch.Tensor, teacher_tail: torch.Tensor, y: torch.Tensor | None, zy: torch.Tensor | None,
               w: torch.Tensor | None, out: tuple, grad: torch.Tensor | None, idv: torch.Tensor | None,
               rows: torch.Tensor, *, divergence: str, beta: float, grad_scale: float, hard_scale: float,
               vocab: int) -> None:
    """One launch of ``sparse_rows_kernel`` for a chunk of ``C`` rows (all row tensors views at the chunk's
    first row): ``part [3, C, splits]`` (the masked block's statistics partials), ``zid``, ``slope [C, k]``
    (:func:`gather_id_logits`), ``ids [C, k]`` int64, ``logprobs [C, k]``, ``teacher_tail [2, >= C]`` (``P``,
    ``log P'``; a view of the call's ``[2, Na]`` float32 buffer), ``y``, ``zy [C]`` or None, ``w [C]`` float32
    (weights known before the chunk) or None (step weights: the id parts go to ``idv [2, >= C, k]``),
    ``out = (D, lp_s, lp_t)`` ``[C]`` float32 views (the last two None without targets), ``grad [C, V]`` or
    None (no gradient), ``rows [4, >= C]`` float32 scratch.  ``hard_scale > 0``: the hard-label term."""
    n_rows, k = ids.shape
    if not n_rows:
        return
    D, lp_s, lp_t = out
    block_k = row_block_k(k)
    block_r = row_block_r(block_k)
    splits = part.shape[2]
    div = {"reverse_kl": DIV_REVERSE, "forward_kl": DIV_FORWARD, "jsd": DIV_JSD}[divergence]
    b = min(max(beta, 1e-30), 1.0 - 1e-16) if divergence == "jsd" else 0.5
    has_target = y is not None
    write = grad is not None
    sparse_rows_kernel[(triton.cdiv(n_rows, block_r),)](
        part, zid, zid if slope is None else slope, ids, logprobs, teacher_tail[0], teacher_tail[1],
        y if has_target else ids, zy if has_target else zid, w if w is not None else zid, D,
        lp_s if has_target else D, lp_t if has_target else D, grad if write else zid,
        idv if idv is not None else zid, rows,
        n_rows, splits, k, zid.stride(0), ids.stride(0), logprobs.stride(0), grad.stride(0) if write else 0,
        idv[0].numel() if idv is not None else 0, rows.stride(0), float(grad_scale), float(hard_scale),
        math.log(max(vocab - k, 1)), float(b), math.log1p(-b), math.log(b),
        DIV=div, HAS_CAP=slope is not None, HAS_TARGET=has_target, HAS_HARD=bool(hard_scale) and has_target,
        W_KNOWN=w is not None, WRITE_GRAD=write, BLOCK_R=block_r, BLOCK_K=block_k,
        BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=ROW_WARPS)


def step_weights(D: torch.Tensor, lp_s: torch.Tensor | None, lp_t: torch.Tensor | None, plan: tuple, first: int,
                 count: int, start: int, w: torch.Tensor, ids: torch.Tensor, idv: torch.Tensor,
                 grad: torch.Tensor | None, *, grad_scale: float, epsilon: float, delta: float, sampled: bool,
                 hard: bool) -> None:
    """One launch of ``sparse_step_weights_kernel`` over the ``count`` steps ``first ..`` of a chunk that
    starts at row ``start`` (``D``, ``lp_s``, ``lp_t``, ``w`` ``[C]`` float32 and ``ids [C, k]`` views at that
    row; ``plan = (bounds [S + 1], first_step [S], means [S] float32)``; ``idv [2, >= C, k]`` from
    :func:`rows_terms`; ``grad [C, V]`` or None)."""
    if not count:
        return
    bounds, first_step, means = plan
    k = ids.shape[1]
    block_k = row_block_k(k)
    block_n = INTERPRETER_ROW_BLOCK if interpreting() else STEP_BLOCK_N
    write = grad is not None
    sparse_step_weights_kernel[(count,)](
        D, D if lp_s is None else lp_s, D if lp_t is None else lp_t, bounds, first_step, means, w, ids, idv,
        grad if write else D, first, start, k, ids.stride(0), idv.stride(1), idv[0].numel(),
        grad.stride(0) if write else 0, float(grad_scale), float(epsilon), 1.0 + float(delta),
        SAMPLED=sampled, HAS_HARD=hard, WRITE_GRAD=write, BLOCK_N=block_n, BLOCK_R=row_block_r(block_k),
        BLOCK_K=block_k, num_warps=ROW_WARPS)


def _single_pass_specs() -> list[dict]:
    """The single pass's kernels at the headline launch (k = 128 ids: row tiles of 4 x 128; bf16 gradient
    blocks; two vocabulary splits), the row kernel for each divergence with the hard term and the step
    weights' id parts, the gather and tail kernels with and without the soft-cap, the column-sum tail kernel
    (a bias)."""
    k_block, r_block = 128, ROW_TILE_ELEMENTS // 128
    specs = []
    for capped in (False, True):
        tag = "softcap " if capped else ""
        specs += [{
            "name": f"sparse_gather_rows_kernel[{tag}target bk{k_block}]", "fn": sparse_gather_rows_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "ids_ptr": "*i64", "y_ptr": "*i64", "zid_ptr": "*fp32",
                          "slope_ptr": "*fp32", "zy_ptr": "*fp32", "k": "i32", "stride_x": "i32",
                          "stride_ids": "i32", "stride_z": "i32", "inv_temp": "fp32", "cap": "fp32"},
            "constexprs": {"HAS_BIAS": True, "HAS_CAP": capped, "HAS_TARGET": True, "BLOCK_K": k_block},
            "num_warps": ID_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["k", "stride_x", "stride_ids", "stride_z"],
        }, {
            "name": f"sparse_tail_fill_kernel[{tag}hard bv{GRAD_BLOCK_V}]", "fn": sparse_tail_fill_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "grad_ptr": "*bf16", "row_ptr": "*fp32",
                          "w_ptr": "*fp32", "y_ptr": "*i64", "vocab": "i32", "stride_x": "i32", "stride_g": "i32",
                          "plane_row": "i32", "inv_temp": "fp32", "cap": "fp32", "grad_scale": "fp32"},
            "constexprs": {"HAS_BIAS": True, "HAS_CAP": capped, "HAS_HARD": True, "BLOCK_V": GRAD_BLOCK_V},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_x", "stride_g", "plane_row"],
        }, {
            "name": f"sparse_tail_fill_colsum_kernel[{tag}hard br{COLSUM_ROWS} bv{COLSUM_COLUMNS}]",
            "fn": sparse_tail_fill_colsum_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "grad_ptr": "*bf16", "row_ptr": "*fp32",
                          "w_ptr": "*fp32", "y_ptr": "*i64", "dbias_ptr": "*fp32", "n_rows": "i32", "vocab": "i32",
                          "stride_x": "i32", "stride_g": "i32", "plane_row": "i32", "inv_temp": "fp32",
                          "cap": "fp32", "grad_scale": "fp32"},
            "constexprs": {"HAS_CAP": capped, "HAS_HARD": True, "BLOCK_R": COLSUM_ROWS, "BLOCK_V": COLSUM_COLUMNS},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["n_rows", "vocab", "stride_x", "stride_g", "plane_row"],
        }]
    for name, div in (("reverse_kl", DIV_REVERSE), ("forward_kl", DIV_FORWARD), ("jsd", DIV_JSD)):
        for known in (True, False):
            specs.append({
                "name": f"sparse_rows_kernel[{name} hard {'weights' if known else 'steps'} softcap "
                        f"br{r_block} bk{k_block}]", "fn": sparse_rows_kernel,
                "signature": {"part_ptr": "*fp32", "zid_ptr": "*fp32", "slope_ptr": "*fp32", "ids_ptr": "*i64",
                              "a_ptr": "*fp32", "tp_ptr": "*fp32", "tlogp_ptr": "*fp32", "y_ptr": "*i64",
                              "zy_ptr": "*fp32", "w_ptr": "*fp32", "d_ptr": "*fp32", "lps_ptr": "*fp32",
                              "lpt_ptr": "*fp32", "grad_ptr": "*bf16", "idv_ptr": "*fp32", "row_ptr": "*fp32",
                              "n_rows": "i32", "num_splits": "i32", "k": "i32", "stride_z": "i32",
                              "stride_ids": "i32", "stride_a": "i32", "stride_g": "i32", "plane_idv": "i32",
                              "plane_row": "i32", "grad_scale": "fp32", "hard_scale": "fp32",
                              "log_tail_ids": "fp32", "beta": "fp32", "log1m_beta": "fp32", "log_beta": "fp32"},
                "constexprs": {"DIV": div, "HAS_CAP": True, "HAS_TARGET": True, "HAS_HARD": True, "W_KNOWN": known,
                               "WRITE_GRAD": True, "BLOCK_R": r_block, "BLOCK_K": k_block, "BLOCK_S": 2},
                "num_warps": ROW_WARPS, "num_stages": 1, "expect_hgmma": False,
                "divisible_by_16": ["n_rows", "k", "stride_z", "stride_ids", "stride_a", "stride_g", "plane_idv",
                                    "plane_row"],
            })
    for sampled in (False, True):
        specs.append({
            "name": f"sparse_step_weights_kernel[{'sampled' if sampled else 'kl'} hard br{r_block} bk{k_block}]",
            "fn": sparse_step_weights_kernel,
            "signature": {"d_ptr": "*fp32", "lps_ptr": "*fp32", "lpt_ptr": "*fp32", "bounds_ptr": "*i64",
                          "first_ptr": "*i64", "means_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i64",
                          "idv_ptr": "*fp32", "grad_ptr": "*bf16", "s0": "i32", "start": "i32", "k": "i32",
                          "stride_ids": "i32", "stride_z": "i32", "plane_idv": "i32", "stride_g": "i32",
                          "grad_scale": "fp32", "epsilon": "fp32", "max_weight": "fp32"},
            "constexprs": {"SAMPLED": sampled, "HAS_HARD": True, "WRITE_GRAD": True, "BLOCK_N": STEP_BLOCK_N,
                           "BLOCK_R": r_block, "BLOCK_K": k_block},
            "num_warps": ROW_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["k", "stride_ids", "stride_z", "plane_idv", "stride_g"],
        })
    return specs
