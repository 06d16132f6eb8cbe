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

Bandwidth: the statistics read ``4 C V`` bytes and the gradient reads ``4 C V`` and writes ``2 C V`` (16-bit
gradient) bytes, as the sampled-token epilogue; the id kernels touch ``O(C k)`` entries.  Deterministic:
ids are distinct within a row, so no two programs write one address.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS, cap_arg, interpreting, load_capped_logits,
                            load_capped_logits_slope, load_logits)

ID_BLOCK = 128            # ids per program of the gather / scatter kernels
INTERPRETER_ID_BLOCK = 8  # under the interpreter: small blocks so that tests cross block edges
ID_WARPS = 4


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
    if HAS_CAP:
        z, slope = load_capped_logits_slope(x_row, b_ptr, cols, own, inv_temp, cap, HAS_BIAS)
        tl.store(slope_ptr + row * stride_out + offs, tl.where(own, slope, 0.0), mask=ok)
    else:
        z = load_logits(x_row, b_ptr, cols, own, inv_temp, HAS_BIAS)
    tl.store(out_ptr + row * stride_out + offs, tl.where(own, z, 0.0), mask=ok)
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
    return specs + [{
        "name": f"sparse_scatter_kernel[bk{ID_BLOCK}]", "fn": sparse_scatter_kernel,
        "signature": {"grad_ptr": "*bf16", "ids_ptr": "*i64", "val_ptr": "*fp32", "k": "i32", "stride_g": "i32",
                      "stride_ids": "i32", "stride_val": "i32"},
        "constexprs": {"BLOCK_K": ID_BLOCK},
        "num_warps": ID_WARPS, "num_stages": 1, "expect_hgmma": False,
        "divisible_by_16": ["k", "stride_g", "stride_ids", "stride_val"],
    }]
