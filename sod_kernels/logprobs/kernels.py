"""The sampled-token log-prob epilogue on the chunked core (token log-probs, entropy, the policy loss).

Input: a raw float32 logit block ``x [C, V]`` of one row chunk (:func:`sod_kernels.core.chunks.logits_into`);
bias, the optional soft-cap ``c`` and ``1/tau`` are applied on load, ``z = (x + b) / tau`` or
``z = c tanh((x + b) / c) / tau``, ``p = softmax(z)``; with a cap, ``d(logits)`` is multiplied by the cap's
slope ``1 - tanh^2((x + b) / c)``, computed from the same loaded value.

Per chunk the epilogue is three launches forward (statistics, token kernel) and one or two for the gradient
(``d(logits)``, the ``d(bias)`` column sum); every other per-row quantity is computed inside them, so no
small tensor operation (each a kernel launch and a gap on a GPU) runs per chunk.

- The per-split row statistics (max, sum of exponentials, and the entropy's accumulator) come from the
  statistics kernel every loss shares, ``logprob_partial_stats_kernel`` of :mod:`sod_kernels.core.kernels`
  (:func:`sod_kernels.core.kernels.logprob_partials`).
- ``logprob_token_kernel`` (grid: blocks of rows; token log-probs): merges the partials in registers
  (:func:`merge_row_partials`: ``lse``, the max, ``E_p[z] - M`` and the entropy ``H = log L - B / L``) and
  reads the sampled logit, writing ``logp(y)``, ``lse``, the frame and the entropy per row.
- ``policy_token_kernel`` (grid: blocks of rows; the one-pass policy loss): the same merge and ``logp(y)``,
  then the PPO dual-clip loss of each token and its derivative in closed form
  (:func:`ppo_dual_clip_terms`), writing per row ``logp``, the token's loss, ``lse`` and the upstream scale
  ``a`` of the ``d(logits)`` kernel: one launch for what were ~80 small tensor operations (the merge, the
  gather, an autograd of the clip).
  Both token kernels move ``O(C * splits)`` bytes: negligible next to the blocks.
- ``logprob_logit_grad_kernel`` (grid: rows x column blocks) writes, in the gradient dtype,
  ``d(logits) = a_row (onehot(y) - p) + e_row (-p ((z - M) - B / L))``: the first term is ``d logp(y)/dz``,
  the second ``dH/dz``; ``a_row`` and ``e_row`` hold the upstream gradients and ``1/tau``.
- (``column_sum_add_kernel``, the d(bias) column sum, lives in :mod:`sod_kernels.core.kernels`; its sm_90 spec is here.)

The statistics and ``d(logits)`` kernels are bandwidth bound: ``4 C V`` bytes read for the statistics,
``4 C V`` read and ``2 C V`` written (16-bit gradient) for ``d(logits)``, ``2 C V`` read by the column sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.kernels import (COLSUM_BLOCK_R, COLSUM_BLOCK_V, GRAD_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS, STATS_BLOCK_V,
                            LogprobRowStats, cap_arg, codegen_spec, column_sum_add_kernel, interpreting,
                            load_capped_logits, load_logits_and_slope, logprob_partial_stats_kernel, merge_row_partials)

POLICY_BLOCK_R = 128    # rows per program of policy_token_kernel (a chunk of 512 rows: 4 programs)


@triton.jit
def logprob_logit_grad_kernel(x_ptr, b_ptr, y_ptr, grad_ptr, max_ptr, lse_ptr, mean_ptr, a_ptr, e_ptr, vocab,
                              stride_x, stride_g, inv_temp, cap, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                              BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr):
    """``grad[row, cols] = a (onehot(y) - p) - e p ((z - M) - mean)`` in ``grad``'s dtype (times the cap's
    slope with ``HAS_CAP``)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    z, slope = load_logits_and_slope(x_ptr + row.to(tl.int64) * stride_x, b_ptr, cols, ok, inv_temp, cap, HAS_BIAS,
                                     HAS_CAP)
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


def logprob_logit_grad_scaled(x: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
                              scale: torch.Tensor, out: torch.Tensor, *, temperature: float,
                              softcap: float | None = None, frame: LogprobRowStats | None = None,
                              scale_entropy: torch.Tensor | None = None) -> torch.Tensor:
    """One launch of ``logprob_logit_grad_kernel``: ``out [C, V] <- scale (onehot(y) - p)`` (minus
    ``scale_entropy p ((z - M) - mean)`` with ``frame``'s max and mean when ``scale_entropy`` is given).

    ``targets [C]`` int64, ``lse``, ``scale`` (``d loss / d logp`` already divided by ``temperature``),
    ``scale_entropy [C]`` float32 contiguous; no tensor operation besides the kernel (the one-pass policy
    loss calls it with the scale its ``policy_token_kernel`` wrote)."""
    n_rows, vocab = x.shape
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    big = lse if frame is None else frame.max
    mean = lse if frame is None else frame.mean
    logprob_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        x, x if bias is None else bias, targets, out, big, lse, mean, scale,
        scale if scale_entropy is None else scale_entropy, vocab, x.stride(0), out.stride(0), 1.0 / temperature,
        cap_arg(softcap), HAS_BIAS=bias is not None, WITH_ENTROPY=scale_entropy is not None, BLOCK_V=block,
        HAS_CAP=softcap is not None, num_warps=NUM_WARPS)
    return out


@triton.jit
def sampled_logprobs(x_ptr, b_ptr, part_ptr, y_ptr, n_rows, num_splits, stride_x, inv_temp, cap,
                     HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_S: tl.constexpr):
    """The beginning of both token kernels, for this program's ``BLOCK_R`` rows ``r`` of a chunk (``ok``:
    ``r < n_rows``): the merged statistics ``(M, log L, mean)`` (:func:`merge_row_partials`), ``lse = M + log L``
    and ``logp = z_y - lse`` with ``z`` as the statistics kernel loads it (``y`` from ``y_ptr``).
    Returns ``(r, ok, M, log L, mean, lse, logp)``, each ``[BLOCK_R]`` float32 but ``r``, ``ok``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < n_rows
    big, log_total, mean = merge_row_partials(part_ptr, r, ok, n_rows, num_splits, WITH_ENTROPY, BLOCK_S)
    lse = big + log_total
    y = tl.load(y_ptr + r, mask=ok, other=0)
    lp = load_capped_logits(x_ptr + r.to(tl.int64) * stride_x, b_ptr, y, ok, inv_temp, cap, HAS_BIAS, HAS_CAP) - lse
    return r, ok, big, log_total, mean, lse, lp


@triton.jit
def logprob_token_kernel(x_ptr, b_ptr, part_ptr, y_ptr, logp_ptr, lse_ptr, max_ptr, mean_ptr, ent_ptr, n_rows,
                         num_splits, stride_x, inv_temp, cap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                         WITH_ENTROPY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per row ``r < n_rows`` of a chunk (output and ``y`` pointers at the chunk's first row): the merged
    statistics (:func:`merge_row_partials`) and ``logp = z_y - lse``; writes ``logp``, ``lse``, ``max`` and,
    with ``WITH_ENTROPY``, ``mean`` and ``entropy = log L - mean`` (float32)."""
    r, ok, big, log_total, mean, lse, lp = sampled_logprobs(x_ptr, b_ptr, part_ptr, y_ptr, n_rows, num_splits,
                                                            stride_x, inv_temp, cap, HAS_BIAS, HAS_CAP,
                                                            WITH_ENTROPY, BLOCK_R, BLOCK_S)
    tl.store(logp_ptr + r, lp, mask=ok)
    tl.store(lse_ptr + r, lse, mask=ok)
    tl.store(max_ptr + r, big, mask=ok)
    if WITH_ENTROPY:
        tl.store(mean_ptr + r, mean, mask=ok)
        tl.store(ent_ptr + r, log_total - mean, mask=ok)


def logprob_token_terms(x: torch.Tensor, bias: torch.Tensor | None, part: torch.Tensor, targets: torch.Tensor,
                        out: tuple, *, temperature: float, softcap: float | None) -> None:
    """One launch of ``logprob_token_kernel`` for a chunk of ``C`` rows: ``x [C, V]`` float32, ``bias [V]`` or
    None, ``part [3, C, splits]`` from :func:`~sod_kernels.core.kernels.logprob_partials`, ``targets [C]``
    int64 contiguous; ``out = (logp, lse, max, mean, entropy)`` ``[C]`` float32 views written in place
    (``mean`` and ``entropy`` None without the entropy)."""
    logp, lse, big, mean, entropy = out
    n_rows, splits = part.shape[1], part.shape[2]
    with_entropy = entropy is not None
    block_r = 16 if interpreting() else POLICY_BLOCK_R
    logprob_token_kernel[(triton.cdiv(n_rows, block_r),)](
        x, x if bias is None else bias, part, targets, logp, lse, big, mean if with_entropy else lse,
        entropy if with_entropy else lse, n_rows, splits, x.stride(0), 1.0 / temperature, cap_arg(softcap),
        HAS_BIAS=bias is not None, HAS_CAP=softcap is not None, WITH_ENTROPY=with_entropy, BLOCK_R=block_r,
        BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=4)


@triton.jit
def ppo_dual_clip_terms(lp, old, adv, lo, hi, neg_dual, HAS_DUAL: tl.constexpr):
    """``(loss, dloss/dlogp)`` of PPO's dual-clip surrogate per token (fp32 tensors of one shape).

    ``ratio = exp(clamp(lp - old, -20, 20))``, ``u = -A ratio``, ``c = -A clip(ratio, lo, hi)``,
    ``l = max(u, c)`` and with ``HAS_DUAL`` where ``A < 0``: ``l = min(l, neg_dual * A)``
    (``neg_dual = -dual_clip``).
    The derivative is the closed form of what torch autograd returns for the same expression
    (``policy_loss.ppo_dual_clip``), subgradients included: ``maximum`` / ``minimum`` send half the gradient
    to each side at a tie, ``clamp`` passes it on its closed interval.  So ``d = k (-A) ratio`` with
    ``k = g (w_u + w_c [lo <= ratio <= hi])``, ``w_u, w_c`` in ``{0, 1/2, 1}`` from ``max``, ``g`` in
    ``{0, 1/2, 1}`` from the dual ``min`` (1 without it or where ``A >= 0``), and 0 where ``lp - old`` lies
    outside ``[-20, 20]``.  The products are formed in autograd's order, so the values match it bitwise for
    the same ratio.  NaN inputs give a NaN loss (the caller's finiteness check reads it).
    """
    d = lp - old
    log_ratio = tl.where(d < -20.0, -20.0, tl.where(d > 20.0, 20.0, d))
    in_clamp = (d >= -20.0) & (d <= 20.0)
    ratio = tl.exp(log_ratio)
    clipped_ratio = tl.where(ratio < lo, lo, tl.where(ratio > hi, hi, ratio))
    neg_a = -adv
    u = neg_a * ratio
    c = neg_a * clipped_ratio
    loss = tl.where(c > u, c, u)  # maximum (a NaN u propagates)
    w_u = tl.where(u > c, 1.0, tl.where(u == c, 0.5, 0.0))
    w_c = tl.where(c > u, 1.0, tl.where(u == c, 0.5, 0.0))
    if HAS_DUAL:
        negative = adv < 0
        bound = adv * neg_dual
        g = tl.where(negative, tl.where(loss < bound, 1.0, tl.where(loss == bound, 0.5, 0.0)), 1.0)
        loss = tl.where(negative, tl.where(bound < loss, bound, loss), loss)
    else:
        g = 1.0
    in_clip = (ratio >= lo) & (ratio <= hi)
    grad_ratio = (g * w_u) * neg_a + tl.where(in_clip, (g * w_c) * neg_a, 0.0)
    return loss, tl.where(in_clamp, grad_ratio * ratio, 0.0)


@triton.jit
def policy_token_kernel(x_ptr, b_ptr, part_ptr, y_ptr, old_ptr, adv_ptr, logp_ptr, loss_ptr, lse_ptr, a_ptr,
                        n_rows, num_splits, stride_x, inv_temp, cap, lo, hi, neg_dual, divisor, temperature,
                        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, HAS_DUAL: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per row ``r < n_rows`` of a chunk (all pointers but ``x``, ``b``, ``part`` at the chunk's first row):
    ``lse`` from the partials ``part [3, n_rows, num_splits]`` (:func:`merge_row_partials`),
    ``logp = z_y - lse`` with ``z`` as the statistics kernel loads it, then ``loss[r]`` and
    ``a[r] = (dloss/dlogp / divisor) / temperature`` (:func:`ppo_dual_clip_terms`); writes ``logp``,
    ``loss``, ``lse`` and ``a`` (float32)."""
    r, ok, _, _, _, lse, lp = sampled_logprobs(x_ptr, b_ptr, part_ptr, y_ptr, n_rows, num_splits, stride_x,
                                               inv_temp, cap, HAS_BIAS, HAS_CAP, False, BLOCK_R, BLOCK_S)
    old = tl.load(old_ptr + r, mask=ok, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + r, mask=ok, other=0.0).to(tl.float32)
    loss, dlogp = ppo_dual_clip_terms(lp, old, adv, lo, hi, neg_dual, HAS_DUAL)
    tl.store(logp_ptr + r, lp, mask=ok)
    tl.store(loss_ptr + r, loss, mask=ok)
    tl.store(lse_ptr + r, lse, mask=ok)
    tl.store(a_ptr + r, (dlogp / divisor) / temperature, mask=ok)


def policy_token_terms(x: torch.Tensor, bias: torch.Tensor | None, part: torch.Tensor, targets: torch.Tensor,
                       old: torch.Tensor, adv: torch.Tensor, clip, divisor: float, out: tuple[torch.Tensor, ...], *,
                       temperature: float, softcap: float | None) -> None:
    """One launch of ``policy_token_kernel`` for a chunk of ``C`` rows.

    ``x [C, V]`` float32 logit block, ``bias [V]`` or None, ``part [3, C, splits]`` float32 from
    :func:`~sod_kernels.core.kernels.logprob_partials`, ``targets [C]`` int64, ``old``, ``adv [C]`` float32
    (contiguous views),
    ``clip = (clip_low, clip_high, dual_clip or None)``; ``out = (logp, loss, lse, a)`` ``[C]`` float32,
    written in place (views of the pass's buffers).
    """
    logp, loss, lse, a = out
    n_rows, splits = part.shape[1], part.shape[2]
    clip_low, clip_high, dual = clip
    block_r = 16 if interpreting() else POLICY_BLOCK_R
    policy_token_kernel[(triton.cdiv(n_rows, block_r),)](
        x, x if bias is None else bias, part, targets, old, adv, logp, loss, lse, a, n_rows, splits,
        x.stride(0), 1.0 / temperature, cap_arg(softcap), 1.0 - clip_low, 1.0 + clip_high,
        -1.0 if dual is None else -float(dual), float(divisor), float(temperature), HAS_BIAS=bias is not None,
        HAS_CAP=softcap is not None, HAS_DUAL=dual is not None, BLOCK_R=block_r,
        BLOCK_S=max(triton.next_power_of_2(splits), 2), num_warps=4)


def codegen_specs() -> list[dict]:
    """The kernels at the headline launch (bf16 gradient blocks, with bias and entropy; the per-row token
    kernels of the log-probs and of the one-pass policy loss at 512-row chunks, two vocabulary splits; the
    d(bias) column sum), and again with the soft-cap on, for ``benchmarks.codegen`` (sm_90 compile check)."""
    rows = {"x_ptr": "*fp32", "b_ptr": "*bf16", "part_ptr": "*fp32", "y_ptr": "*i64"}   # token kernels' inputs
    token = {"BLOCK_R": POLICY_BLOCK_R, "BLOCK_S": 2}
    specs = []
    for capped in (False, True):
        tag = "softcap " if capped else ""
        specs.append(codegen_spec(
            f"policy_token_kernel[{tag}br{POLICY_BLOCK_R}]", policy_token_kernel,
            {**rows, "old_ptr": "*fp32", "adv_ptr": "*fp32", "logp_ptr": "*fp32", "loss_ptr": "*fp32",
             "lse_ptr": "*fp32", "a_ptr": "*fp32", "n_rows": "i32", "num_splits": "i32", "stride_x": "i32",
             "inv_temp": "fp32", "cap": "fp32", "lo": "fp32", "hi": "fp32", "neg_dual": "fp32", "divisor": "fp32",
             "temperature": "fp32"},
            {"HAS_BIAS": True, "HAS_CAP": capped, "HAS_DUAL": True, **token}, ["n_rows", "stride_x"]))
        specs.append(codegen_spec(
            f"logprob_token_kernel[{tag}entropy br{POLICY_BLOCK_R}]", logprob_token_kernel,
            {**rows, "logp_ptr": "*fp32", "lse_ptr": "*fp32", "max_ptr": "*fp32", "mean_ptr": "*fp32",
             "ent_ptr": "*fp32", "n_rows": "i32", "num_splits": "i32", "stride_x": "i32", "inv_temp": "fp32",
             "cap": "fp32"},
            {"HAS_BIAS": True, "HAS_CAP": capped, "WITH_ENTROPY": True, **token}, ["n_rows", "stride_x"]))
    specs.append(codegen_spec(
        f"column_sum_add_kernel[br{COLSUM_BLOCK_R} bv{COLSUM_BLOCK_V}]", column_sum_add_kernel,
        {"g_ptr": "*bf16", "out_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_g": "i32"},
        {"BLOCK_R": COLSUM_BLOCK_R, "BLOCK_V": COLSUM_BLOCK_V}, ["n_rows", "vocab", "stride_g"]))
    for capped in (False, True):
        tag = "softcap " if capped else ""
        specs.append(codegen_spec(
            f"logprob_partial_stats_kernel[{tag}bv{STATS_BLOCK_V}]", logprob_partial_stats_kernel,
            {"x_ptr": "*fp32", "b_ptr": "*bf16", "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32",
             "stride_x": "i32", "cols_per_split": "i32", "num_splits": "i32", "inv_temp": "fp32", "cap": "fp32"},
            {"HAS_BIAS": True, "WITH_ENTROPY": True, "BLOCK_V": STATS_BLOCK_V, "HAS_CAP": capped},
            ["vocab", "stride_x", "cols_per_split"], num_warps=NUM_WARPS))
        specs.append(codegen_spec(
            f"logprob_logit_grad_kernel[{tag}bv{GRAD_BLOCK_V}]", logprob_logit_grad_kernel,
            {"x_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*i64", "grad_ptr": "*bf16", "max_ptr": "*fp32",
             "lse_ptr": "*fp32", "mean_ptr": "*fp32", "a_ptr": "*fp32", "e_ptr": "*fp32", "vocab": "i32",
             "stride_x": "i32", "stride_g": "i32", "inv_temp": "fp32", "cap": "fp32"},
            {"HAS_BIAS": True, "WITH_ENTROPY": True, "BLOCK_V": GRAD_BLOCK_V, "HAS_CAP": capped},
            ["vocab", "stride_x", "stride_g"], num_warps=NUM_WARPS))
    return specs
