"""The d(weight) fold as one Triton GEMM: ``acc[V, H] += A^T @ B`` with the float32 accumulator read once, early.

What it computes (:func:`fold_into`)
------------------------------------
- ``acc``: float32 ``[V, H]``, unit column stride (row stride passed), updated in place: the student's
  d(weight) accumulator of :class:`sod_kernels.core.chunks.GradAccumulator`;
- ``A``: d(logits) ``[K, V]`` (bfloat16, float16 or float32; unit column stride, row stride passed: a view of
  the fold buffer of ``K`` rows, ``K`` = 1024 at the default fold);
- ``B``: the hidden rows ``[K, H]`` in the same dtype (unit column stride, row stride passed: rows of the
  hidden states read in place, or the fold buffer of gathered rows).

Grid: one program per ``BLOCK_V x BLOCK_H`` tile of ``acc``, the ``H`` tiles of one ``V`` tile consecutive
(they read the same ``[K, BLOCK_V]`` columns of ``A``, so ``A`` comes from HBM about once and from L2 for the
others).  Each program issues the load of its accumulator tile first, then runs the loop over ``K`` in steps
of ``BLOCK_K`` with ``tl.dot`` (16-bit inputs on tensor cores with float32 accumulation; float32 inputs as
exact float32 products, ``input_precision="ieee"``, like torch's default float32 matmul, which is not TF32),
and adds the old tile to the products and stores it once at the end.  Masks cover ``K``, ``V`` and ``H`` that
are not multiples of the blocks.  No atomics and no split of ``K``: every entry is one program's fixed-order
sum, so the result is bitwise reproducible run to run.

Why (cost at the headline size, ``V = 151936``, ``H = 1024``, ``K = 1024``, bf16, H200)
----------------------------------------------------------------------------------------
One fold is ``2 K V H`` = 0.32 TFLOP (about 0.4 ms of tensor-core time) and moves the accumulator in and out,
``8 V H`` = 1.24 GB (about 0.26 ms of HBM time), plus ``2 K V`` = 0.31 GB of d(logits).  cuBLAS's ``addmm`` into
the float32 accumulator (``beta = 1``) reads the C tile in its epilogue, after the main loop, so each tile's
accumulator traffic follows its products instead of overlapping them: 16 folds took 15.1 ms against 7.2 ms for
the products alone.  Here the accumulator tile's load is in flight during the whole K loop (the products never
wait for it), so the fold is bound by the larger of the two times, not their sum.  The price is registers:
the old tile is held next to the dot's accumulator, ``2 x 128 x 128`` float32 over 256 threads = 128 registers
per thread, which is why the tile is 128 x 128 with 8 warps (two warpgroups of 64 x 128 wgmma) rather than
128 x 256 (256 registers of tiles alone: spills).  ``BLOCK_K`` 64 with 4 stages keeps 4 x 32 KiB of ``A`` and
``B`` tiles in flight (cp.async pipeline).  Float32 inputs (exact ``ieee`` products: FMA loops, no tensor cores)
take 64 x 64 tiles, ``BLOCK_K`` 32, 4 warps, 2 stages (larger tiles spill).  Whether this beats ``addmm`` is measured by
``benchmarks/gpu_headline.py`` (``SOD_KERNELS_FOLD_IMPL``); the default fold stays ``addmm``.

The transposed operand: ``A`` is loaded as ``[BLOCK_K, BLOCK_V]`` tiles (V contiguous, as stored) and fed to
``tl.dot`` as ``tl.trans(a)``, an MN-major operand in shared memory, which 16-bit wgmma reads directly
(``benchmarks.codegen`` checks that HGMMA instructions appear for the bf16 config).  Float32 ``ieee`` products
do not use tensor cores at all.

Imported lazily (only when ``SOD_KERNELS_FOLD_IMPL=triton`` selects it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import triton_interpreter_enabled

# sm_90 launch (see the module docstring): 128 x 128 accumulator tiles, K in steps of 64, 4 cp.async stages.
BLOCK_V = 128
BLOCK_H = 128
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 4
# float32 operands (exact products on the FMA units): smaller tiles, no spills.
FP32_BLOCKS = (64, 64, 32)  # (BLOCK_V, BLOCK_H, BLOCK_K)
FP32_NUM_WARPS = 4
FP32_NUM_STAGES = 2
# Under the interpreter: small blocks, so small test shapes span several tiles and K steps with masked edges.
INTERPRETER_BLOCKS = (32, 16, 16)  # (BLOCK_V, BLOCK_H, BLOCK_K)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def fold_kernel(acc_ptr, a_ptr, b_ptr, K, V, H, stride_acc, stride_ak, stride_bk,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                UPCAST: tl.constexpr):
    """``acc[v, h] += sum_k a[k, v] b[k, h]`` for one ``BLOCK_V x BLOCK_H`` tile; unit column strides.  ``IEEE``:
    exact float32 products (float32 operands); ``UPCAST``: the operands go to float32 before the product (only
    under the interpreter, whose ``tl.dot`` multiplies bfloat16 bit patterns as integers)."""
    pid = tl.program_id(0)
    n_h = tl.cdiv(H, BLOCK_H)
    pid_v = pid // n_h
    pid_h = pid % n_h
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    v_ok = offs_v < V
    h_ok = offs_h < H
    tile_ok = v_ok[:, None] & h_ok[None, :]
    acc_ptrs = acc_ptr + offs_v[:, None].to(tl.int64) * stride_acc + offs_h[None, :]
    old = tl.load(acc_ptrs, mask=tile_ok, other=0.0)  # issued first: in flight during the K loop
    a_ptrs = a_ptr + offs_k[:, None].to(tl.int64) * stride_ak + offs_v[None, :]  # [BLOCK_K, BLOCK_V]
    b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_h[None, :]  # [BLOCK_K, BLOCK_H]
    total = tl.zeros((BLOCK_V, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            total = tl.dot(tl.trans(a), b, total, input_precision="ieee")
        else:
            total = tl.dot(tl.trans(a), b, total)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(acc_ptrs, old + total, mask=tile_ok)


def fold_blocks(dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """``(BLOCK_V, BLOCK_H, BLOCK_K)`` for operands of ``dtype``: the sm_90 tiles (16-bit or float32), or small
    ones under the interpreter."""
    if triton_interpreter_enabled():
        return INTERPRETER_BLOCKS
    return FP32_BLOCKS if dtype == torch.float32 else (BLOCK_V, BLOCK_H, BLOCK_K)


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def fold_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, blocks: tuple[int, int, int] | None = None
              ) -> torch.Tensor:
    """``acc += a.T @ b`` in place with the Triton fold kernel; returns ``acc``.

    ``acc`` float32 ``[V, H]`` with unit column stride; ``a`` ``[K, V]`` and ``b`` ``[K, H]`` of one dtype in
    (float32, bfloat16, float16), on ``acc``'s device (operands with a non-unit column stride are copied once).
    float32 operands multiply exactly (``ieee``), 16-bit ones on tensor cores, float32 accumulation either way.
    ``blocks``: ``(BLOCK_V, BLOCK_H, BLOCK_K)``, default :func:`fold_blocks` of the operands' dtype.
    """
    if a.dim() != 2 or b.dim() != 2 or acc.dim() != 2:
        raise ValueError(f"fold_into: 2-D tensors expected, got acc {tuple(acc.shape)}, a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}")
    K, V = a.shape
    if b.shape[0] != K or tuple(acc.shape) != (V, b.shape[1]):
        raise ValueError(f"fold_into: acc [V, H] += a[K, V].T @ b[K, H] does not fit acc {tuple(acc.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    if acc.dtype != torch.float32 or (acc.stride(1) != 1 and acc.shape[1] > 1):
        raise ValueError("fold_into: the accumulator must be float32 with unit column stride")
    if a.dtype != b.dtype or a.dtype not in _DTYPES:
        raise TypeError(f"fold_into: a and b must share one dtype of {_DTYPES}, got {a.dtype} and {b.dtype}")
    H = b.shape[1]
    if K == 0 or V == 0 or H == 0:
        return acc
    a, b = _unit_columns(a), _unit_columns(b)
    ieee = a.dtype == torch.float32
    # The interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584): float32 operands
    # there instead (bfloat16 -> float32 is exact, and so is the product of two bfloat16 values in float32).
    upcast = a.dtype == torch.bfloat16 and triton_interpreter_enabled()
    block_v, block_h, block_k = blocks if blocks is not None else fold_blocks(a.dtype)
    grid = (triton.cdiv(V, block_v) * triton.cdiv(H, block_h),)
    fold_kernel[grid](acc, a, b, K, V, H, acc.stride(0), a.stride(0), b.stride(0), BLOCK_V=block_v,
                      BLOCK_H=block_h, BLOCK_K=block_k, IEEE=ieee or upcast, UPCAST=upcast,
                      num_warps=FP32_NUM_WARPS if ieee else NUM_WARPS,
                      num_stages=FP32_NUM_STAGES if ieee else NUM_STAGES)
    return acc


def codegen_specs() -> list[dict]:
    """The fold at the headline size (``V = 151936``, ``H = 1024``, ``K = 1024``) for ``benchmarks.codegen``: bf16
    d(logits) and hidden rows on sm_90 with warpgroup MMA (HGMMA, the transposed ``A`` read from shared memory),
    pipelined (``num_stages > 1``), no spills; and the float32 (``ieee``, no tensor cores) launch, no spills."""
    def spec(dtype: str, blocks, ieee: bool, num_warps: int, num_stages: int) -> dict:
        bv, bh, bk = blocks
        return {
            "name": f"fold_kernel[{dtype} {bv}x{bh}x{bk}]", "fn": fold_kernel,
            "signature": {"acc_ptr": "*fp32", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "K": "i32", "V": "i32",
                          "H": "i32", "stride_acc": "i32", "stride_ak": "i32", "stride_bk": "i32"},
            "constexprs": {"BLOCK_V": bv, "BLOCK_H": bh, "BLOCK_K": bk, "IEEE": ieee, "UPCAST": False},
            "num_warps": num_warps, "num_stages": num_stages, "expect_hgmma": not ieee,
            "divisible_by_16": ["K", "V", "H", "stride_acc", "stride_ak", "stride_bk"],
        }

    return [spec("bf16", (BLOCK_V, BLOCK_H, BLOCK_K), False, NUM_WARPS, NUM_STAGES),
            spec("fp32", FP32_BLOCKS, True, FP32_NUM_WARPS, FP32_NUM_STAGES)]
