"""GRPO and SOD advantages against reference/ (SPEC section 7)."""

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
