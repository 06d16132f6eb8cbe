"""The generalized Jensen-Shannon divergence's epilogue on the chunked core (SPEC section 14).

With ``z = (x + b) / tau`` (or the soft-capped ``cap tanh((x + b) / cap) / tau``) of each model's float32 logit
block, ``ls = z_s - lse_s`` and ``lt = z_t - lse_t`` the shifted log-probs, ``M = (1 - beta) p_s + beta p_t``:

``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M) = beta S_t + (1 - beta) c``, with
``S_t = sum p_t (lt - log M)`` and ``c = KL(p_s || M) = sum p_s (ls - log M)``.

``log M`` is never formed from probabilities (they underflow): per entry, with ``d = ls - lt``,
``log M - lt = logaddexp(d + log(1 - beta), log beta)`` (one exponential, one logarithm), evaluated so that the
gap of the dominant model (``ls - log M`` where ``p_s >> p_t``) is ``-log(1 - beta) - log1p(.)`` without the
rounding of a large ``d`` (:func:`mixture_log_gaps`): the JSD saturates where the two distributions barely
overlap and its gradient ``p_s (r - c)`` is then a small difference of nearly equal O(1) terms.

Unlike a KL, ``log M`` couples the two models' normalizers nonlinearly, so there is no online (rescalable)
accumulator: the statistics come first (``lse_s``, ``lse_t`` from :func:`sod_kernels.dense.kernels.kl_partials`
merged), then a second read of the same float32 blocks:

- ``jsd_partial_sums_kernel`` (grid: rows x vocabulary splits) writes ``(S_t, c)`` partial sums and the two
  masses ``sum p_t``, ``sum p_s`` per (row, split); :func:`jsd_row_stats` sums the splits in a fixed order
  (deterministic, no atomics), divides each sum by its mass (so the gradient's ``c`` is consistent with its
  ``p_s``) and returns the row statistics with ``D`` and ``centre = c``.  Extra cost over a KL's forward:
  ``8 C V`` bytes read (the two float32 blocks once more) and 4 transcendentals per entry (``p_s``, ``p_t``,
  the exponential and the logarithm of the ``logaddexp``) plus one division (the accurate ``log1p``).
- ``jsd_logit_grad_kernel`` (grid: rows x column blocks) writes ``d(logits) = scale_row (1 - beta) p_s (r - c)``
  with ``r = ls - log M`` (the softmax Jacobian applied to ``dD/dp_s = (1 - beta) r``), times the student
  cap's slope ``dz/dx`` with a cap, plus the optional hard-label term ``hard_row (p_s - onehot(y))`` (see
  :func:`sod_kernels.dense.kernels.add_hard_label`).  Cost as the KL gradient (``8 C V`` bytes read, ``2 C V``
  written for a 16-bit gradient) with 3 transcendentals per entry instead of 1-2.

``0 < beta < 1`` only (the loss maps the ends to the KLs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, NUM_WARPS, STATS_BLOCK_V, bias_arg, cap_arg,
                            interpreting, load_capped_logits, load_logits_and_slope)
from .kernels import KLRowStats, add_hard_label, balanced_splits, hard_args, merge_kl_splits

NUM_JSD_PARTIALS = 4
JSD_PROGRAMS_PER_SM = 3  # jsd_partial_sums_kernel: 75-80 registers x 256 threads (codegen): 3 resident per SM


@triton.jit
def log1p_small(e):
    """``log(1 + e)`` for ``0 <= e <= 1`` to float32 relative accuracy (Goldberg's correction: ``u = 1 + e``,
    ``log(u) * e / (u - 1)``; ``e`` itself where ``u`` rounds to 1)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, tl.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def mixture_log_gaps(ls, lt, log_beta, log_one_minus_beta):
    """``(r, q) = (ls - log M, lt - log M)`` per entry from the shifted log-probs ``ls``, ``lt`` (float32).

    With ``d = ls - lt``, ``a = d + log(1 - beta)`` and ``e = exp(-|a - log beta|)``:
    where the student's term dominates (``a >= log beta``) ``r = -log(1 - beta) - log1p(e)``, else
    ``q = -log beta - log1p(e)``; the other one is ``q = r - d`` / ``r = q + d``.  So the saturated gap (``r``
    where ``p_s >> p_t``, ``q`` where ``p_t >> p_s``) never carries the rounding of a large ``d``: the gradient
    ``p_s (r - c)`` stays accurate where the two distributions barely overlap.  One exp, one log per entry."""
    d = ls - lt
    a = d + log_one_minus_beta
    student_side = a >= log_beta
    soft = log1p_small(tl.exp(-tl.abs(a - log_beta)))
    r_sat = -log_one_minus_beta - soft
    q_sat = -log_beta - soft
    r = tl.where(student_side, r_sat, q_sat + d)
    q = tl.where(student_side, r_sat - d, q_sat)
    return r, q


@triton.jit
def jsd_partial_sums_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, lse_s_ptr, lse_t_ptr, part_ptr, stats_ptr, max_s_ptr,
                            max_t_ptr, n_rows, vocab, stride_xs, stride_xt, cols_per_split, num_splits, stats_splits,
                            inv_temp, scap, tcap, log_beta, log_one_minus_beta, HAS_SBIAS: tl.constexpr,
                            HAS_TBIAS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SCAP: tl.constexpr,
                            HAS_TCAP: tl.constexpr, MERGE_STATS: tl.constexpr):
    """``part [4, n_rows, num_splits]`` float32 <- ``(sum p_t (lt - log M), sum p_s (ls - log M), sum p_t,
    sum p_s)`` over the columns of one (row, split); ``lse_s``, ``lse_t`` ``[n_rows]`` float32 are the rows'
    log-sum-exps (the masses let the merge normalize by the probabilities as computed).  With ``MERGE_STATS``
    every program merges its row's reverse-KL statistics partials ``stats [5, n_rows, stats_splits]`` itself
    (:func:`sod_kernels.dense.kernels.merge_kl_splits`, ``O(num_splits)`` loads: no separate merge launch) and
    the split-0 program writes ``lse_s``, ``lse_t``, ``max_s``, ``max_t`` of the row (outputs then)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    xt_row = xt_ptr + row.to(tl.int64) * stride_xt
    if MERGE_STATS:
        big_s, sum_s, big_t, sum_t, _ = merge_kl_splits(stats_ptr, row, row < n_rows, n_rows, stats_splits)
        lse_s = big_s + tl.log(sum_s)
        lse_t = big_t + tl.log(sum_t)
        first = split == 0
        tl.store(lse_s_ptr + row, lse_s, mask=first)
        tl.store(lse_t_ptr + row, lse_t, mask=first)
        tl.store(max_s_ptr + row, big_s, mask=first)
        tl.store(max_t_ptr + row, big_t, mask=first)
    else:
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
    v_begin = split * cols_per_split
    offs = tl.arange(0, BLOCK_V)
    acc_t = tl.zeros([BLOCK_V], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_V], dtype=tl.float32)
    mass_t = tl.zeros([BLOCK_V], dtype=tl.float32)
    mass_s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, cols_per_split, BLOCK_V):
        cols = v_begin + start + offs
        ok = cols < vocab
        ls = load_capped_logits(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS, HAS_SCAP) - lse_s
        lt = load_capped_logits(xt_row, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS, HAS_TCAP) - lse_t
        r, q = mixture_log_gaps(ls, lt, log_beta, log_one_minus_beta)
        p_t = tl.where(ok, tl.exp(lt), 0.0)
        p_s = tl.where(ok, tl.exp(ls), 0.0)
        acc_t += p_t * q
        acc_s += p_s * r
        mass_t += p_t
        mass_s += p_s
    out = part_ptr + row * num_splits + split
    plane = n_rows * num_splits
    tl.store(out, tl.sum(acc_t, axis=0))
    tl.store(out + plane, tl.sum(acc_s, axis=0))
    tl.store(out + 2 * plane, tl.sum(mass_t, axis=0))
    tl.store(out + 3 * plane, tl.sum(mass_s, axis=0))


@triton.jit
def jsd_logit_grad_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, grad_ptr, lse_s_ptr, lse_t_ptr, centre_ptr, scale_ptr,
                          target_ptr, hard_ptr, vocab, stride_xs, stride_xt, stride_g, inv_temp, scap, tcap,
                          log_beta, log_one_minus_beta, one_minus_beta, HAS_SBIAS: tl.constexpr,
                          HAS_TBIAS: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SCAP: tl.constexpr,
                          HAS_TCAP: tl.constexpr, HAS_HARD: tl.constexpr):
    """``grad[row, cols] = scale[row] (1 - beta) p_s (r - c)`` (+ ``hard[row] (p_s - onehot(target[row]))``
    with ``HAS_HARD``), times the student cap's slope with ``HAS_SCAP``, in ``grad``'s dtype."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    zs, slope = load_logits_and_slope(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS, HAS_SCAP)
    zt = load_capped_logits(xt_ptr + row.to(tl.int64) * stride_xt, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS,
                            HAS_TCAP)
    ls = zs - tl.load(lse_s_ptr + row)
    lt = zt - tl.load(lse_t_ptr + row)
    r, _ = mixture_log_gaps(ls, lt, log_beta, log_one_minus_beta)
    p_s = tl.exp(ls)
    g = (tl.load(scale_ptr + row) * one_minus_beta) * (p_s * (r - tl.load(centre_ptr + row)))
    if HAS_HARD:
        g = add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr)
    if HAS_SCAP:
        g = g * slope
    g = tl.where(ok, g, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _beta_args(beta: float) -> tuple[float, float]:
    """``(log beta, log(1 - beta))`` for ``0 < beta < 1``."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the JSD kernels need 0 < beta < 1, got {beta}")
    return math.log(beta), math.log1p(-beta)


def jsd_partials(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                 teacher_bias: torch.Tensor | None, lse_s: torch.Tensor, lse_t: torch.Tensor, *, beta: float,
                 temperature: float, student_softcap: float | None = None,
                 teacher_softcap: float | None = None, merge_stats: tuple | None = None) -> torch.Tensor:
    """Partial sums ``[4, C, splits]`` float32 (``S_t``, ``c`` unnormalized, and the masses ``sum p_t``,
    ``sum p_s``; see the module docstring) of the logit blocks
    ``xs``, ``xt`` (``[C, V]`` float32, unit column stride) given the rows' ``lse_s``, ``lse_t`` (``[C]``
    float32, over the whole vocabulary); biases ``[V]`` or None.  Partials of several column slices of the same
    rows may be concatenated along the last dimension before :func:`jsd_row_stats`.

    ``merge_stats = (part [5, C, splits], max_s [C], max_t [C])``: the kernel merges the reverse-KL statistics
    partials of the same blocks (:func:`sod_kernels.dense.kernels.kl_partials`) itself and *writes* ``lse_s``,
    ``lse_t``, ``max_s``, ``max_t`` (float32 ``[C]`` views, unit stride) instead of reading the ``lse`` values: the
    single pass's JSD chunk then needs no merge launch between its statistics and this kernel."""
    n_rows, vocab = xs.shape
    log_beta, log_one_minus_beta = _beta_args(beta)
    block, cols_per_split, splits = balanced_splits(n_rows, vocab, xs.device, JSD_PROGRAMS_PER_SM)
    part = torch.empty((NUM_JSD_PARTIALS, n_rows, splits), dtype=torch.float32, device=xs.device)
    merge = merge_stats is not None
    if merge:
        stats_part, max_s, max_t = merge_stats
        if stats_part.dim() != 3 or stats_part.shape[:2] != (5, n_rows):
            raise ValueError(f"merge_stats: statistics partials of shape {tuple(stats_part.shape)}, expected "
                             f"(5, {n_rows}, splits)")
    else:
        lse_s, lse_t = lse_s.contiguous(), lse_t.contiguous()
        stats_part = max_s = max_t = part
    if n_rows:
        jsd_partial_sums_kernel[(n_rows, splits)](
            xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), lse_s, lse_t, part, stats_part, max_s,
            max_t, n_rows, vocab, xs.stride(0), xt.stride(0), cols_per_split, splits, stats_part.shape[2],
            1.0 / temperature,
            cap_arg(student_softcap), cap_arg(teacher_softcap), log_beta, log_one_minus_beta,
            HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None, BLOCK_V=block,
            HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None, MERGE_STATS=merge,
            num_warps=NUM_WARPS)
    return part


def jsd_row_stats(stats: KLRowStats, part: torch.Tensor, *, beta: float) -> KLRowStats:
    """The JSD's row statistics: ``stats`` (the merged softmax statistics of the same rows: ``lse``s and
    maxima; its ``D`` and ``centre`` are replaced) with ``D = beta S_t + (1 - beta) c`` and ``centre = c``
    from the ``[4, C, S]`` partials (summed over ``S`` in a fixed order).  Each sum is divided by its mass as
    computed (``sum p``, 1 up to about one ulp of the largest logit): then ``sum_j p_s(j) (r_j - c)`` is 0 for
    the gradient kernel's own ``p_s``, and a saturated row (``r`` nearly constant where ``p_s`` lives, true
    gradient ~0) gets a gradient ~0 instead of ``(mass - 1) log(1 / (1 - beta)) p_s``."""
    s_t, s_s, mass_t, mass_s = part.sum(2).unbind(0)
    c = s_s / mass_s
    return stats._replace(D=beta * (s_t / mass_t) + (1.0 - beta) * c, centre=c)


def jsd_logit_grad(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                   teacher_bias: torch.Tensor | None, stats: KLRowStats, scale: torch.Tensor, out: torch.Tensor, *,
                   beta: float, temperature: float, student_softcap: float | None = None,
                   teacher_softcap: float | None = None, hard: tuple | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``scale[:, None] * dD/dz`` of each row (``scale [C]`` float32, already
    holding ``dL/dD / tau``), plus with ``hard = (target [C] int32, hard_scale [C] float32)`` the term
    ``hard_scale (p_s - onehot(target))`` (``target`` relative to the block's first column; out of range: no
    onehot), all times the student cap's slope with ``student_softcap``.  ``stats``: lse_s, lse_t, centre = c."""
    n_rows, vocab = xs.shape
    log_beta, log_one_minus_beta = _beta_args(beta)
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    scale = scale.to(torch.float32).contiguous()
    target, hard_scale = hard_args(hard, scale)
    jsd_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), out, stats.lse_s, stats.lse_t, stats.centre,
        scale, target, hard_scale, vocab, xs.stride(0), xt.stride(0), out.stride(0), 1.0 / temperature,
        cap_arg(student_softcap), cap_arg(teacher_softcap), log_beta, log_one_minus_beta, 1.0 - beta,
        HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None, BLOCK_V=block,
        HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None, HAS_HARD=hard is not None,
        num_warps=NUM_WARPS)
    return out


def codegen_specs() -> list[dict]:
    """The two JSD kernels at the headline launch (bf16 gradient blocks, with biases), plain and with both
    soft-caps and the hard-label term on, for ``benchmarks.codegen`` (sm_90 compile check)."""
    scalars = {"inv_temp": "fp32", "scap": "fp32", "tcap": "fp32", "log_beta": "fp32", "log_one_minus_beta": "fp32"}
    specs = []
    for capped in (False, True):
        tag = "softcap hard" if capped else "plain"
        switches = {"HAS_SBIAS": True, "HAS_TBIAS": True, "HAS_SCAP": capped, "HAS_TCAP": capped}
        specs.append({
            "name": f"jsd_partial_sums_kernel[{tag} bv{STATS_BLOCK_V}]", "fn": jsd_partial_sums_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "part_ptr": "*fp32", "stats_ptr": "*fp32",
                          "max_s_ptr": "*fp32", "max_t_ptr": "*fp32", "n_rows": "i32",
                          "vocab": "i32", "stride_xs": "i32", "stride_xt": "i32", "cols_per_split": "i32",
                          "num_splits": "i32", "stats_splits": "i32", **scalars},
            "constexprs": {**switches, "BLOCK_V": STATS_BLOCK_V, "MERGE_STATS": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "cols_per_split"],
        })
        specs.append({
            "name": f"jsd_logit_grad_kernel[{tag} bv{GRAD_BLOCK_V}]", "fn": jsd_logit_grad_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "grad_ptr": "*bf16", "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32", "centre_ptr": "*fp32",
                          "scale_ptr": "*fp32", "target_ptr": "*i32", "hard_ptr": "*fp32", "vocab": "i32",
                          "stride_xs": "i32", "stride_xt": "i32", "stride_g": "i32", **scalars,
                          "one_minus_beta": "fp32"},
            "constexprs": {**switches, "BLOCK_V": GRAD_BLOCK_V, "HAS_HARD": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "stride_g"],
        })
    return specs
