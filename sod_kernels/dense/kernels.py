"""The KL loss's epilogue on the chunked core: per-row statistics and ``d(logits)`` of a logit block.

Input: the raw float32 logit blocks ``xs [C, V]`` (student) and ``xt [C, V]`` (teacher, first ``V`` columns)
of one row chunk, as :func:`sod_kernels.core.chunks.logits_into` writes them.  Biases, the optional
soft-cap of each model and ``1/tau`` are applied on load: ``z = (x + b) / tau``, or with a cap ``c``
``z = c tanh((x + b) / c) / tau`` (tanh from one exponential, ``e = exp(-2|u|)``, and the student's
``d(logits)`` times the slope ``1 - tanh^2 = 4 e / (1 + e)^2``).  W is the model whose probabilities weight
the KL sum (the student for reverse KL, the teacher for forward KL), O the other.

- ``kl_partial_stats_kernel`` (grid: rows x vocabulary splits) sweeps its columns in ``BLOCK_V`` blocks with
  an online log-sum-exp for both models and the KL accumulator in the max-shifted frame
  ``A' = sum exp(z_w - m_w) ((z_w - m_w) - (z_o - m_o))`` (rescaled and re-framed when a max moves), and
  writes 5 floats per (row, split).  :func:`kl_row_stats` merges the splits with the same algebra in a few
  O(C x splits) tensor ops.  Then ``D = A'/L_w - log L_w + log L_o`` (docs/math.md, with nothing of size
  O(log V) subtracted from anything large) and, for the gradient, ``c' = A'/L_w``.
- ``kl_logit_grad_kernel`` (grid: rows x column blocks) writes ``d(logits) = scale_row * g`` in the gradient
  dtype, with ``g = p_s ((z_s - M_s) - (z_t - M_t) - c')`` for reverse KL (the shifted form of
  ``p_s (log p_s - log p_t - D)``: no O(log V) quantity is subtracted; each term still carries the float32
  rounding of the logits, about one ulp of the largest logit per token: docs/math.md) and ``g = p_s - p_t`` for
  forward KL.  ``scale_row`` already holds ``dL/dD / tau``.  With ``HAS_HARD`` it adds the hard-label term
  ``hard_row (p_s - onehot(y_row))`` (:func:`add_hard_label`: the onehot is a comparison of the block's column
  indices with the row's target, no scatter, no atomics; ``hard_row`` is ``lambda / (normalizer tau)`` in the
  single pass or ``-dL/dlogp_s(y) / tau`` in the two-pass backward), before the cap's slope.

The generalized JSD's kernels (same loaders, same hard-label term) are in :mod:`sod_kernels.dense.jsd_kernels`.

Both kernels are bandwidth bound: the statistics read ``8 C V`` bytes, the gradient reads ``8 C V`` and
writes ``2 C V`` (16-bit gradient) bytes; about ``5 C V`` exponentials in all.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..core.kernels import (GRAD_BLOCK_V, INTERPRETER_BLOCK_V, MIN_LOGIT, NUM_WARPS, STATS_BLOCK_V, bias_arg, cap_arg,
                            interpreting, load_capped_logits, load_capped_logits_slope, load_logits, vocab_splits)

NUM_PARTIALS = 5


@triton.jit
def kl_partial_stats_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, part_ptr, n_rows, vocab, stride_xs, stride_xt,
                            cols_per_split, num_splits, inv_temp, scap, tcap, HAS_SBIAS: tl.constexpr,
                            HAS_TBIAS: tl.constexpr, FORWARD_KL: tl.constexpr, BLOCK_V: tl.constexpr,
                            HAS_SCAP: tl.constexpr, HAS_TCAP: tl.constexpr):
    """``part [5, n_rows, num_splits]`` float32 <- (m_w, l_w, m_o, l_o, A') of one (row, split)."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    xt_row = xt_ptr + row.to(tl.int64) * stride_xt
    v_begin = split * cols_per_split
    offs = tl.arange(0, BLOCK_V)
    m_w = -1e30
    m_o = -1e30
    l_w = 0.0
    l_o = 0.0
    acc = 0.0
    for start in range(0, cols_per_split, BLOCK_V):
        cols = v_begin + start + offs
        ok = cols < vocab
        zs = tl.where(ok, load_capped_logits(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS, HAS_SCAP),
                      MIN_LOGIT)
        zt = tl.where(ok, load_capped_logits(xt_row, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS, HAS_TCAP),
                      MIN_LOGIT)
        if FORWARD_KL:
            z_w = zt
            z_o = zs
        else:
            z_w = zs
            z_o = zt
        new_w = tl.maximum(m_w, tl.max(z_w, axis=0))
        new_o = tl.maximum(m_o, tl.max(z_o, axis=0))
        alpha_w = tl.exp(m_w - new_w)
        # Re-frame A' to the new maxima, then add this block's terms.
        acc = alpha_w * (acc + l_w * ((m_w - new_w) - (m_o - new_o)))
        l_w = l_w * alpha_w
        l_o = l_o * tl.exp(m_o - new_o)
        e_w = tl.exp(z_w - new_w)
        l_w += tl.sum(e_w, axis=0)
        l_o += tl.sum(tl.exp(z_o - new_o), axis=0)
        acc += tl.sum(e_w * ((z_w - new_w) - (z_o - new_o)), axis=0)
        m_w = new_w
        m_o = new_o
    out = part_ptr + row * num_splits + split
    plane = n_rows * num_splits
    tl.store(out, m_w)
    tl.store(out + plane, l_w)
    tl.store(out + 2 * plane, m_o)
    tl.store(out + 3 * plane, l_o)
    tl.store(out + 4 * plane, acc)


@triton.jit
def add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr):
    """``g + hard[row] (p_s - onehot(target[row]))`` over the block's columns ``cols``: the gradient of
    ``-hard[row] * logp_s(target)`` w.r.t. the (temperature-scaled) student logits; ``target [rows]`` int32
    is relative to the block's first column (a target outside the block matches no column)."""
    y = tl.load(target_ptr + row)
    return g + tl.load(hard_ptr + row) * (p_s - tl.where(cols == y, 1.0, 0.0))


@triton.jit
def kl_logit_grad_kernel(xs_ptr, xt_ptr, sb_ptr, tb_ptr, grad_ptr, max_s_ptr, lse_s_ptr, max_t_ptr, lse_t_ptr,
                         centre_ptr, scale_ptr, target_ptr, hard_ptr, vocab, stride_xs, stride_xt, stride_g,
                         inv_temp, scap, tcap, HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr,
                         FORWARD_KL: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SCAP: tl.constexpr,
                         HAS_TCAP: tl.constexpr, HAS_HARD: tl.constexpr):
    """``grad[row, cols] = scale[row] * g`` (see the module docstring; plus the hard-label term with
    ``HAS_HARD``), in ``grad``'s dtype; with a student soft-cap the sum is multiplied by the cap's slope
    ``dz/dx``."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = cols < vocab
    xs_row = xs_ptr + row.to(tl.int64) * stride_xs
    if HAS_SCAP:
        zs, slope = load_capped_logits_slope(xs_row, sb_ptr, cols, ok, inv_temp, scap, HAS_SBIAS)
    else:
        zs = load_logits(xs_row, sb_ptr, cols, ok, inv_temp, HAS_SBIAS)
    zt = load_capped_logits(xt_ptr + row.to(tl.int64) * stride_xt, tb_ptr, cols, ok, inv_temp, tcap, HAS_TBIAS,
                             HAS_TCAP)
    scale = tl.load(scale_ptr + row)
    p_s = tl.exp(zs - tl.load(lse_s_ptr + row))
    if FORWARD_KL:
        g = p_s - tl.exp(zt - tl.load(lse_t_ptr + row))
    else:
        centred = (zs - tl.load(max_s_ptr + row)) - (zt - tl.load(max_t_ptr + row)) - tl.load(centre_ptr + row)
        g = p_s * centred
    g = g * scale
    if HAS_HARD:
        g = add_hard_label(g, p_s, cols, row, target_ptr, hard_ptr)
    if HAS_SCAP:
        g = g * slope
    g = tl.where(ok, g, 0.0)
    tl.store(grad_ptr + row.to(tl.int64) * stride_g + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


class KLRowStats(NamedTuple):
    """Per-row statistics of one chunk (each ``[C]`` float32).

    D: the divergence (unclamped); lse_s, lse_t: log-sum-exp of the temperature-scaled logits; max_s, max_t:
    their maxima (the frame of ``centre``); centre: ``c' = E_W[(z_w - M_w) - (z_o - M_o)]`` (for the
    generalized JSD, :mod:`sod_kernels.dense.jsd_kernels`: ``D`` is the JSD and ``centre = c = KL(p_s || M)``).
    """

    D: torch.Tensor
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    max_s: torch.Tensor
    max_t: torch.Tensor
    centre: torch.Tensor


def kl_partials(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                teacher_bias: torch.Tensor | None, *, forward_kl: bool, temperature: float,
                student_softcap: float | None = None, teacher_softcap: float | None = None) -> torch.Tensor:
    """Partial statistics ``[5, C, splits]`` float32 of the logit blocks ``xs``, ``xt`` (``[C, V]`` float32,
    unit column stride); biases ``[V]`` or None; soft-caps (``cap tanh((x + b) / cap)`` before ``1/tau``)
    or None.  Merge with :func:`merge_kl_partials` (partials of several column slices of the same rows may
    be concatenated along the last dimension first)."""
    n_rows, vocab = xs.shape
    block, cols_per_split, splits = vocab_splits(n_rows, vocab)
    part = torch.empty((NUM_PARTIALS, n_rows, splits), dtype=torch.float32, device=xs.device)
    if n_rows:
        kl_partial_stats_kernel[(n_rows, splits)](
            xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), part, n_rows, vocab, xs.stride(0),
            xt.stride(0), cols_per_split, splits, 1.0 / temperature, cap_arg(student_softcap),
            cap_arg(teacher_softcap), HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None,
            FORWARD_KL=forward_kl, BLOCK_V=block, HAS_SCAP=student_softcap is not None,
            HAS_TCAP=teacher_softcap is not None, num_warps=NUM_WARPS)
    return part


def merge_kl_partials(part: torch.Tensor, *, forward_kl: bool) -> KLRowStats:
    """Merge ``[5, C, S]`` partials (m_w, l_w, m_o, l_o, A') into per-row :class:`KLRowStats`."""
    m_w, l_w, m_o, l_o, a = part.unbind(0)
    big_w, big_o = m_w.amax(1), m_o.amax(1)
    shift_w, shift_o = m_w - big_w[:, None], m_o - big_o[:, None]
    scale_w = shift_w.exp()
    sum_w = (l_w * scale_w).sum(1)
    sum_o = (l_o * shift_o.exp()).sum(1)
    centre = (scale_w * (a + l_w * (shift_w - shift_o))).sum(1) / sum_w
    log_w, log_o = sum_w.log(), sum_o.log()
    D = centre - log_w + log_o
    lse_w, lse_o = big_w + log_w, big_o + log_o
    if forward_kl:
        return KLRowStats(D, lse_o, lse_w, big_o, big_w, centre)
    return KLRowStats(D, lse_w, lse_o, big_w, big_o, centre)


def kl_row_stats(xs, xt, student_bias, teacher_bias, *, forward_kl: bool, temperature: float,
                 student_softcap: float | None = None, teacher_softcap: float | None = None) -> KLRowStats:
    """:func:`kl_partials` merged: the statistics of whole-vocabulary blocks."""
    part = kl_partials(xs, xt, student_bias, teacher_bias, forward_kl=forward_kl, temperature=temperature,
                       student_softcap=student_softcap, teacher_softcap=teacher_softcap)
    return merge_kl_partials(part, forward_kl=forward_kl)


def hard_args(hard: tuple | None, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(target_ptr, hard_ptr)`` arguments of a gradient kernel: ``hard = (target [C] int32 relative to the
    block's first column, hard_scale [C] float32)`` made contiguous, or ``fallback`` twice (never read)."""
    if hard is None:
        return fallback, fallback
    target, hard_scale = hard
    return target.to(torch.int32).contiguous(), hard_scale.to(torch.float32).contiguous()


def kl_logit_grad(xs: torch.Tensor, xt: torch.Tensor, student_bias: torch.Tensor | None,
                  teacher_bias: torch.Tensor | None, stats: KLRowStats, scale: torch.Tensor, out: torch.Tensor, *,
                  forward_kl: bool, temperature: float, student_softcap: float | None = None,
                  teacher_softcap: float | None = None, hard: tuple | None = None) -> torch.Tensor:
    """``out [C, V]`` (gradient dtype) <- ``scale[:, None] * dD/dz`` of each row, plus with
    ``hard = (target [C] int32, hard_scale [C] float32)`` the hard-label term ``hard_scale (p_s - onehot(target))``
    (``target`` relative to the block's first column), all times the student cap's slope ``dz/dx`` with
    ``student_softcap``; ``scale [C]`` float32."""
    n_rows, vocab = xs.shape
    block = INTERPRETER_BLOCK_V if interpreting() else GRAD_BLOCK_V
    scale = scale.to(torch.float32).contiguous()
    target, hard_scale = hard_args(hard, scale)
    kl_logit_grad_kernel[(n_rows, triton.cdiv(vocab, block))](
        xs, xt, bias_arg(student_bias, xs), bias_arg(teacher_bias, xt), out, stats.max_s, stats.lse_s,
        stats.max_t, stats.lse_t, stats.centre, scale, target, hard_scale, vocab, xs.stride(0),
        xt.stride(0), out.stride(0), 1.0 / temperature, cap_arg(student_softcap), cap_arg(teacher_softcap),
        HAS_SBIAS=student_bias is not None, HAS_TBIAS=teacher_bias is not None, FORWARD_KL=forward_kl,
        BLOCK_V=block, HAS_SCAP=student_softcap is not None, HAS_TCAP=teacher_softcap is not None,
        HAS_HARD=hard is not None, num_warps=NUM_WARPS)
    return out


def codegen_specs() -> list[dict]:
    """The two kernels at the headline launch (bf16 gradient blocks, with biases), plus the reverse-KL pair
    with both soft-caps and the hard-label term on, for ``benchmarks.codegen`` (sm_90 compile check:
    registers, no spills).  The JSD kernels list theirs in :func:`sod_kernels.dense.jsd_kernels.codegen_specs`."""
    vec = {"max_s_ptr": "*fp32", "lse_s_ptr": "*fp32", "max_t_ptr": "*fp32", "lse_t_ptr": "*fp32",
           "centre_ptr": "*fp32", "scale_ptr": "*fp32", "target_ptr": "*i32", "hard_ptr": "*fp32"}
    caps = {"scap": "fp32", "tcap": "fp32"}
    specs = []
    for forward_kl, capped in ((False, False), (True, False), (False, True)):
        tag = ("forward" if forward_kl else "reverse") + (" softcap" if capped else "")
        switches = {"HAS_SBIAS": True, "HAS_TBIAS": True, "FORWARD_KL": forward_kl, "HAS_SCAP": capped,
                    "HAS_TCAP": capped}
        specs.append({
            "name": f"kl_partial_stats_kernel[{tag} bv{STATS_BLOCK_V}]", "fn": kl_partial_stats_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "part_ptr": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_xs": "i32",
                          "stride_xt": "i32", "cols_per_split": "i32", "num_splits": "i32", "inv_temp": "fp32",
                          **caps},
            "constexprs": {**switches, "BLOCK_V": STATS_BLOCK_V},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "cols_per_split"],
        })
        specs.append({
            "name": f"kl_logit_grad_kernel[{tag} bv{GRAD_BLOCK_V}]", "fn": kl_logit_grad_kernel,
            "signature": {"xs_ptr": "*fp32", "xt_ptr": "*fp32", "sb_ptr": "*bf16", "tb_ptr": "*bf16",
                          "grad_ptr": "*bf16", **vec, "vocab": "i32", "stride_xs": "i32", "stride_xt": "i32",
                          "stride_g": "i32", "inv_temp": "fp32", **caps},
            "constexprs": {**switches, "BLOCK_V": GRAD_BLOCK_V, "HAS_HARD": capped},
            "num_warps": NUM_WARPS, "num_stages": 1, "expect_hgmma": False,
            "divisible_by_16": ["vocab", "stride_xs", "stride_xt", "stride_g"],
        })
    return specs
