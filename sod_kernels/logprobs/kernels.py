"""The sampled-token log-prob epilogue on the chunked core (token log-probs, entropy, the policy loss).

Input: a raw float32 logit block ``x [C, V]`` of one row chunk (:func:`sod_kernels.core.chunks.logits_into`);
bias, the optional soft-cap ``c`` and ``1/tau`` are applied on load, ``z = (x + b) / tau`` or
``z = c tanh((x + b) / c) / tau``, ``p = softmax(z)``; with a cap, ``d(logits)`` is multiplied by the cap's
slope ``1 - tanh^2((x + b) / c)``, computed from the same loaded value.

- The row statistics (log-sum-exp, and the entropy ``H = log L - B / L``) come from the statistics kernel
  every loss shares, :func:`sod_kernels.core.kernels.logprob_row_stats`.
- ``logprob_logit_grad_kernel`` (grid: rows x column blocks) writes, in the gradient dtype,
  ``d(logits) = a_row (onehot(y) - p) + e_row (-p ((z - M) - B / L))``: the first term is ``d logp(y)/dz``,
  the second ``dH/dz``; ``a_row`` and ``e_row`` hold the upstream gradients and ``1/tau``.

Both are bandwidth bound: ``4 C V`` bytes read for the statistics, ``4 C V`` read and ``2 C V`` written
(16-bit gradient) for ``d(logits)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS, STATS_BLOCK_V, LogprobRowStats, cap_arg,
                            interpreting, load_capped_logits_slope, load_logits, logprob_partial_stats_kernel)

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
        z, slope = load_capped_logits_slope(x_row, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS)
    else:
        z = load_logits(x_row, b_ptr, cols, ok, inv_temp, HAS_BIAS)
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


def logprob_logit_grad(x: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, stats: LogprobRowStats,
                       grad_logprob: torch.Tensor, grad_entropy: torch.Tensor | None, out: torch.Tensor, *,
                       temperature: float, softcap: float | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``d(logits)`` of upstream ``grad_logprob [C]`` (and ``grad_entropy
    [C]`` or None) through ``logp(y) = z_y - lse`` and ``H``; ``targets [C]`` int64; ``softcap`` as in
    :func:`logprob_row_stats` (the cap's slope is applied)."""
    n_rows, vocab = x.shape
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    a = (grad_logprob.to(torch.float32) / temperature).contiguous()
    e = a if grad_entropy is None else (grad_entropy.to(torch.float32) / temperature).contiguous()
    logprob_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        x, x if bias is None else bias, targets.contiguous(), out, stats.max, stats.lse, stats.mean, a, e, vocab,
        x.stride(0), out.stride(0), 1.0 / temperature, cap_arg(softcap), HAS_BIAS=bias is not None,
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
