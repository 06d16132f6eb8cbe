"""Step segmentation and step weights (sod_kernels/steps.py) against reference/ and SPEC section 5."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import (ref_sod_step_weights, ref_step_divergence, ref_step_ids_from_mask,
                       ref_step_weights_running_product)
from sod_kernels import sod_step_statistics, sod_step_weights, step_ids_from_mask, step_weights_from_divergence
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
