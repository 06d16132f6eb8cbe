"""Triton backend of :func:`sod_kernels.fused_token_logprobs` (sampled-token log-probs from hidden states).

Forward (two kernels):
1. ``_logprob_partial_kernel``, grid ``(row blocks of BLOCK_M tokens) x (vocabulary splits)``: each program
   sweeps the ``BLOCK_V``-column tiles of its split, forms the logit tile with a K-loop of ``tl.dot`` over
   the hidden size (fp32 accumulation), and keeps the per-row running max and rescaled exp-sum (online
   log-sum-exp).  It writes 2 floats per (row, split); nothing of size rows x vocabulary.
2. ``_logprob_merge_kernel``, grid ``(row blocks)``: merges the splits with the log-sum-exp algebra
   (``lse = M + log sum_s l_s exp(m_s - M)``) and computes the target logit as one gathered dot product
   ``hidden[i] . weight[y_i] (+ bias[y_i])`` in fp32, so ``logp = z_y / tau - lse``.

Backward (one kernel, ``_logprob_backward_kernel``, grid ``(row blocks) x (vocabulary tiles)``): the
program recomputes its logit tile, forms ``d z = g / tau * (onehot(y) - exp(z / tau - lse))`` in fp32
registers, and contracts it with the weight tile (d hidden) and the hidden block (d weight), both with
``tl.dot`` and fp32 ``tl.atomic_add`` into fp32 gradient buffers; d bias is the column sum of ``d z``.
Layout choice: one program per (row block, vocabulary tile) with atomics (Cut Cross-Entropy's layout)
rather than two atomic-free kernels (one per row block for d hidden, one per vocabulary tile for
d weight): it recomputes each logit tile once instead of twice, which is the dominant cost, at the price
of atomic traffic of ``O(N H (V / BLOCK_V) + V H (N / BLOCK_M))`` fp32 adds that go to L2.

Precision: tiles are multiplied in the input dtype (bf16 / fp16 on tensor cores; fp32 exactly, with
``input_precision="ieee"``) with fp32 accumulation.  The constexpr ``UPCAST`` casts every tile to
fp32 before ``tl.dot``; it is switched on automatically under ``TRITON_INTERPRET=1`` for bf16 inputs,
whose ``tl.dot`` the interpreter computes wrongly (PERF.md).

Memory beyond the inputs: forward ``O(N * splits)`` floats; backward fp32 gradient buffers
``O(N H + V H + V)``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Block sizes for a GPU (Hopper: BLOCK_M >= 64 and num_warps a multiple of 4 give warpgroup MMA).  Chosen
# with benchmarks/codegen.py for sm_90 (bf16): BLOCK_K = 32 is the largest K step without register spills
# (BLOCK_K = 64 spills 65-160 LDL/STL in both kernels at 255 registers); the merge has no tl.dot.
GPU_FORWARD = dict(BLOCK_M=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)
GPU_MERGE = dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=1)
GPU_BACKWARD = dict(BLOCK_M=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)
# float32 inputs multiply exactly on CUDA cores (no HGMMA): smaller tiles, also spill-free on sm_90.
GPU_FORWARD_FP32 = dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=4, num_stages=3)
GPU_BACKWARD_FP32 = dict(BLOCK_M=64, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=3)
# Block sizes under the interpreter: the smallest tl.dot tiles, so that tiny test sizes span many tiles.
INTERPRETER_FORWARD = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)
INTERPRETER_MERGE = dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1)
INTERPRETER_BACKWARD = dict(BLOCK_M=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)
# Vocabulary splits: enough programs to fill the GPU (this many per SM) when there are few row blocks.
PROGRAMS_PER_SM = 2
INTERPRETER_SPLITS = 3  # exercises the split merge on tiny inputs
MAX_SPLITS = 64
HEADLINE_SM_COUNT = 132  # H100 SXM
INT32_LIMIT = 2 ** 31

FP32_DOT_PRECISION = "ieee"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_upcast(dtype: torch.dtype) -> bool:
    return interpreter_enabled() and dtype == torch.bfloat16


def _dot_precision() -> str:
    """fp32 tiles are multiplied exactly ("ieee"), as the divergence kernels do (SPEC section 9's 1e-5);
    16-bit tiles ignore this and use tensor cores."""
    return FP32_DOT_PRECISION


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, col_ok, H, stride_h, stride_w,
                inv_temp, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_M, BLOCK_V]`` fp32 tile of ``(hidden[rows] @ weight[offs_v].T + bias) / tau``."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(weight_ptr + offs_v[None, :] * stride_w + k[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def _logprob_partial_kernel(hidden_ptr, weight_ptr, bias_ptr, rows_ptr, part_max_ptr, part_sum_ptr,
                            Na, V, H, stride_h, stride_w, inv_temp, tiles_per_split, num_splits,
                            HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (row, split): running max and exp-sum of the scaled logits over the split's tiles."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Na
    rows = tl.load(rows_ptr + offs_m, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        offs_v = (pid_s * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, col_ok, H, stride_h, stride_w,
                        inv_temp, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # Every split's first tile holds a valid column, so new_max is finite from the first tile on.
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    out = offs_m * num_splits + pid_s
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)


@triton.jit
def _logprob_merge_kernel(hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, part_max_ptr, part_sum_ptr,
                          logp_ptr, lse_ptr, Na, H, stride_h, stride_w, inv_temp, num_splits,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """lse from the split partials, target logit from one gathered dot product, ``logp = z_y - lse``."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Na
    offs_s = tl.arange(0, BLOCK_S)
    part = offs_m[:, None] * num_splits + offs_s[None, :]
    part_ok = row_ok[:, None] & (offs_s[None, :] < num_splits)
    m_s = tl.load(part_max_ptr + part, mask=part_ok, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + part, mask=part_ok, other=0.0)
    big = tl.max(m_s, axis=1)
    big = tl.where(row_ok, big, 0.0)
    total = tl.sum(l_s * tl.exp(m_s - big[:, None]), axis=1)
    lse = big + tl.log(tl.where(row_ok, total, 1.0))
    rows = tl.load(rows_ptr + offs_m, mask=row_ok, other=0)
    y = tl.load(targets_ptr + rows, mask=row_ok, other=0)
    offs_k = tl.arange(0, BLOCK_K)
    z_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        ok = row_ok[:, None] & (k[None, :] < H)
        h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + y[:, None] * stride_w + k[None, :], mask=ok, other=0.0).to(tl.float32)
        z_y += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        z_y += tl.load(bias_ptr + y, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(lse_ptr + offs_m, lse, mask=row_ok)
    tl.store(logp_ptr + offs_m, z_y * inv_temp - lse, mask=row_ok)


@triton.jit
def _logprob_backward_kernel(hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, lse_ptr, grad_ptr,
                             d_hidden_ptr, d_weight_ptr, d_bias_ptr, Na, V, H, stride_h, stride_w, inv_temp,
                             HAS_BIAS: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
                             NEED_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (row block, vocabulary tile): recompute the tile, form d z, atomically add its contractions."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Na
    rows = tl.load(rows_ptr + offs_m, mask=row_ok, other=0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    z = _logit_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, col_ok, H, stride_h, stride_w,
                    inv_temp, HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    scale = tl.load(grad_ptr + offs_m, mask=row_ok, other=0.0).to(tl.float32) * inv_temp
    y = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
    dz = scale[:, None] * (onehot - p)
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if NEED_BIAS:
        tl.atomic_add(d_bias_ptr + offs_v, tl.sum(dz, axis=0), mask=col_ok)
    if UPCAST:
        dz_in = dz
    else:
        dz_in = dz.to(hidden_ptr.dtype.element_ty)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < H
        if NEED_HIDDEN:
            w = tl.load(weight_ptr + offs_v[:, None] * stride_w + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            d_h = tl.dot(dz_in, w, input_precision=DOT_PRECISION)
            tl.atomic_add(d_hidden_ptr + offs_m[:, None] * H + k[None, :], d_h,
                          mask=row_ok[:, None] & k_ok[None, :])
        if NEED_WEIGHT:
            h = tl.load(hidden_ptr + rows[:, None] * stride_h + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            d_w = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
            tl.atomic_add(d_weight_ptr + offs_v[:, None] * H + k[None, :], d_w,
                          mask=col_ok[:, None] & k_ok[None, :])


# ------------------------------------------------------------------------------------------------ wrappers
def _forward_configs(dtype: torch.dtype):
    if interpreter_enabled():
        return INTERPRETER_FORWARD, INTERPRETER_MERGE
    return (GPU_FORWARD_FP32 if dtype == torch.float32 else GPU_FORWARD), GPU_MERGE


def _backward_config(dtype: torch.dtype):
    if interpreter_enabled():
        return INTERPRETER_BACKWARD
    return GPU_BACKWARD_FP32 if dtype == torch.float32 else GPU_BACKWARD


def choose_splits_for(num_rows: int, vocab: int, block_m: int, block_v: int, sm_count: int) -> int:
    """Vocabulary splits so that (row blocks x splits) programs occupy every SM ``PROGRAMS_PER_SM`` times."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(triton.cdiv(num_rows, block_m), 1))
    return max(1, min(wanted, triton.cdiv(vocab, block_v), MAX_SPLITS))


def choose_splits(num_rows: int, vocab: int, block_m: int, block_v: int, device: torch.device) -> int:
    """:func:`choose_splits_for` on the device's SM count; ``INTERPRETER_SPLITS`` under the interpreter."""
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(INTERPRETER_SPLITS, triton.cdiv(vocab, block_v)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return choose_splits_for(num_rows, vocab, block_m, block_v, sms)


def check_int32_offsets(num_rows: int, vocab: int, hidden: int) -> None:
    """Tile offsets inside the kernels are 32-bit (fewer registers): ``V * H`` and ``Na * H`` must fit."""
    if vocab * hidden >= INT32_LIMIT or num_rows * hidden >= INT32_LIMIT:
        raise ValueError(f"backend='triton' needs weight.numel() ({vocab * hidden}) and the used rows x hidden size "
                         f"({num_rows * hidden}) below 2**31; use backend='torch' for larger problems")


def logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                    target_ids: torch.Tensor, *, temperature: float, num_splits: int | None = None):
    """Triton forward; same contract as :func:`sod_kernels.token_logprobs.logprob_forward`.

    hidden ``[N, H]`` and weight ``[V, H]`` (fp32 / bf16 / fp16, rows contiguous), bias ``[V]`` or None,
    row_index ``[Na]`` int64, target_ids ``[N]`` int64.  Returns ``(logp [Na], lse [Na])`` float32.
    ``num_splits`` overrides the vocabulary split count (tests).
    """
    Na = row_index.numel()
    V, H = weight.shape
    check_int32_offsets(Na, V, H)
    logp = torch.empty(Na, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    if Na == 0:
        return logp, lse
    fwd, merge = _forward_configs(hidden.dtype)
    splits = num_splits or choose_splits(Na, V, fwd["BLOCK_M"], fwd["BLOCK_V"], hidden.device)
    tiles = triton.cdiv(V, fwd["BLOCK_V"])
    tiles_per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    splits = triton.cdiv(tiles, tiles_per_split)  # every split starts on a valid column
    part_max = torch.empty(Na, splits, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    has_bias = bias is not None
    b = bias if has_bias else hidden  # any pointer; never read without HAS_BIAS
    inv_temp = 1.0 / temperature
    grid = (triton.cdiv(Na, fwd["BLOCK_M"]), splits)
    _logprob_partial_kernel[grid](hidden, weight, b, row_index, part_max, part_sum, Na, V, H, hidden.stride(0),
                                  weight.stride(0), inv_temp, tiles_per_split, splits, HAS_BIAS=has_bias,
                                  UPCAST=_needs_upcast(hidden.dtype), DOT_PRECISION=_dot_precision(), **fwd)
    grid = (triton.cdiv(Na, merge["BLOCK_M"]),)
    _logprob_merge_kernel[grid](hidden, weight, b, row_index, target_ids, part_max, part_sum, logp, lse, Na, H,
                                hidden.stride(0), weight.stride(0), inv_temp, splits, HAS_BIAS=has_bias,
                                BLOCK_S=triton.next_power_of_2(splits), **merge)
    return logp, lse


def logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_index: torch.Tensor,
                     target_ids: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor, *, temperature: float,
                     need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True):
    """Triton backward; same contract as :func:`sod_kernels.token_logprobs.logprob_backward`.

    Accumulates in fp32 buffers (``[Na, H]`` for the used rows, ``[V, H]``, ``[V]``) and returns the
    gradients in the inputs' dtypes (None where not needed).
    """
    Na = row_index.numel()
    V, H = weight.shape
    need_bias = need_bias and bias is not None
    dev = hidden.device
    d_rows = torch.zeros(Na if need_hidden else 0, H, dtype=torch.float32, device=dev)
    d_weight = torch.zeros(V if need_weight else 0, H, dtype=torch.float32, device=dev)
    d_bias = torch.zeros(V if need_bias else 0, dtype=torch.float32, device=dev)
    cfg = _backward_config(hidden.dtype)
    grid = (triton.cdiv(Na, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))
    if Na and (need_hidden or need_weight or need_bias):
        _logprob_backward_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, row_index, target_ids, lse, grad_logp,
            d_rows, d_weight, d_bias, Na, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_BIAS=bias is not None, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight, NEED_BIAS=need_bias,
            UPCAST=_needs_upcast(hidden.dtype), DOT_PRECISION=_dot_precision(), **cfg)
    d_hidden = None
    if need_hidden:
        d_hidden = torch.zeros_like(hidden)
        d_hidden.index_copy_(0, row_index, d_rows.to(hidden.dtype))
    return (d_hidden, d_weight.to(weight.dtype) if need_weight else None,
            d_bias.to(bias.dtype) if need_bias else None)


# ------------------------------------------------------------------------------------------------ codegen
# The headline size of PERF.md (student side): N=16384 rows, H=1024, V=151936, bf16.
HEADLINE_ROWS = 16384
HEADLINE_VOCAB = 151936


def codegen_specs() -> list[dict]:
    """The three kernels at the headline-size configs (bf16, plus the float32 partial and backward kernels),
    for ``benchmarks.codegen`` (sm_90 compile check)."""
    return _codegen_specs("bf16", GPU_FORWARD, GPU_BACKWARD, merge=True) + \
        _codegen_specs("fp32", GPU_FORWARD_FP32, GPU_BACKWARD_FP32, merge=False)


def _codegen_specs(dtype: str, forward: dict, backward: dict, *, merge: bool) -> list[dict]:
    common = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "rows_ptr": "*i64"}
    ints = {"Na": "i32", "V": "i32", "H": "i32", "stride_h": "i32", "stride_w": "i32"}
    fwd, bwd = dict(forward), dict(backward)
    merge_cfg = dict(GPU_MERGE)
    hgmma = dtype != "fp32"
    specs = []
    warps, stages = fwd.pop("num_warps"), fwd.pop("num_stages")
    specs.append({
        "name": f"logprob_partial[{dtype} bm{fwd['BLOCK_M']} bv{fwd['BLOCK_V']} bk{fwd['BLOCK_K']}]",
        "fn": _logprob_partial_kernel,
        "signature": {**common, "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", **ints, "inv_temp": "fp32",
                      "tiles_per_split": "i32", "num_splits": "i32"},
        "constexprs": {"HAS_BIAS": False, "UPCAST": False, "DOT_PRECISION": FP32_DOT_PRECISION, **fwd},
        "num_warps": warps, "num_stages": stages, "expect_hgmma": hgmma,
    })
    if merge:
        specs.append(_merge_spec(common, merge_cfg))
    warps, stages = bwd.pop("num_warps"), bwd.pop("num_stages")
    specs.append({
        "name": f"logprob_backward[{dtype} bm{bwd['BLOCK_M']} bv{bwd['BLOCK_V']} bk{bwd['BLOCK_K']}]",
        "fn": _logprob_backward_kernel,
        "signature": {**common, "targets_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
                      "d_hidden_ptr": "*fp32", "d_weight_ptr": "*fp32", "d_bias_ptr": "*fp32", **ints,
                      "inv_temp": "fp32"},
        "constexprs": {"HAS_BIAS": False, "NEED_HIDDEN": True, "NEED_WEIGHT": True, "NEED_BIAS": False,
                       "UPCAST": False, "DOT_PRECISION": FP32_DOT_PRECISION, **bwd},
        "num_warps": warps, "num_stages": stages, "expect_hgmma": hgmma,
    })
    return specs


def _merge_spec(common: dict, merge: dict) -> dict:
    warps, stages = merge.pop("num_warps"), merge.pop("num_stages")
    splits = choose_splits_for(HEADLINE_ROWS, HEADLINE_VOCAB, GPU_FORWARD["BLOCK_M"], GPU_FORWARD["BLOCK_V"],
                               HEADLINE_SM_COUNT)
    return {
        "name": f"logprob_merge[bm{merge['BLOCK_M']} bk{merge['BLOCK_K']}]",
        "fn": _logprob_merge_kernel,
        "signature": {**common, "targets_ptr": "*i64", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                      "logp_ptr": "*fp32", "lse_ptr": "*fp32", "Na": "i32", "H": "i32", "stride_h": "i32",
                      "stride_w": "i32", "inv_temp": "fp32", "num_splits": "i32"},
        "constexprs": {"HAS_BIAS": False, "BLOCK_S": triton.next_power_of_2(splits), **merge},
        "num_warps": warps, "num_stages": stages, "expect_hgmma": False,
    }
