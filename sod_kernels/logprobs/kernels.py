"""The sampled-token log-prob epilogue on the chunked core (token log-probs, entropy, the policy loss).

Input: a raw float32 logit block ``x [C, V]`` of one row chunk (:func:`sod_kernels.chunked_core.logits_into`);
bias, the optional soft-cap ``c`` and ``1/tau`` are applied on load, ``z = (x + b) / tau`` or
``z = c tanh((x + b) / c) / tau``, ``p = softmax(z)``; with a cap, ``d(logits)`` is multiplied by the cap's
slope ``1 - tanh^2((x + b) / c)``, computed from the same loaded value.

- ``logprob_partial_stats_kernel`` (grid: rows x vocabulary splits): online log-sum-exp, and with
  ``WITH_ENTROPY`` the accumulator ``B' = sum exp(z - m) (z - m)`` in the max-shifted frame, 3 floats per
  (row, split); :func:`logprob_row_stats` merges them: ``lse = M + log L``, ``E_p[z] - M = B / L`` and the
  entropy ``H = lse - E_p[z] = log L - B / L`` (no difference of large numbers).
- ``logprob_logit_grad_kernel`` (grid: rows x column blocks) writes, in the gradient dtype,
  ``d(logits) = a_row (onehot(y) - p) + e_row (-p ((z - M) - B / L))``: the first term is ``d logp(y)/dz``,
  the second ``dH/dz``; ``a_row`` and ``e_row`` hold the upstream gradients and ``1/tau``.

Both are bandwidth bound: ``4 C V`` bytes read for the statistics, ``4 C V`` read and ``2 C V`` written
(16-bit gradient) for ``d(logits)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .kl_epilogue import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, MIN_LOGIT, NUM_WARPS, STATS_BLOCK_V, _cap_arg,
                          _interpreting, _load_capped_logits, _load_capped_logits_slope, _load_logits, vocab_splits)

NUM_PARTIALS = 3


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
        z = tl.where(ok, _load_capped_logits(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS, HAS_CAP), MIN_LOGIT)
        new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - new)
        e = tl.exp(z - new)
        if WITH_ENTROPY:
            acc = alpha * (acc + l * (m - new)) + tl.sum(e * (z - new), axis=0)
        l = l * alpha + tl.sum(e, axis=0)
        m = new
    out = part_ptr + row * num_splits + split
    plane = n_rows * num_splits
    tl.store(out, m)
    tl.store(out + plane, l)
    tl.store(out + 2 * plane, acc)


@triton.jit
def logprob_logit_grad_kernel(x_ptr, b_ptr, y_ptr, grad_ptr, max_ptr, lse_ptr, mean_ptr, a_ptr, e_ptr, vocab,
                              stride_x, stride_g, inv_temp, cap, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                              BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    """``grad[row, cols] = a (onehot(y) - p) - e p ((z - M) - mean)`` in ``grad``'s dtype (times the cap's
    slope with ``HAS_CAP``)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    x_row = x_ptr + row.to(tl.int64) * stride_x
    if HAS_CAP:
        z, slope = _load_capped_logits_slope(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS)
    else:
        z = _load_logits(x_row, b_ptr, cols, ok, inv_temp, HAS_BIAS)
    p = tl.exp(z - tl.load(lse_ptr + row))
    a = tl.load(a_ptr + row)
    y = tl.load(y_ptr + row)
    g = a * (tl.where(cols == y, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        e = tl.load(e_ptr + row)
        g -= e * p * ((z - tl.load(max_ptr + row)) - tl.load(mean_ptr + row))
    if HAS_CAP:
        g = g * slope
    g = tl.where(ok, g, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


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
    n_rows, vocab = x.shape
    block, cols_per_split, splits = vocab_splits(n_rows, vocab)
    part = torch.empty((NUM_PARTIALS, n_rows, splits), dtype=torch.float32, device=x.device)
    if n_rows:
        logprob_partial_stats_kernel[(n_rows, splits)](
            x, x if bias is None else bias, part, n_rows, vocab, x.stride(0), cols_per_split, splits,
            1.0 / temperature, _cap_arg(softcap), HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
            BLOCK_V=block, HAS_CAP=softcap is not None, num_warps=NUM_WARPS)
    m, l, b = part.unbind(0)
    big = m.amax(1)
    shift = m - big[:, None]
    scale = shift.exp()
    total = (l * scale).sum(1)
    log_total = total.log()
    if not with_entropy:
        return LogprobRowStats(big + log_total, big, torch.zeros_like(big), None)
    mean = (scale * (b + l * shift)).sum(1) / total
    return LogprobRowStats(big + log_total, big, mean, log_total - mean)


def logprob_logit_grad(x: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, stats: LogprobRowStats,
                       grad_logprob: torch.Tensor, grad_entropy: torch.Tensor | None, out: torch.Tensor, *,
                       temperature: float, softcap: float | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``d(logits)`` of upstream ``grad_logprob [C]`` (and ``grad_entropy
    [C]`` or None) through ``logp(y) = z_y - lse`` and ``H``; ``targets [C]`` int64; ``softcap`` as in
    :func:`logprob_row_stats` (the cap's slope is applied)."""
    n_rows, vocab = x.shape
    block = INTERPRETER_BLOCK_V if _interpreting() else GRAD_BLOCK_V
    a = (grad_logprob.to(torch.float32) / temperature).contiguous()
    e = a if grad_entropy is None else (grad_entropy.to(torch.float32) / temperature).contiguous()
    logprob_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        x, x if bias is None else bias, targets.contiguous(), out, stats.max, stats.lse, stats.mean, a, e, vocab,
        x.stride(0), out.stride(0), 1.0 / temperature, _cap_arg(softcap), HAS_BIAS=bias is not None,
        WITH_ENTROPY=grad_entropy is not None, BLOCK_V=block, HAS_CAP=softcap is not None, num_warps=NUM_WARPS)
    return out


def codegen_specs() -> list[dict]:
    """The two kernels at the headline launch (bf16 gradient blocks, with bias and entropy), and again with
    the soft-cap on, for ``benchmarks.codegen`` (sm_90 compile check)."""
    specs = []
    for capped in (False, True):
        tag = "softcap " if capped else ""
        specs += [{
            "name": f"logprob_partial_stats_kernel[{tag}bv{STATS_BLOCK_V}]", "fn": logprob_partial_stats_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32",
                          "stride_x": "i32", "cols_per_split": "i32", "num_splits": "i32", "inv_temp": "fp32",
                          "cap": "fp32"},
            "constexprs": {"HAS_BIAS": True, "WITH_ENTROPY": True, "BLOCK_V": STATS_BLOCK_V, "HAS_CAP": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_x", "cols_per_split"],
        }, {
            "name": f"logprob_logit_grad_kernel[{tag}bv{GRAD_BLOCK_V}]", "fn": logprob_logit_grad_kernel,
            "signature": {"x_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*i64", "grad_ptr": "*bf16",
                          "max_ptr": "*fp32", "lse_ptr": "*fp32", "mean_ptr": "*fp32", "a_ptr": "*fp32",
                          "e_ptr": "*fp32", "vocab": "i32", "stride_x": "i32", "stride_g": "i32",
                          "inv_temp": "fp32", "cap": "fp32"},
            "constexprs": {"HAS_BIAS": True, "WITH_ENTROPY": True, "BLOCK_V": GRAD_BLOCK_V, "HAS_CAP": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_x", "stride_g"],
        }]
    return specs
