"""GRPO and SOD advantages against reference/ (SPEC section 7)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reference import ref_grpo_advantages, ref_sod_advantages
from sod_kernels import grpo_advantages, sod_advantages
from tests.helpers import step_masks


@st.composite
def grouped_rewards(draw):
    B = draw(st.integers(0, 24))
    groups = draw(st.lists(st.integers(0, 5), min_size=B, max_size=B))
    binary = draw(st.booleans())
    rewards = torch.randint(0, 2, (B,)).double() if binary else torch.randn(B, dtype=torch.float64)
    return rewards, torch.tensor(groups, dtype=torch.int64)


@given(grouped_rewards())
def test_grpo_matches_reference(data):
    rewards, groups = data
    got = grpo_advantages(rewards, groups)
    assert got.dtype == torch.float64
    assert torch.allclose(got, ref_grpo_advantages(rewards, groups), rtol=1e-10, atol=1e-10)


def test_grpo_single_rollout_group_and_constant_group():
    r = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([7, 3, 3, 9, 9])
    a = grpo_advantages(r, g)
    assert abs(a[0].item() - 2.0 / (1 + 1e-6)) < 1e-6  # group of one: mean 0, std 1
    assert a[1].item() == 0.0 and a[2].item() == 0.0  # identical rewards: zero advantage, not NaN
    expected = (0.0 - 0.5) / (torch.tensor([0.0, 1.0]).std().item() + 1e-6)
    assert abs(a[3].item() - expected) < 1e-6


@given(step_masks(max_rows=4), st.floats(-2, 2), st.floats(1e-7, 1e-2), st.floats(0, 1))
def test_sod_advantages_match_reference(mask, coef, epsilon, delta):
    B = mask.shape[0]
    grpo = torch.randn(B, dtype=torch.float64)
    s = -torch.rand(mask.shape, dtype=torch.float64) * 3
    t = -torch.rand(mask.shape, dtype=torch.float64) * 3
    got = sod_advantages(grpo, s, t, mask, coef, epsilon, delta)
    assert torch.allclose(got, ref_sod_advantages(grpo, s, t, mask, coef, epsilon, delta), rtol=1e-10, atol=1e-10)
    assert bool((got[mask == 0] == 0).all())


def test_sod_advantages_float32_inputs_give_float32():
    mask = torch.tensor([[1, 1, 0, 1]])
    out = sod_advantages(torch.tensor([0.5]), -torch.rand(1, 4), -torch.rand(1, 4), mask)
    assert out.dtype == torch.float32 and out.shape == (1, 4)


@given(step_masks(max_rows=1), st.floats(-2, 2), st.sampled_from(["0-D", "(1,)"]))
def test_sod_advantages_of_one_sequence(mask, coef, form):
    # [T] inputs: one rollout, so one GRPO advantage, given as a 0-D tensor or of shape (1,).
    if mask.shape[0] == 0:
        mask = torch.zeros(1, mask.shape[1], dtype=torch.int64)
    row = mask[0]
    grpo = torch.randn(1, dtype=torch.float64)
    s = -torch.rand(row.shape, dtype=torch.float64) * 3
    t = -torch.rand(row.shape, dtype=torch.float64) * 3
    got = sod_advantages(grpo[0] if form == "0-D" else grpo, s, t, row, coef)
    assert got.shape == row.shape
    want = ref_sod_advantages(grpo, s[None], t[None], row[None], coef)[0]
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_sod_advantages_shape_errors_say_what_is_expected():
    T = 6
    s, t, m = -torch.rand(T), -torch.rand(T), torch.ones(T)
    for bad in (torch.zeros(T), torch.zeros(2), torch.zeros(0)):
        with pytest.raises(ValueError, match=r"grpo_advantages must have shape \(\) or \(1,\)"):
            sod_advantages(bad, s, t, m)
    with pytest.raises(ValueError, match=r"grpo_advantages must have shape \(3,\)"):
        sod_advantages(torch.zeros(T), -torch.rand(3, T), -torch.rand(3, T), torch.ones(3, T))
    with pytest.raises(ValueError, match=r"grpo_advantages must have shape \(3,\)"):
        sod_advantages(torch.tensor(0.5), -torch.rand(3, T), -torch.rand(3, T), torch.ones(3, T))
    with pytest.raises(ValueError, match="grpo_advantages must be 0-D or 1-D"):
        sod_advantages(torch.zeros(3, 1), -torch.rand(3, T), -torch.rand(3, T), torch.ones(3, T))


@given(grouped_rewards(), st.sampled_from([torch.float32, torch.float64]))
def test_grpo_is_bitwise_reproducible(data, dtype):
    rewards, groups = data
    a, b = grpo_advantages(rewards.to(dtype), groups), grpo_advantages(rewards.to(dtype), groups)
    assert a.dtype == dtype and torch.equal(a, b)
    assert torch.allclose(a.double(), ref_grpo_advantages(rewards.to(dtype), groups), rtol=1e-5, atol=1e-5)
