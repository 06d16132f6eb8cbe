"""fused_token_logprobs (both backends) against reference.ref_token_logprobs in float64 (SPEC 7, 9)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import ref_token_logprobs
from sod_kernels import fused_token_logprobs
from sod_kernels.core.options import PassOptions
from sod_kernels.logprobs import token_logprobs as torch_backend
from sod_kernels.logprobs import triton_backend
from tests.conftest import HAS_CUDA

# The Triton backend runs on CUDA tensors where there is a GPU, else under the interpreter on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

FP32_VALUE_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4
LOW_PRECISION_GRAD_RTOL = 2e-2
TRITON_EXAMPLES = 12  # the interpreter takes ~1-2 s per forward + backward


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """``|got - want| / max(|want|, floor)`` (Frobenius norms).  ``floor`` is the scale below which an error is
    judged in absolute terms: a log-prob ``z_y - lse`` near 0 (a near-certain token) or a gradient factor
    ``onehot - p`` near 0 is a difference of O(1) quantities, exact only to ``eps`` times their size."""
    want = want.double().cpu()
    return ((got.double().cpu() - want).norm() / want.norm().clamp(min=floor)).item()


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def make_inputs(lead, H, V, dtype, bias, seed, peaked=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * ((4.0 if peaked else 1.0) / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, lead, generator=g)
    # Round to the test dtype first so that the float64 reference sees exactly the kernel's inputs.
    cast = lambda x: None if x is None else x.to(dtype).double()  # noqa: E731
    return cast(hidden), cast(weight), cast(b), y


def check_against_reference(lead, H, V, dtype, bias, temperature, backend, seed, peaked=False):
    hidden, weight, b, y = make_inputs(lead, H, V, dtype, bias, seed, peaked)
    upstream = torch.randn(lead, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    ref = ref_token_logprobs(ref_in[0], ref_in[1], y, ref_in[2], temperature)
    (ref * upstream).sum().backward()
    dev = device_of(backend)
    ins = [t.to(dtype).to(dev).requires_grad_() if t is not None else None for t in (hidden, weight, b)]
    got = fused_token_logprobs(ins[0], ins[1], y.to(dev), bias=ins[2], temperature=temperature, backend=backend)
    assert got.shape == tuple(lead)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (got * upstream.to(got.dtype).to(dev)).sum().backward()
    # Log-probs are computed in fp32 from the exact (rounded) inputs, whatever their dtype.
    value_tol = 1e-10 if dtype == torch.float64 else FP32_VALUE_RTOL
    # Log-probs are O(1) nats: judged relative to 1 nat per token where they are closer to 0.
    assert rel_err(got.detach(), ref.detach(), floor=ref.numel() ** 0.5) < value_tol
    grad_tol = {torch.float64: 1e-10, torch.float32: FP32_GRAD_RTOL}.get(dtype, LOW_PRECISION_GRAD_RTOL)
    # Each gradient is upstream x (onehot - p) x the other operand; its floor is that product with
    # |onehot - p| = 1, the size at which (onehot - p) is accurate to its dtype's epsilon.
    up = upstream.norm().item()
    floors = {"hidden": up * weight.norm(dim=-1).max().item(), "weight": up * hidden.norm(dim=-1).max().item(),
              "bias": up}
    for name, mine, theirs in zip(("hidden", "weight", "bias"), ins, ref_in):
        if mine is None:
            continue
        assert mine.grad is not None and mine.grad.dtype == dtype, name
        assert rel_err(mine.grad, theirs.grad, floor=floors[name]) < grad_tol, name


shapes = st.tuples(st.integers(1, 3), st.integers(1, 13), st.integers(1, 40), st.integers(2, 300))


@given(shapes, st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), st.booleans(),
       st.sampled_from([1.0, 0.7, 1.6]), st.booleans(), st.integers(0, 2 ** 30))
def test_torch_backend_matches_reference(shape, dtype, bias, temperature, peaked, seed):
    B, T, H, V = shape
    check_against_reference((B, T), H, V, dtype, bias, temperature, "torch", seed, peaked)


@settings(max_examples=TRITON_EXAMPLES)
@given(st.tuples(st.integers(1, 2), st.integers(1, 25), st.integers(1, 40), st.integers(2, 300)),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), st.booleans(), st.sampled_from([1.0, 0.7]),
       st.booleans(), st.integers(0, 2 ** 30))
def test_triton_backend_matches_reference(shape, dtype, bias, temperature, peaked, seed):
    B, T, H, V = shape
    check_against_reference((B, T), H, V, dtype, bias, temperature, "triton", seed, peaked)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_sequence_input_odd_sizes(backend, dtype):
    # [T, H] input; sizes that are not multiples of any block (interpreter blocks are 16 x 32 x 16).
    check_against_reference((37,), 45, 301, dtype, True, 0.9, backend, seed=3)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_triton_chunks_and_vocabulary_splits_merge_exactly(chunk_size):
    hidden, weight, b, y = make_inputs((29,), 20, 250, torch.float32, True, seed=11)
    hidden, weight, b = hidden.float(), weight.float(), b.float()
    rows = torch.tensor([0, 3, 4, 7, 9, 15, 28])
    want, want_lse, want_h, _ = torch_backend.logprob_forward(hidden, weight, b, rows, y, temperature=1.3,
                                                              with_entropy=True)
    on = lambda x: x.to(TRITON_DEVICE)  # noqa: E731
    got, got_lse, got_h, _ = triton_backend.logprob_forward(on(hidden), on(weight), on(b), on(rows), on(y),
                                                            temperature=1.3, with_entropy=True, chunk_size=chunk_size)
    assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_h.cpu(), want_h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_row_subset_gives_zero_gradient_elsewhere(backend):
    hidden, weight, _, y = make_inputs((20,), 16, 100, torch.float32, False, seed=5)
    dev = device_of(backend)
    hidden = hidden.float().to(dev).requires_grad_()
    weight = weight.float().to(dev).requires_grad_()
    rows = torch.tensor([2, 5, 11])
    logp, _ = torch_backend.TokenLogprobs.apply(hidden, weight, None, rows.to(dev), y.to(dev), PassOptions(backend=backend))
    logp.sum().backward()
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[rows] = False
    grad = hidden.grad.cpu()
    assert bool((grad[untouched] == 0).all())
    assert bool((grad[rows].abs().sum(-1) > 0).all())
    ref_h = hidden.detach().double().cpu()[rows].requires_grad_()
    ref_w = weight.detach().double().cpu().requires_grad_()
    ref_token_logprobs(ref_h, ref_w, y[rows]).sum().backward()
    assert rel_err(grad[rows], ref_h.grad) < FP32_GRAD_RTOL
    assert rel_err(weight.grad, ref_w.grad) < FP32_GRAD_RTOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_logits_stay_finite(backend):
    # One token far above the rest (p ~ 1) and logits of order 1e3: the online lse must not overflow.
    hidden = torch.zeros(4, 8)
    hidden[:, 0] = 1.0
    weight = torch.zeros(70, 8)
    weight[:, 0] = torch.linspace(-1000.0, 1000.0, 70)
    y = torch.tensor([69, 0, 35, 69])
    dev = device_of(backend)
    got = fused_token_logprobs(hidden.to(dev), weight.to(dev), y.to(dev), backend=backend).cpu()
    want = ref_token_logprobs(hidden.double(), weight.double(), y)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-3)


def _storage_ptr(x):
    if isinstance(x, torch.Tensor):
        return x.untyped_storage().data_ptr()
    if isinstance(x, torch.UntypedStorage):
        return x.data_ptr()
    return None


class AllocationRecorder(TorchDispatchMode):
    """Records the size (in 4-byte words) of every new storage an aten op returns.

    Outputs that alias an input's storage (views, in-place ops, and the byte views of existing storages
    that the Triton interpreter makes to move arguments) allocate nothing and are not recorded.
    """

    def __init__(self):
        super().__init__()
        self.sizes = [0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(x) for x in torch.utils._pytree.tree_leaves((args, kwargs or {}))}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage_ptr(t) not in inputs:
                self.sizes.append(t.untyped_storage().nbytes() // 4)
        return out


def largest_allocation(fn) -> int:
    with AllocationRecorder() as rec:
        fn()
    return max(rec.sizes)


def test_triton_path_allocates_nothing_of_size_rows_x_vocab():
    N, H, V = 64, 16, 500  # N * V = 32000 dominates V * H = 8000 and N * H = 1024
    hidden = torch.randn(N, H, device=TRITON_DEVICE, requires_grad=True)
    weight = (torch.randn(V, H, device=TRITON_DEVICE) / 4).requires_grad_()
    bias = torch.randn(V, device=TRITON_DEVICE, requires_grad=True)
    y = torch.randint(0, V, (N,), device=TRITON_DEVICE)

    def fused():  # 8-row chunks: blocks of 8 x V
        fused_token_logprobs(hidden, weight, y, bias=bias, backend="triton", chunk_size=8).sum().backward()

    def materialized():
        torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, y[:, None]).sum().backward()

    assert largest_allocation(materialized) >= N * V  # the recorder sees a logits-sized tensor when there is one
    assert largest_allocation(fused) <= V * H  # the largest: the fp32 d(weight) accumulator


def test_errors_name_the_argument():
    h, w, y = torch.randn(2, 3, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 3))
    cases = [
        (dict(hidden=torch.randn(2, 3, 7)), ValueError, "hidden"),
        (dict(hidden=h.double()), TypeError, "weight"),
        (dict(hidden=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "hidden"),
        (dict(target_ids=torch.full((2, 3), 10)), ValueError, "target_ids"),
        (dict(target_ids=torch.full((2, 3), -1)), ValueError, "target_ids"),
        (dict(target_ids=torch.zeros(2, 4, dtype=torch.int64)), ValueError, "target_ids"),
        (dict(target_ids=torch.zeros(2, 3)), TypeError, "target_ids"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]
    for change, error, name in cases:
        args = dict(hidden=h, weight=w, target_ids=y, **{"temperature": 1.0, "backend": "auto"})
        args.update(change)
        kwargs = {k: args.pop(k) for k in ("temperature", "backend", "bias") if k in args}
        with pytest.raises(error, match=name):
            fused_token_logprobs(args["hidden"], args["weight"], args["target_ids"], **kwargs)


def test_triton_backend_rejects_float64():
    h = torch.randn(3, 8, dtype=torch.float64, device=TRITON_DEVICE)
    w = torch.randn(10, 8, dtype=torch.float64, device=TRITON_DEVICE)
    y = torch.zeros(3, dtype=torch.int64, device=TRITON_DEVICE)
    with pytest.raises(TypeError, match="hidden"):
        fused_token_logprobs(h, w, y, backend="triton")
    assert fused_token_logprobs(h, w, y).dtype == torch.float64  # auto falls back to the torch backend
