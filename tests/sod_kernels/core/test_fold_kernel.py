"""The d(weight) fold behind ``SOD_KERNELS_FOLD_IMPL``: the Triton fold kernel (``acc += A^T @ B``) against float64,
:class:`GradAccumulator` with each implementation, and fused_sod_loss's gradients with each against reference/.

Without CUDA the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1) with small blocks
(``fold_kernels.INTERPRETER_BLOCKS`` = 32 x 16 tiles, K steps of 16), so the odd sizes below span several tiles and
K steps with masked edges.  Inputs are fresh random draws (hypothesis seeds); truth is float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import ref_fused_sod_loss
from sod_kernels import fused_sod_loss
from sod_kernels.core import fold_kernels
from sod_kernels.core.chunks import FOLD_IMPLS, GradAccumulator, LMHead, fold_impl, row_selector
from sod_kernels.core.fold_kernels import INTERPRETER_BLOCKS, fold_into
from tests.conftest import HAS_CUDA
from tests.helpers import dense_problem, relative_error

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Error of a float32 accumulation of K exact products against float64 (relative, Frobenius).
FP32_REL = 1e-6
# The 16-bit rounding of the inputs themselves (products of the unrounded float64 values as truth).
INPUT_ROUNDING_REL = {torch.float32: 1e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
BV, BH, BK = INTERPRETER_BLOCKS
SEEDS = st.integers(0, 2**31 - 1)


def _draw(seed: int, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def _truth(acc0: torch.Tensor, *pairs) -> torch.Tensor:
    out = acc0.double().clone()
    for a, b in pairs:
        out += a.double().T @ b.double()
    return out


# ------------------------------------------------------------------------------------------ the kernel alone
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K, V, H", [(37, 301, 45), (2 * BK, 3 * BV, 2 * BH), (1, 5, 3)])
@settings(max_examples=2)
@given(seed=SEEDS)
def test_fold_kernel_matches_float64(dtype, K, V, H, seed):
    """``acc += a^T b`` with a nonzero starting accumulator: float32 accumulation of the (rounded) inputs' exact
    products, so within float32 rounding of the float64 product of the same values, and within the inputs'
    16-bit rounding of the product of the unrounded draws."""
    a64, b64, acc64 = _draw(seed, (K, V), (K, H), (V, H))
    a, b = a64.to(dtype).to(DEVICE), b64.to(dtype).to(DEVICE)
    acc = acc64.float().to(DEVICE)
    start = acc.clone()
    assert fold_into(acc, a, b) is acc
    exact = _truth(start.cpu(), (a.cpu(), b.cpu()))
    assert relative_error(acc.cpu(), exact) < FP32_REL, relative_error(acc.cpu(), exact)
    torch.testing.assert_close(acc.cpu().double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    # against the unrounded draws: the products' part of the error is the 16-bit rounding of a and b
    product = a64.T @ b64
    err = float((acc.cpu().double() - start.cpu().double() - product).norm() / product.norm())
    assert err < INPUT_ROUNDING_REL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=2)
@given(seed=SEEDS)
def test_strided_views_and_column_strides(dtype, seed):
    """The fold's real operands: ``a`` a row block of a wider buffer (row stride > V), ``b`` every other row of
    wider hidden states (row stride 2 x width, a column offset), ``acc`` a column slice of a wider float32
    tensor; and an operand with a non-unit column stride (copied once by the launcher).  Entries of ``acc``'s
    parent outside the slice stay untouched."""
    K, V, H = 29, 70, 21
    a64, h64, acc64 = _draw(seed, (K, V + 11), (2 * K, H + 5), (V, H + 7))
    wide_a, hidden = a64.to(dtype).to(DEVICE), h64.to(dtype).to(DEVICE)
    parent = acc64.float().to(DEVICE)
    before = parent.clone()
    a, b, acc = wide_a[:, 3:3 + V], hidden[::2, 2:2 + H], parent[:, :H]
    assert a.stride(0) == V + 11 and b.stride(0) == 2 * (H + 5) and acc.stride(0) == H + 7
    fold_into(acc, a, b)
    exact = _truth(before[:, :H].cpu(), (a.cpu(), b.cpu()))
    assert relative_error(acc.cpu(), exact) < FP32_REL
    assert torch.equal(parent[:, H:], before[:, H:])
    # a column-major operand (stride (1, K)): same values, same result
    b_cols = b.T.contiguous().T
    assert b_cols.stride(1) != 1
    again = before[:, :H].clone()
    fold_into(again, a, b_cols)
    assert relative_error(again.cpu(), exact) < FP32_REL


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_reproducible_and_accumulates(dtype):
    """Two runs from the same accumulator give identical bits (no atomics, no split K); folding twice adds
    both products."""
    K, V, H = 41, 97, 33
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    a64, b64, a2_64, b2_64, acc64 = _draw(seed, (K, V), (K, H), (K + 6, V), (K + 6, H), (V, H))
    a, b, a2, b2 = (x.to(dtype).to(DEVICE) for x in (a64, b64, a2_64, b2_64))
    start = acc64.float().to(DEVICE)
    runs = []
    for _ in range(2):
        acc = start.clone()
        fold_into(acc, a, b)
        runs.append(acc)
    assert torch.equal(runs[0], runs[1]), seed
    acc = runs[0]
    fold_into(acc, a2, b2)
    exact = _truth(start.cpu(), (a.cpu(), b.cpu()), (a2.cpu(), b2.cpu()))
    assert relative_error(acc.cpu(), exact) < FP32_REL, seed
    assert not torch.equal(acc, runs[1])  # the second product was added


def test_fold_into_refuses_mismatched_operands():
    acc = torch.zeros(5, 3, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        fold_into(acc, torch.zeros(4, 5, device=DEVICE), torch.zeros(4, 2, device=DEVICE))
    with pytest.raises(TypeError, match="one dtype"):
        fold_into(acc, torch.zeros(4, 5, device=DEVICE), torch.zeros(4, 3, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        fold_into(acc.double(), torch.zeros(4, 5, device=DEVICE), torch.zeros(4, 3, device=DEVICE))


def test_codegen_spec_is_the_headline_wgmma_launch():
    """The sm_90 compile check (tests/sod_kernels/core/test_codegen.py) sees the bf16 launch expecting warpgroup
    MMA, pipelined, with every kernel argument typed."""
    specs = fold_kernels.codegen_specs()
    bf16 = [s for s in specs if s["signature"]["a_ptr"] == "*bf16"]
    assert len(bf16) == 1 and bf16[0]["expect_hgmma"] and bf16[0]["num_stages"] > 1
    for spec in specs:
        assert set(spec["signature"]) | set(spec["constexprs"]) == set(fold_kernels.fold_kernel.arg_names)


# --------------------------------------------------------------------------------------- the switch
def test_fold_impl_default_values_and_errors(monkeypatch):
    monkeypatch.delenv("SOD_KERNELS_FOLD_IMPL", raising=False)
    assert fold_impl() == "addmm"
    for impl in FOLD_IMPLS:
        monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", impl)
        assert fold_impl() == impl
    for bad in ("cublas", "Triton", "addmm,triton"):
        monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", bad)
        with pytest.raises(ValueError, match="SOD_KERNELS_FOLD_IMPL.*'addmm', 'triton', 'transposed'"):
            fold_impl()
        with pytest.raises(ValueError, match="SOD_KERNELS_FOLD_IMPL"):
            h = torch.zeros(4, 3)
            GradAccumulator(LMHead(h, torch.zeros(5, 3), None, 5), torch.arange(4), True, need_hidden=True,
                            need_weight=True, need_bias=False, block_rows=2)


def _count_kernel_folds(monkeypatch) -> list[int]:
    calls = [0]
    real = fold_kernels.fold_into

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(fold_kernels, "fold_into", counted)
    return calls


def _accumulate(impl, monkeypatch, hidden, weight, bias, grads, row_index, block_rows, fold_rows):
    """d(hidden), d(weight), d(bias) of GradAccumulator (vocabulary: ``grads``' columns, the weight's other rows
    padding) fed ``grads`` block by block as a loss does: rows from
    :meth:`GradAccumulator.hidden_rows`, d(logits) written into :meth:`GradAccumulator.grad_block`."""
    monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", impl)
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", str(fold_rows))
    n = row_index.numel()
    contiguous = n == hidden.shape[0] and bool((row_index == torch.arange(n, device=row_index.device)).all())
    vocab = grads.shape[1]
    acc = GradAccumulator(LMHead(hidden, weight, bias, vocab), row_index, contiguous, need_hidden=True,
                          need_weight=True, need_bias=bias is not None, block_rows=block_rows)
    assert acc._folding, "the test means fold groups of more than one chunk"
    expected_shape = (hidden.shape[1], vocab) if impl == "transposed" else (vocab, hidden.shape[1])
    assert tuple(acc.d_weight.shape) == expected_shape
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = row_selector(row_index, start, stop, contiguous)
        h_rows = acc.hidden_rows(rows, start, stop)
        block = acc.grad_block(stop - start)
        block.copy_(grads[start:stop])
        acc.add(block, start, stop, h_rows)
    group = acc._capacity // block_rows
    return acc.finish(), -(-(-(-n // block_rows)) // group)  # (gradients, d(weight) products)


@pytest.mark.parametrize("impl", FOLD_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["rows-arange", "rows-gathered"])
@settings(max_examples=2)
@given(seed=SEEDS)
def test_grad_accumulator_with_each_fold_impl(impl, dtype, contiguous, seed):
    """Every implementation gives the d(weight) of ``addmm`` within float32 rounding (and of float64 truth), the
    same d(hidden) and d(bias), over folds of several 7-row chunks (fold rows 20: two or three chunks per
    product, as the fold buffer's memory cap allows, the last fold partial), with contiguous rows (read in
    place) and gathered, non-contiguous ones."""
    N, V, H, C = 50, 53, 19, 7
    h64, w64, b64 = _draw(seed, (N, H), (V + 3, H), (V + 3,))
    hidden, weight, bias = (x.to(dtype).to(DEVICE) for x in (h64, w64, b64))
    if contiguous:
        row_index = torch.arange(N, device=DEVICE)
    else:
        g = torch.Generator().manual_seed(seed)
        row_index = torch.randperm(N, generator=g)[:41].sort().values.to(DEVICE)
    grads = _draw(seed + 1, (row_index.numel(), V))[0].to(dtype).to(DEVICE)
    with pytest.MonkeyPatch.context() as mp:  # (hypothesis: no function-scoped fixture)
        calls = _count_kernel_folds(mp)
        got, products = _accumulate(impl, mp, hidden, weight, bias, grads, row_index, C, 20)
        assert products >= 2 and calls[0] == (products if impl == "triton" else 0)
        base, _ = _accumulate("addmm", mp, hidden, weight, bias, grads, row_index, C, 20)
    d_hidden, d_weight, d_bias = got
    assert d_weight.dtype == dtype and d_weight.shape == weight.shape and d_weight.is_contiguous()
    assert not d_weight[V:].any() and not d_bias[V:].any()
    rows = hidden[row_index].cpu().double()
    exact = grads.cpu().double().T @ rows
    assert relative_error(d_weight[:V].cpu(), exact) < (FP32_REL if dtype == torch.float32 else 4e-3)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(d_weight.cpu().float(), base[1].cpu().float(), **tol)
    assert torch.equal(d_hidden, base[0]) and torch.equal(d_bias, base[2])


def test_triton_impl_falls_back_to_addmm_on_plain_cpu_tensors(monkeypatch):
    """Without the interpreter, CPU tensors cannot run Triton: the "triton" fold is addmm there."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", "triton")
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    acc = GradAccumulator(LMHead(h, w, None, 5), torch.arange(6), True, need_hidden=False, need_weight=True,
                          need_bias=False, block_rows=3)
    assert acc._fold_impl == "addmm"
    for sliced_impl in FOLD_IMPLS:  # the low-memory (sliced) path keeps its own products
        monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", sliced_impl)
        sliced = GradAccumulator(LMHead(h, w, None, 5), torch.arange(6), True, need_hidden=False, need_weight=True,
                                 need_bias=False, block_rows=3, sliced=True)
        assert sliced._fold_impl == "addmm"


# --------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("impl", FOLD_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_sod_loss_gradients_with_each_fold_impl(monkeypatch, impl, dtype):
    """fused_sod_loss (Triton backend) forward + backward with each fold: the student's gradients match the float64
    reference (fp32 1e-4, bf16 2e-2 relative: the dense tests' tolerances), over 5-row chunks folded in groups
    and a mask with gaps (gathered rows)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    monkeypatch.setenv("SOD_KERNELS_FOLD_IMPL", impl)
    calls = _count_kernel_folds(monkeypatch)
    B, T, Hs, Ht, V = 2, 17, 12, 10, 37
    (sh, sw, th, tw, sb, tb), y = dense_problem(B, T, Hs, Ht, V, V + 4, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(torch.int64)
    mask[0, :3] = 1
    leaves = [x.detach().to(DEVICE).requires_grad_() for x in (sh, sw, sb)]
    loss = fused_sod_loss(leaves[0], leaves[1], th.to(DEVICE), tw.to(DEVICE), mask.to(DEVICE),
                          target_ids=y.to(DEVICE), student_bias=leaves[2], teacher_bias=tb.to(DEVICE),
                          step_divergence="none", backend="triton", chunk_size=5)
    loss.backward()
    assert calls[0] >= 1 if impl == "triton" else calls[0] == 0
    ref = [x.detach().double().requires_grad_() for x in (sh, sw, sb)]
    ref_loss, _ = ref_fused_sod_loss(ref[0], ref[1], th.double(), tw.double(), mask, target_ids=y,
                                     student_bias=ref[2], teacher_bias=tb.double(), step_divergence="none")
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * max(abs(ref_loss.item()), 1e-3), seed
    for leaf, r in zip(leaves, ref):
        assert leaf.grad.dtype == dtype
        err = relative_error(leaf.grad.cpu(), r.grad)
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (seed, err)
