"""Step segmentation and step weights (sod_kernels/steps.py) against reference/ and SPEC section 5."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import (ref_sod_step_weights, ref_step_divergence, ref_step_ids_from_mask,
                       ref_step_weights_running_product)
from sod_kernels import (sod_policy_inputs, sod_step_statistics, sod_step_weights, step_ids_from_mask,
                         step_weights_from_divergence)
from sod_kernels.steps.segments import segmented_cumsum
from sod_kernels.steps import closed_form_weights, trim_steps
from tests.helpers import step_masks


@given(step_masks())
def test_step_ids_match_reference(mask):
    assert torch.equal(step_ids_from_mask(mask), ref_step_ids_from_mask(mask))


@given(step_masks(), st.sampled_from([torch.bool, torch.int32, torch.float32]))
def test_step_ids_accept_mask_dtypes(mask, dtype):
    assert torch.equal(step_ids_from_mask(mask.to(dtype)), ref_step_ids_from_mask(mask))


def test_step_ids_one_dimensional_and_empty():
    assert step_ids_from_mask(torch.tensor([0, 1, 1, 0, 1])).tolist() == [-1, 0, 0, -1, 1]
    assert step_ids_from_mask(torch.zeros(0, 5)).shape == (0, 5)
    assert step_ids_from_mask(torch.zeros(3, 0)).shape == (3, 0)


@given(step_masks(), st.floats(1e-8, 1e-1), st.floats(0.0, 2.0), st.booleans())
def test_weights_match_running_product(mask, epsilon, delta, float64):
    dtype = torch.float64 if float64 else torch.float32
    signal = torch.rand(mask.shape, dtype=torch.float64) * torch.rand(()) * 5
    ids = step_ids_from_mask(mask)
    out = trim_steps(step_weights_from_divergence(signal.to(dtype), ids, epsilon=epsilon, delta=delta))
    d_ref = ref_step_divergence(signal, ids)
    tol = 1e-12 if float64 else 2e-6
    assert out.num_steps.tolist() == [len(r) for r in d_ref]
    for b, row in enumerate(d_ref):
        w_ref = ref_step_weights_running_product(row, epsilon, delta)
        K = len(row)
        assert torch.allclose(out.step_divergence[b, :K].double(), torch.tensor(row, dtype=torch.float64),
                              rtol=tol, atol=tol)
        assert torch.allclose(out.step_weights[b, :K].double(), torch.tensor(w_ref, dtype=torch.float64),
                              rtol=10 * tol, atol=10 * tol)
        assert bool((out.step_weights[b, K:] == 0).all()) and bool((out.step_divergence[b, K:] == 0).all())
    assert out.token_weights.dtype == (torch.float64 if float64 else torch.float32)
    assert bool((out.token_weights[ids < 0] == 0).all())


@given(step_masks())
def test_unweighted_gives_ones(mask):
    ids = step_ids_from_mask(mask)
    out = step_weights_from_divergence(torch.rand(mask.shape), ids, weighted=False)
    assert torch.equal(out.token_weights, (ids >= 0).float())


@given(step_masks(max_rows=3), st.floats(1e-7, 1e-2), st.floats(0.0, 1.0))
def test_sod_step_weights_match_reference(mask, epsilon, delta):
    s = -torch.rand(mask.shape, dtype=torch.float64) * 4
    t = -torch.rand(mask.shape, dtype=torch.float64) * 4
    got = sod_step_weights(s, t, mask, epsilon, delta)
    assert got.shape == mask.shape
    assert torch.allclose(got, ref_sod_step_weights(s, t, mask, epsilon, delta), rtol=1e-10, atol=1e-12)


def test_step_ids_input_equals_mask_input():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1]])
    ids = step_ids_from_mask(mask)
    sig = torch.rand(1, 8)
    a = step_weights_from_divergence(sig, ids)
    assert ids.tolist() == [[-1, 0, 0, -1, 1, -1, 2, 2]]
    assert a.num_steps.tolist() == [3]


# --------------------------------------------------------------------- SPEC section 5 worked patterns
def _weights(d, epsilon=1e-6, delta=0.2):
    return closed_form_weights(torch.tensor([d], dtype=torch.float64), epsilon, delta)[0].tolist()


def test_single_step_weight_is_one():
    assert _weights([3.7]) == [1.0]


def test_stable_trajectory_keeps_full_weight():
    assert _weights([0.5, 0.5, 0.5]) == [1.0, 1.0, 1.0]


def test_erroneous_step_is_down_weighted_about_one_third():
    w = _weights([0.4, 1.2])
    assert w[1] == pytest.approx(1 / 3, rel=1e-5)


def test_recovery_is_immediate():
    # weights are relative to step 1, not to the step before
    w = _weights([0.4, 4.0, 0.4])
    assert w[1] == pytest.approx(0.1, rel=1e-5)
    assert w[2] == pytest.approx(1.0, rel=1e-12)


def test_decreasing_divergence_is_capped_at_one_plus_delta():
    w = _weights([1.0, 0.5, 0.01], delta=0.2)
    assert w == [1.0, pytest.approx(1.2), pytest.approx(1.2)]
    assert _weights([1.0, 0.5], delta=0.0) == [1.0, 1.0]


def test_tiny_first_step_crushes_later_steps():
    eps = 1e-6
    w = _weights([0.0, 0.5, 2.0], epsilon=eps)
    assert w[1] == pytest.approx(eps / (0.5 + eps), rel=1e-9)
    assert w[2] == pytest.approx(eps / (2.0 + eps), rel=1e-9)


def test_closed_form_equals_product_of_ratios_without_internal_cap():
    # The running product is capped only at its output: a dip below then above 1+delta matters.
    d = [1.0, 0.1, 2.0]
    assert ref_step_weights_running_product(d, 1e-6, 0.2)[2] == pytest.approx(_weights(d)[2], rel=1e-12)
    assert _weights(d)[2] == pytest.approx((1.0 + 1e-6) / (2.0 + 1e-6), rel=1e-12)


def test_helpers_are_fast_on_large_batches():
    # B=64, T=20480: must be vectorised (a per-token loop would take minutes).  Correctness is checked on
    # a slice against the reference; speed is measured in benchmarks/, not asserted here.
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(64, 20480, generator=g) < 0.7).long()
    s, t = -torch.rand(64, 20480, generator=g), -torch.rand(64, 20480, generator=g)
    out = sod_step_statistics(s, t, mask)
    assert out.token_weights.shape == (64, 20480)
    ref = ref_sod_step_weights(s[:1, :300], t[:1, :300], mask[:1, :300])
    got = sod_step_weights(s[:1, :300], t[:1, :300], mask[:1, :300])
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert math.isfinite(float(out.token_weights.sum()))


# ------------------------------------------------ weights stay in (0, 1 + delta] and finite (SPEC section 5)
ADVERSARIAL_SIGNALS = [-1.9e-6, -1e-30, -0.0, 0.0, 1e-45, 1e-7, 0.5, 7.0, 1e10, 3.0e38]
ACCEPTED_EPSILONS = [1e-300, 5e-324, 1e-46, 1e-6, 1.0]


def _assert_weights_in_range(out, delta):
    cap = torch.tensor(1.0 + delta, dtype=out.step_weights.dtype)
    K = out.step_weights.shape[1]
    exists = torch.arange(K) < out.num_steps[:, None]
    w = out.step_weights[exists]
    assert bool(torch.isfinite(w).all()) and bool((w > 0).all()) and bool((w <= cap).all()), w
    d = out.step_divergence[exists]
    assert bool(torch.isfinite(d).all()) and bool((d >= 0).all())


@given(step_masks(max_rows=3, max_len=60), st.integers(0, 2 ** 30), st.sampled_from(ACCEPTED_EPSILONS),
       st.sampled_from([0.0, 0.2, 5.0]), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_adversarial_signals_give_weights_in_range(mask, seed, epsilon, delta, dtype):
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(ADVERSARIAL_SIGNALS), mask.shape, generator=g)
    signal = torch.tensor(ADVERSARIAL_SIGNALS, dtype=torch.float64)[pick].to(dtype)
    ids = step_ids_from_mask(mask)
    out = trim_steps(step_weights_from_divergence(signal, ids, epsilon=epsilon, delta=delta))
    _assert_weights_in_range(out, delta)
    assert bool((out.token_weights[ids >= 0] > 0).all()) and bool((out.token_weights[ids < 0] == 0).all())
    # The step means are those of the signal clamped at 0 (SPEC section 3), in float64 like the reference.
    d_ref = ref_step_divergence(signal.double().clamp(min=0), ids)
    for b, row in enumerate(d_ref):
        got = out.step_divergence[b, :len(row)].double()
        want = torch.tensor(row, dtype=torch.float64).to(out.step_divergence.dtype).double()
        assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_slightly_negative_divergence_is_clamped_at_zero():
    # fp32 rounding leaves the D of a step where student and teacher agree slightly below 0.
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1]])
    signal = torch.tensor([[0.3, 0.3, 0.0, -1.9e-6, -1.0e-6, 0.0, 0.6]], dtype=torch.float32)
    out = step_weights_from_divergence(signal, step_ids_from_mask(mask))
    assert out.step_divergence[0].tolist() == [pytest.approx(0.3), 0.0, pytest.approx(0.6)]
    assert out.step_weights[0].tolist() == [1.0, pytest.approx(1.2), pytest.approx((0.3 + 1e-6) / (0.6 + 1e-6))]
    # closed_form_weights clamps too: a negative d_1 acts as 0, a negative d_k as 0.
    w = closed_form_weights(torch.tensor([[-1e-6, 0.5, -1.9e-6]]), 1e-6, 0.2)[0]
    assert w.tolist() == [1.0, pytest.approx(1e-6 / (0.5 + 1e-6), rel=1e-5), 1.0]


@pytest.mark.parametrize("epsilon", ACCEPTED_EPSILONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_accepted_epsilon_gives_finite_weights(epsilon, dtype):
    # Steps with d = 0, 0, 0.5, 1e-30, 2.0: the ratio is formed in float64, where d + eps > 0 for any eps > 0.
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 0, 1, 0, 1]])
    signal = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 1e-30, 0.0, 2.0]], dtype=dtype)
    out = step_weights_from_divergence(signal, step_ids_from_mask(mask), epsilon=epsilon, delta=0.2)
    _assert_weights_in_range(out, 0.2)
    tiny = torch.finfo(dtype).tiny
    d = [0.0, 0.0, 0.5, float(torch.tensor(1e-30, dtype=dtype)), 2.0]
    want = [1.0] + [min(max((d[0] + epsilon) / (x + epsilon), tiny), 1.2) for x in d[1:]]
    assert torch.allclose(out.step_weights[0].double(), torch.tensor(want, dtype=dtype).double(), rtol=1e-6, atol=0)
    # The public helpers take the same path (identical log-probs give d = 0 everywhere: all weights 1).
    lp = -torch.rand(1, 11, dtype=dtype)
    assert bool((sod_step_weights(lp, lp, mask, epsilon)[mask == 1] == 1).all())


# ------------------------------------------------------------------- determinism (SPEC section 13)
ORDER_DEPENDENT_OPS = {"scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_", "index_add",
                       "index_add_", "index_put", "index_put_", "_index_put_impl_", "put", "put_", "bincount",
                       "histc", "cumsum", "cumsum_", "cumprod", "logcumsumexp", "segment_reduce",
                       "_segment_reduce"}


class _FloatAccumulationRecorder(TorchDispatchMode):
    """Records the aten ops known to accumulate floats in a scheduling-dependent order on CUDA."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        results = out if isinstance(out, (tuple, list)) else (out,)
        if name in ORDER_DEPENDENT_OPS and any(isinstance(r, torch.Tensor) and r.dtype.is_floating_point
                                               for r in results):
            self.found.append(name)
        return out


def _rollout(B, T, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    s, t = -torch.rand(B, T, generator=g, dtype=dtype) * 4, -torch.rand(B, T, generator=g, dtype=dtype) * 4
    return mask.to(device), s.to(device), t.to(device)


def test_step_statistics_use_no_order_dependent_float_accumulation():
    mask, s, t = _rollout(3, 200, seed=0)
    with _FloatAccumulationRecorder() as recorder:
        step_weights_from_divergence((s - t).abs(), step_ids_from_mask(mask))
        sod_step_statistics(s, t, mask)
        sod_policy_inputs(torch.ones(3), torch.zeros(3, dtype=torch.int64), s, t, mask)
    assert recorder.found == []


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(x.dtype, x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_calls_are_bitwise_identical(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask, s, t = _rollout(8, 5000, seed=1, dtype=dtype, device=device)
    a = step_weights_from_divergence((s - t).abs(), step_ids_from_mask(mask))
    b = step_weights_from_divergence((s - t).abs(), step_ids_from_mask(mask))
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))


@given(step_masks(max_rows=3, max_len=400, max_steps=80), st.integers(0, 2 ** 30))
def test_step_means_equal_the_reference_loop(mask, seed):
    # Rows mixing a huge step with tiny ones: every step's mean stays exact to float64 rounding (a sum that
    # subtracted two long prefix sums would lose the tiny steps).
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1e-9, 1.0, 1e12], dtype=torch.float64)[torch.randint(0, 3, mask.shape, generator=g)]
    signal = torch.rand(mask.shape, generator=g, dtype=torch.float64) * scale
    ids = step_ids_from_mask(mask)
    out = trim_steps(step_weights_from_divergence(signal, ids))
    for b, row in enumerate(ref_step_divergence(signal, ids)):
        assert torch.allclose(out.step_divergence[b, :len(row)], torch.tensor(row, dtype=torch.float64),
                              rtol=1e-13, atol=0)
        assert out.step_tokens[b, :len(row)].tolist() == [int((ids[b] == k).sum()) for k in range(len(row))]


def test_step_weights_input_checks():
    ids = step_ids_from_mask(torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(TypeError, match="token_signal must be a torch.Tensor"):
        step_weights_from_divergence([[0.1, 0.2, 0.0, 0.3]], ids)
    with pytest.raises(TypeError, match="step_ids must have a signed integer dtype"):
        step_weights_from_divergence(torch.rand(1, 4), ids.to(torch.uint8))
    with pytest.raises(ValueError, match="token_signal"):
        step_weights_from_divergence(torch.rand(1, 5), ids)
    with pytest.raises(ValueError, match="epsilon"):
        step_weights_from_divergence(torch.rand(1, 4), ids, epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        step_weights_from_divergence(torch.rand(1, 4), ids, delta=-0.5)


@given(st.integers(0, 3), st.integers(0, 3 * 32 * 32 + 5), st.integers(1, 400), st.integers(0, 2 ** 30))
def test_segmented_cumsum_equals_a_loop(rows, length, segments, seed):
    g = torch.Generator().manual_seed(seed)
    seg = torch.sort(torch.randint(-1, segments, (rows, length), generator=g), dim=1).values
    values = torch.rand(rows, length, generator=g, dtype=torch.float64)
    if values.numel():
        values.view(-1)[int(torch.randint(0, values.numel(), (1,), generator=g))] = float("nan")
    got = segmented_cumsum(values, seg)
    for r in range(rows):
        total, prev = 0.0, None
        for n in range(length):
            k = int(seg[r, n])
            total = (total if k == prev else 0.0) + float(values[r, n])
            prev = k
            want = torch.tensor(total, dtype=torch.float64)
            # A NaN stays inside its own segment.
            assert torch.allclose(got[r, n], want, rtol=1e-12, atol=0, equal_nan=True)
