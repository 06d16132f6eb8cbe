"""Device helpers shared by the divergence kernels (:mod:`kl_forward`, :mod:`kl_backward`).

- :func:`grouped_program`: GEMM-style grouped program ordering.  A 1-D launch of
  ``num_row_blocks * num_col_programs`` programs is mapped so that consecutive program ids walk the rows
  of a group of ``GROUP_M`` row blocks first and the column programs (vocabulary splits or tiles) second.
  Programs resident at the same time then hold a few row blocks (their hidden states stay in L2) and
  read the same weight tiles at about the same time (each weight tile comes from HBM once per group).
- :func:`logit_tile`: one ``[BLOCK_M, BLOCK_V]`` tile of temperature-scaled logits
  ``(hidden[rows] @ weight[cols].T + bias[cols]) * inv_temp`` in float32, with a K-loop of ``tl.dot``.
  Rows past the end and columns past the vocabulary are *clamped* to valid indices instead of masked,
  so the hot loads carry no row/column mask (only a K mask when the hidden size is not a multiple of
  ``BLOCK_K``); callers mask the resulting logits.  Offsets that multiply a row or column index by a
  stride are computed in int64 (``V * H`` and ``N * H`` can exceed 2**31).
- :func:`gathered_logit`: the logit of one given column per row (the sampled token), as a gathered
  elementwise dot product, so the sampled log-probabilities never touch the tile loop.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_program(pid, num_row_blocks, num_col_programs, GROUP_M: tl.constexpr):
    """Map a linear program id to ``(row_block, col_program)`` with row blocks grouped by ``GROUP_M``."""
    per_group = GROUP_M * num_col_programs
    group = pid // per_group
    first_row_block = group * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    local = pid % per_group
    return first_row_block + local % group_rows, local // group_rows


@triton.jit
def logit_tile(h_ptr, rows, stride_h, w_ptr, safe_cols, stride_w, b_ptr, K, inv_temp,
               HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, CAST_FP32: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_V]`` float32 logits of rows ``rows`` (int64 ``[BLOCK_M]``, valid indices) and
    columns ``safe_cols`` (``[BLOCK_V]``, valid indices) over a hidden size ``K``.

    ``CAST_FP32`` casts both operand tiles to float32 before ``tl.dot`` (used under the Triton
    interpreter, where bf16 tiles are raw integers); ``DOT_PRECISION`` is ``tl.dot``'s input precision
    ("ieee" for float32 inputs so they are not rounded to tf32).
    """
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + safe_cols.to(tl.int64)[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k + offs_k) < K
            h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if CAST_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + safe_cols).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def gathered_logit(h_ptr, rows, stride_h, w_ptr, cols, stride_w, b_ptr, K, inv_temp, HAS_BIAS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_R]`` float32 logits ``(hidden[rows[i]] . weight[cols[i]] + bias[cols[i]]) * inv_temp``: one
    gathered dot product per row (the sampled token's logit), ``rows`` and ``cols`` int64 valid indices."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + cols[:, None] * stride_w + offs_k[None, :]
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        h = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)
    return acc * inv_temp
