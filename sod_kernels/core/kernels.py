"""Triton pieces every loss's kernels share (imported lazily, only on the Triton path).

- Logit loaders: ``z = (x + b) / tau`` of a raw float32 logit block, or with a soft-cap ``c``
  ``z = c tanh((x + b) / c) / tau`` (tanh from one exponential, ``e = exp(-2|u|)``), and the cap's slope
  ``1 - tanh^2 = 4 e / (1 + e)^2`` for a gradient (no cancellation where the cap saturates).
- :func:`vocab_splits`: how a statistics kernel splits the vocabulary (enough programs to fill the GPU; tiny
  blocks and two splits under the interpreter, so small tests cover the split merge).
- One model's row statistics: ``logprob_partial_stats_kernel`` (grid: rows x vocabulary splits) runs an
  online log-sum-exp and, with ``WITH_ENTROPY``, the accumulator ``B' = sum exp(z - m) (z - m)`` in the
  max-shifted frame, 3 floats per (row, split); :func:`logprob_row_stats` merges them: ``lse = M + log L``,
  ``E_p[z] - M = B / L`` and the entropy ``H = log L - B / L`` (no difference of large numbers).  It reads
  ``4 C V`` bytes: bandwidth bound.  :func:`logprob_partials` is its launch (the partials alone, for kernels
  that merge them in registers); ``store_split_partial`` writes one (row, split) partial of any statistics
  kernel.
- :func:`codegen_spec`: one entry of a kernel module's ``codegen_specs()`` (the sm_90 compile check).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .runtime import triton_interpreter_enabled

MIN_LOGIT = tl.constexpr(-1e30)  # masked columns: exp() of it is 0, differences of two of them are 0
STATS_BLOCK_V = 2048
GRAD_BLOCK_V = 2048
NUM_WARPS = 8
INTERPRETER_BLOCK_V = 16
COLSUM_BLOCK_R = 32     # column_sum_add_kernel: rows per loaded tile ...
COLSUM_BLOCK_V = 256    # ... and columns per program
TARGET_PROGRAMS = 1024  # rows x splits of the statistics kernel: enough to fill an H100/H200 several times


@triton.jit
def load_logits(x_ptr, b_ptr, cols, ok, inv_temp, HAS_BIAS: tl.constexpr):
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return x * inv_temp


@triton.jit
def tanh_parts(u):
    """``(tanh(u), exp(-2|u|))`` without overflow: ``tanh|u| = (1 - e) / (1 + e)`` with ``e = exp(-2|u|)``."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t), e


@triton.jit
def load_capped_logits(x_ptr, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """``z = cap tanh((x + b) / cap) / tau`` (``(x + b) / tau`` without ``HAS_CAP``); a masked ``-inf`` column
    stays ``-inf`` through the cap (the sparse epilogue masks the teacher's ids that way)."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_CAP:
        t, _ = tanh_parts(x * (1.0 / cap))
        x = tl.where(x == float("-inf"), x, cap * t)
    return x * inv_temp


@triton.jit
def load_capped_logits_slope(x_ptr, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS: tl.constexpr):
    """``(z, dz_cap/dx)`` with a cap: ``z = cap tanh(u) / tau``, ``u = (x + b) / cap`` and the slope
    ``1 - tanh(u)^2 = 4 e / (1 + e)^2``, ``e = exp(-2|u|)`` (no cancellation where the cap saturates)."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return capped_and_slope(x, inv_temp, cap)


@triton.jit
def capped_and_slope(x, inv_temp, cap):
    """``(cap tanh(x / cap) / tau, 1 - tanh(x / cap)^2)`` of raw logits ``x`` already loaded (float32)."""
    t, e = tanh_parts(x * (1.0 / cap))
    one_e = 1.0 + e
    return (cap * t) * inv_temp, 4.0 * e / (one_e * one_e)


@triton.jit
def load_logits_and_slope(x_ptr, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """``(z, slope)`` of a gradient kernel's student logits: with ``HAS_CAP`` :func:`load_capped_logits_slope`,
    else ``z = (x + b) / tau`` (:func:`load_logits`) and ``slope = 1`` (multiply by it only with ``HAS_CAP``)."""
    if HAS_CAP:
        z, slope = load_capped_logits_slope(x_ptr, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS)
    else:
        z = load_logits(x_ptr, b_ptr, cols, ok, inv_temp, HAS_BIAS)
        slope = 1.0
    return z, slope


def interpreting() -> bool:
    return triton_interpreter_enabled()


def vocab_splits(n_rows: int, vocab: int) -> tuple[int, int, int]:
    """``(BLOCK_V, columns per split, splits)`` of a statistics kernel over ``n_rows x vocab``: enough
    (row, split) programs to fill the GPU (``TARGET_PROGRAMS``), every split non-empty and a whole number of
    blocks; under the interpreter tiny blocks and two splits, so small tests cover the split merge."""
    block = INTERPRETER_BLOCK_V if interpreting() else STATS_BLOCK_V
    n_blocks = triton.cdiv(vocab, block)
    splits = min(n_blocks, 2) if interpreting() else max(min(n_blocks, TARGET_PROGRAMS // max(n_rows, 1)), 1)
    cols_per_split = triton.cdiv(n_blocks, splits) * block
    return block, cols_per_split, triton.cdiv(vocab, cols_per_split)


def bias_arg(bias: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    return fallback if bias is None else bias


def cap_arg(softcap: float | None) -> float:
    return 1.0 if softcap is None else float(softcap)


NUM_PARTIALS = 3


@triton.jit
def store_split_partial(part_ptr, plane, row, split, n_rows, num_splits, value):
    """``part[plane, row, split] = value``: one (row, split) program's partial statistic ``plane`` in a
    statistics kernel's ``part [planes, n_rows, num_splits]`` float32 buffer (merged on the host)."""
    tl.store(part_ptr + (plane * n_rows + row) * num_splits + split, value)


@triton.jit
def logprob_partial_stats_kernel(x_ptr, b_ptr, part_ptr, n_rows, vocab, stride_x, cols_per_split, num_splits,
                                 inv_temp, cap, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                                 BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    """``part [3, n_rows, num_splits]`` float32 <- (m, l, B') of one (row, split)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    v_begin = split * cols_per_split
    offs = tl.arange(0, BLOCK_V)
    m = -1e30
    l = 0.0
    acc = 0.0
    for start in range(0, cols_per_split, BLOCK_V):
        cols = v_begin + start + offs
        ok = cols < vocab
        z = tl.where(ok, load_capped_logits(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS, HAS_CAP), MIN_LOGIT)
        new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - new)
        e = tl.exp(z - new)
        if WITH_ENTROPY:
            acc = alpha * (acc + l * (m - new)) + tl.sum(e * (z - new), axis=0)
        l = l * alpha + tl.sum(e, axis=0)
        m = new
    store_split_partial(part_ptr, 0, row, split, n_rows, num_splits, m)
    store_split_partial(part_ptr, 1, row, split, n_rows, num_splits, l)
    store_split_partial(part_ptr, 2, row, split, n_rows, num_splits, acc)


@triton.jit
def merge_row_partials(part_ptr, r, ok, n_rows, num_splits, WITH_ENTROPY: tl.constexpr, BLOCK_S: tl.constexpr):
    """``(M, log L, mean)`` of the rows ``r`` (``ok``: in range) from ``part [3, n_rows, num_splits]`` (per split
    ``m``, ``l``, ``B'``), the merge of :func:`logprob_row_stats` in registers (the token kernels, the sparse rows kernel):
    ``M = max m``, ``L = sum l e^(m - M)`` (``lse = M + log L``) and with ``WITH_ENTROPY``
    ``mean = sum e^(m - M) (B' + l (m - M)) / L`` (``E_p[z] - M``; the entropy is ``log L - mean``), else 0."""
    s = tl.arange(0, BLOCK_S)
    at = r[:, None] * num_splits + s[None, :]
    ok2 = ok[:, None] & (s[None, :] < num_splits)
    m = tl.load(part_ptr + at, mask=ok2, other=float("-inf"))
    l = tl.load(part_ptr + n_rows * num_splits + at, mask=ok2, other=0.0)
    big = tl.where(ok, tl.max(m, axis=1), 0.0)
    shift = tl.where(ok2, m - big[:, None], 0.0)
    scale = tl.where(ok2, tl.exp(shift), 0.0)
    total = tl.where(ok, tl.sum(l * scale, axis=1), 1.0)
    log_total = tl.log(total)
    mean = tl.zeros_like(log_total)
    if WITH_ENTROPY:
        b = tl.load(part_ptr + 2 * n_rows * num_splits + at, mask=ok2, other=0.0)
        mean = tl.sum(scale * (b + l * shift), axis=1) / total
    return big, log_total, mean


def logprob_partials(x: torch.Tensor, bias: torch.Tensor | None, *, temperature: float,
                     softcap: float | None = None, with_entropy: bool = False) -> torch.Tensor:
    """``part [3, C, splits]`` float32: one launch of ``logprob_partial_stats_kernel`` over the logit block
    ``x [C, V]`` (float32, unit column stride; ``bias [V]`` or None), the per-split ``(max, sum of
    exponentials, B' or 0)`` that :func:`logprob_row_stats` merges with tensor operations and the token
    kernels of :mod:`sod_kernels.logprobs.kernels` in registers."""
    n_rows, vocab = x.shape
    block, cols_per_split, splits = vocab_splits(n_rows, vocab)
    part = torch.empty((NUM_PARTIALS, n_rows, splits), dtype=torch.float32, device=x.device)
    if n_rows:
        logprob_partial_stats_kernel[(n_rows, splits)](
            x, x if bias is None else bias, part, n_rows, vocab, x.stride(0), cols_per_split, splits,
            1.0 / temperature, cap_arg(softcap), HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            BLOCK_V=block, HAS_CAP=softcap is not None, num_warps=NUM_WARPS)
    return part


@triton.jit
def column_sum_add_kernel(g_ptr, out_ptr, n_rows, vocab, stride_g, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """``out[cols] += sum_rows g[rows, cols]`` (fp32 accumulation) for one block of columns; each program owns
    its columns and adds its rows in a fixed order (no atomics: deterministic)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    offs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_R):
        rows = start + offs
        tile = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_g + cols[None, :],
                       mask=(rows < n_rows)[:, None] & ok[None, :], other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(out_ptr + cols, tl.load(out_ptr + cols, mask=ok, other=0.0) + acc, mask=ok)


def column_sum_add(grad: torch.Tensor, out: torch.Tensor) -> None:
    """``out [V] += grad.sum(0)`` in one launch: ``grad [C, V]`` (any float dtype, unit column stride),
    ``out`` float32 contiguous (``d(bias)`` of :class:`sod_kernels.core.loop.DeviceGrads` with ``bias="column_sum"``;
    GradAccumulator's column sum, in-place add and slice write-back are three launches).  Reads ``C V`` gradient entries once, like the sum it
    replaces; ``COLSUM_BLOCK_V``-column programs (about 600 at V = 152k) loop over the rows in
    ``COLSUM_BLOCK_R``-row tiles."""
    n_rows, vocab = grad.shape
    block_r, block_v = (4, 16) if interpreting() else (COLSUM_BLOCK_R, COLSUM_BLOCK_V)
    column_sum_add_kernel[(triton.cdiv(vocab, block_v),)](grad, out, n_rows, vocab, grad.stride(0),
                                                          BLOCK_R=block_r, BLOCK_V=block_v, num_warps=4)


def codegen_spec(name: str, fn, signature: dict, constexprs: dict, divisible_by_16: list[str], *,
                 num_warps: int = 4) -> dict:
    """One entry of a kernel module's ``codegen_specs()`` (read by ``benchmarks.codegen``): the kernel ``fn``
    compiled for sm_90 with ``signature`` (argument -> Triton type), ``constexprs`` and the arguments hinted
    divisible by 16; one stage, no warpgroup MMA expected (an epilogue kernel)."""
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": 1, "expect_hgmma": False, "divisible_by_16": divisible_by_16}


class LogprobRowStats(NamedTuple):
    """Per-row statistics of one chunk (each ``[C]`` float32): log-sum-exp ``lse``, the max ``M``, the
    shifted mean ``E_p[z] - M`` (``mean``; zeros without entropy) and the entropy (None without it)."""

    lse: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    entropy: torch.Tensor | None


def logprob_row_stats(x: torch.Tensor, bias: torch.Tensor | None, *, temperature: float,
                      with_entropy: bool, softcap: float | None = None) -> LogprobRowStats:
    """Statistics of the logit block ``x [C, V]`` (float32, unit column stride); ``bias [V]`` or None;
    ``softcap``: ``cap tanh((x + b) / cap)`` before ``1/tau``, or None."""
    m, l, b = logprob_partials(x, bias, temperature=temperature, softcap=softcap, with_entropy=with_entropy).unbind(0)
    big = m.amax(1)
    shift = m - big[:, None]
    scale = shift.exp()
    total = (l * scale).sum(1)
    log_total = total.log()
    if not with_entropy:
        return LogprobRowStats(big + log_total, big, torch.zeros_like(big), None)
    mean = (scale * (b + l * shift)).sum(1) / total
    return LogprobRowStats(big + log_total, big, mean, log_total - mean)
