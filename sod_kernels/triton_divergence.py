"""Triton backend of the per-token divergence (SPEC section 3) and its student gradient.

Same contract as :mod:`sod_kernels.chunked_torch` (see :mod:`sod_kernels.token_divergence`):
``divergence_forward(...) -> (D, lse_s, lse_t, logp_s_y, logp_t_y)`` and
``divergence_backward(...) -> (d_hidden, d_weight, d_bias)``.  The kernels:

- :mod:`sod_kernels.kl_forward`: ``kl_forward_kernel`` (row block x vocabulary split, online log-sum-exp
  and KL accumulator over ``tl.dot`` logit tiles) and ``kl_merge_kernel`` (log-sum-exp merge of the
  splits);
- :mod:`sod_kernels.kl_backward`: ``kl_backward_kernel`` (row block x vocabulary tile, recomputed logits,
  d(logits) in registers, atomic fp32 accumulation of d(hidden), d(weight), d(bias); reverse-KL gradient
  filtering of negligible tiles for 16-bit inputs).

Their design and FLOP/byte arguments are in those modules' docstrings; launch configs come from
:mod:`sod_kernels.triton_configs`.

Memory beyond inputs and outputs: the forward's partials ``7 x splits x Na`` float32; the backward's
float32 gradient buffers ``[N, Hs]``, ``[Vs, Hs]``, ``[Vs]`` (cast to the input dtype at the end; for
float32 inputs they are the outputs).  Nothing of size tokens x vocabulary is ever allocated.

Dtypes: float32, bfloat16, float16.  float64 raises TypeError (use ``backend="torch"``).  Under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) 16-bit tiles are cast to float32 inside the
kernels (``CAST_FP32``) because the interpreter cannot multiply bf16 tiles; on a GPU the 16-bit tensor
core path is used.
"""

from __future__ import annotations

import contextlib

import torch

from .kl_backward import kl_backward_kernel
from .kl_forward import (MERGE_BLOCK_K, MERGE_BLOCK_ROWS, MERGE_NUM_WARPS, NUM_PARTIALS, kl_forward_kernel,
                         kl_merge_kernel)
from .token_divergence import triton_interpreter_enabled
from .triton_configs import GRADIENT_FILTER_16BIT, KernelConfig, forward_splits, kernel_config

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIVERGENCE_NAMES = ("reverse_kl", "forward_kl")


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature):
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype == torch.float64:
            raise TypeError(f"the Triton backend does not support float64 ({name} is float64); "
                            "use backend='torch' for float64 inputs")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton backend supports float32, bfloat16 and float16")
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise TypeError("student_hidden/student_weight and teacher_hidden/teacher_weight must share a dtype per "
                        f"model; got {student_hidden.dtype}/{student_weight.dtype} and "
                        f"{teacher_hidden.dtype}/{teacher_weight.dtype}")
    if divergence not in DIVERGENCE_NAMES:
        raise ValueError(f"divergence must be one of {DIVERGENCE_NAMES}, got {divergence!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(f"teacher_weight has a smaller vocabulary ({teacher_weight.shape[0]}) than student_weight "
                         f"({student_weight.shape[0]})")


def _row_major(t: torch.Tensor | None) -> torch.Tensor | None:
    """The tensor itself when its last dimension is contiguous (kernels take a row stride), else a copy."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_options(n_rows: int, dtype: torch.dtype, device: torch.device, config: KernelConfig | None):
    interpret = triton_interpreter_enabled()
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    cfg = config or kernel_config(n_rows, dtype, interpret=interpret, capability=capability)
    cast_fp32 = interpret and dtype != torch.float32
    precision = "ieee" if (dtype == torch.float32 or cast_fp32) else "tf32"
    return cfg, interpret, cast_fp32, precision


def _filter_threshold(gradient_filter: float | None, divergence: str, dtype: torch.dtype) -> float:
    """The backward's tile-skipping threshold on the student probabilities (0: no filtering)."""
    if gradient_filter is None:
        return GRADIENT_FILTER_16BIT if (divergence == "reverse_kl" and dtype != torch.float32) else 0.0
    if not (0.0 <= gradient_filter < 1.0):
        raise ValueError(f"gradient_filter must be None or in [0, 1), got {gradient_filter}")
    if gradient_filter > 0 and divergence != "reverse_kl":
        raise ValueError("gradient_filter applies to divergence='reverse_kl' only (forward KL needs the teacher's "
                         "probabilities of every tile)")
    return float(gradient_filter)


def divergence_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       row_index, target_ids, *, divergence: str, temperature: float,
                       config: KernelConfig | None = None, num_splits: int | None = None):
    """Per-token divergence and softmax statistics for the rows ``row_index`` (Triton kernels).

    Args:
        student_hidden: ``[N, Hs]``; student_weight ``[Vs, Hs]``; student_bias ``[Vs]`` or None.
        teacher_hidden: ``[N, Ht]``; teacher_weight ``[Vt, Ht]`` (``Vt >= Vs``, only the first ``Vs`` rows
            are read); teacher_bias ``[Vt]`` or None.  float32, bfloat16 or float16.
        row_index: ``[Na]`` int64 rows to compute.
        target_ids: ``[N]`` int64 sampled tokens in ``[0, Vs)``, or None.
        divergence: ``"reverse_kl"`` or ``"forward_kl"``; temperature: ``> 0``.
        config: override of the launch config (tests); num_splits: override of the vocabulary split count
            (rounded so that every split is non-empty).
    Returns:
        ``(D, lse_student, lse_teacher, student_target_logprob, teacher_target_logprob)``, each ``[Na]``
        float32; the last two are None without ``target_ids``.
    """
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature)
    device = student_hidden.device
    n_rows = row_index.numel()
    vocab, hs = student_weight.shape
    ht = teacher_hidden.shape[1]
    empty = lambda: torch.empty(n_rows, dtype=torch.float32, device=device)  # noqa: E731
    D, lse_s, lse_t = empty(), empty(), empty()
    lp_s = empty() if target_ids is not None else None
    lp_t = empty() if target_ids is not None else None
    if n_rows == 0:
        return D, lse_s, lse_t, lp_s, lp_t
    cfg, interpret, cast_fp32, precision = _launch_options(n_rows, student_hidden.dtype, device, config)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    if num_splits is None:
        splits, tiles_per_split = forward_splits(n_rows, vocab, cfg, interpret=interpret, sm_count=sm_count)
    else:
        num_tiles = -(-vocab // cfg.block_v)
        tiles_per_split = -(-num_tiles // max(min(int(num_splits), num_tiles), 1))
        splits = -(-num_tiles // tiles_per_split)
    sh, sw, th, tw = (_row_major(t) for t in (student_hidden, student_weight, teacher_hidden, teacher_weight))
    sb = None if student_bias is None else student_bias.contiguous()
    tb = None if teacher_bias is None else teacher_bias.contiguous()
    rows = row_index.to(torch.int64).contiguous()
    y = None if target_ids is None else target_ids.to(torch.int64).contiguous()
    partial = torch.empty((NUM_PARTIALS, splits, n_rows), dtype=torch.float32, device=device)
    row_blocks = -(-n_rows // cfg.block_m)
    forward_kl = divergence == "forward_kl"
    inv_temp = 1.0 / temperature
    with _device_guard(student_hidden):
        kl_forward_kernel[(row_blocks * splits,)](
            sh, sw, sw if sb is None else sb, th, tw, tw if tb is None else tb, rows, partial, n_rows, vocab, hs,
            ht, sh.stride(0), sw.stride(0), th.stride(0), tw.stride(0), tiles_per_split, splits, inv_temp,
            HAS_SBIAS=sb is not None, HAS_TBIAS=tb is not None, FORWARD_KL=forward_kl,
            EVEN_HS=hs % cfg.block_k == 0, EVEN_HT=ht % cfg.block_k == 0, CAST_FP32=cast_fp32,
            DOT_PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kl_merge_kernel[(-(-n_rows // MERGE_BLOCK_ROWS),)](
            partial, sh, sw, sw if sb is None else sb, th, tw, tw if tb is None else tb, rows,
            rows if y is None else y, D, lse_s, lse_t, D if lp_s is None else lp_s, D if lp_t is None else lp_t,
            n_rows, splits, hs, ht, sh.stride(0), sw.stride(0), th.stride(0), tw.stride(0), inv_temp,
            HAS_SBIAS=sb is not None, HAS_TBIAS=tb is not None, HAS_TARGET=y is not None, FORWARD_KL=forward_kl,
            BLOCK_R=MERGE_BLOCK_ROWS, BLOCK_K=MERGE_BLOCK_K, num_warps=MERGE_NUM_WARPS)
    return D, lse_s, lse_t, lp_s, lp_t


def divergence_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, lse_student, lse_teacher, token_divergence, grad_divergence, *, divergence: str,
                        temperature: float, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True, config: KernelConfig | None = None,
                        gradient_filter: float | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i]`` w.r.t. the student's hidden, weight and bias.

    Args:
        student_hidden ... teacher_bias, row_index: as in :func:`divergence_forward`.
        lse_student, lse_teacher, token_divergence: ``[Na]`` float32 from :func:`divergence_forward`.
        grad_divergence: ``[Na]`` upstream gradient of each row's D.
        need_hidden, need_weight, need_bias: which gradients to compute.
        config: override of the launch config (tests).
        gradient_filter: reverse KL only: skip a (row block, vocabulary tile) whose student probabilities
            are all below this value (after the student recompute: no teacher recompute, no gradient
            products).  None: :data:`triton_configs.GRADIENT_FILTER_16BIT` for bfloat16/float16 inputs, off
            for float32; 0: off.
    Returns:
        ``(d_hidden [N, Hs], d_weight [Vs, Hs], d_bias [Vs])`` in the inputs' dtypes (None where not
        needed or, for the bias, where ``student_bias`` is None); rows outside ``row_index`` get zero.
    """
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature)
    threshold = _filter_threshold(gradient_filter, divergence, student_hidden.dtype)
    device = student_hidden.device
    need_bias = need_bias and student_bias is not None
    vocab, hs = student_weight.shape
    ht = teacher_hidden.shape[1]
    f32 = torch.float32
    d_hidden = torch.zeros(student_hidden.shape, dtype=f32, device=device) if need_hidden else None
    d_weight = torch.zeros((vocab, hs), dtype=f32, device=device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=f32, device=device) if need_bias else None
    n_rows = row_index.numel()
    if n_rows and (need_hidden or need_weight or need_bias):
        cfg, _, cast_fp32, precision = _launch_options(n_rows, student_hidden.dtype, device, config)
        sh, sw, th, tw = (_row_major(t) for t in (student_hidden, student_weight, teacher_hidden, teacher_weight))
        sb = None if student_bias is None else student_bias.contiguous()
        tb = None if teacher_bias is None else teacher_bias.contiguous()
        rows = row_index.to(torch.int64).contiguous()
        vec = lambda t: t.to(f32).contiguous()  # noqa: E731  ([Na] vectors)
        grid = (-(-n_rows // cfg.block_m) * -(-vocab // cfg.block_v),)
        with _device_guard(student_hidden):
            kl_backward_kernel[grid](
                sh, sw, sw if sb is None else sb, th, tw, tw if tb is None else tb, rows, vec(lse_student),
                vec(lse_teacher), vec(token_divergence), vec(grad_divergence),
                d_hidden if need_hidden else lse_student, d_weight if need_weight else lse_student,
                d_bias if need_bias else lse_student, n_rows, vocab, hs, ht, sh.stride(0), sw.stride(0),
                th.stride(0), tw.stride(0), 1.0 / temperature, threshold,
                HAS_SBIAS=sb is not None, HAS_TBIAS=tb is not None, FORWARD_KL=divergence == "forward_kl",
                NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias, FILTER=threshold > 0,
                EVEN_HS=hs % cfg.block_k == 0,
                EVEN_HT=ht % cfg.block_k == 0, CAST_FP32=cast_fp32, DOT_PRECISION=precision,
                BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return cast(d_hidden, student_hidden), cast(d_weight, student_weight), cast(d_bias, student_bias)
