"""sod_policy_inputs and the vectorised step weights against the per-token loops of reference/ (SPEC 5, 7)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import ref_grpo_advantages, ref_sod_step_weights, ref_step_divergence, ref_step_ids_from_mask, \
    ref_step_weights_running_product
from reference.authors_loop import authors_sod_advantages, authors_step_weights
from sod_kernels import (PolicyInputs, grpo_advantages, sod_advantages, sod_policy_inputs, sod_step_statistics,
                         sod_step_weights)
from sod_kernels.steps import trim_steps
from tests.helpers import step_masks

LONG_ROW_EXAMPLES = 10


def rollout(mask: torch.Tensor, seed: int, groups: int = 3):
    g = torch.Generator().manual_seed(seed)
    B = mask.shape[0]
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 4
    teacher = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 4
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    group_ids = torch.randint(0, groups, (B,), generator=g)
    return rewards, group_ids, old, teacher


@st.composite
def long_step_masks(draw, max_steps: int = 1000):
    """Rows with up to ``max_steps`` steps: runs of 1-4 ones separated by 1-3 zeros."""
    B = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 30))
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        steps = draw(st.integers(0, max_steps))
        ones = torch.randint(1, 5, (steps,), generator=g).tolist()
        zeros = torch.randint(1, 4, (steps,), generator=g).tolist()
        row = [0] * int(torch.randint(0, 5, (1,), generator=g))
        for a, z in zip(ones, zeros):
            row += [1] * a + [0] * z
        rows.append(row)
    T = max(max(len(r) for r in rows), 1)
    return torch.tensor([r + [0] * (T - len(r)) for r in rows], dtype=torch.int64)


@settings(max_examples=LONG_ROW_EXAMPLES)
@given(long_step_masks(), st.integers(0, 2 ** 30), st.sampled_from([1e-6, 1e-3]), st.sampled_from([0.0, 0.2, 1.0]))
def test_vectorised_weights_equal_the_per_token_loop(mask, seed, epsilon, delta):
    _, _, old, teacher = rollout(mask, seed)
    got = sod_step_weights(old, teacher, mask, epsilon, delta)
    want = authors_step_weights(old, teacher, mask, epsilon, delta)
    # Closed form vs running product over up to 1,000 steps: equal up to float64 rounding drift.
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


def test_thousand_steps_in_one_row():
    mask = torch.tensor([([1, 1, 0] * 1000) + [1, 0]], dtype=torch.int64)  # 1,001 steps
    _, _, old, teacher = rollout(mask, seed=0)
    stats = sod_policy_inputs(torch.ones(1), torch.zeros(1, dtype=torch.int64), old, teacher, mask)
    assert int(stats.num_steps[0]) == 1001
    assert torch.allclose(stats.token_weights, authors_step_weights(old, teacher, mask), rtol=1e-9, atol=1e-12)
    # The float32 path of the same data stays within float32 rounding of the loop.
    got32 = sod_step_weights(old.float(), teacher.float(), mask)
    assert torch.allclose(got32.double(), authors_step_weights(old.float().double(), teacher.float().double(), mask),
                          rtol=1e-5, atol=1e-6)


def test_authors_loop_agrees_with_reference_running_product():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 1, 1, 1], [1, 0, 1, 1, 1, 1, 0, 0, 0, 1]])
    _, _, old, teacher = rollout(mask, seed=1)
    assert torch.allclose(authors_step_weights(old, teacher, mask), ref_sod_step_weights(old, teacher, mask),
                          rtol=1e-12, atol=0)


@given(step_masks(max_rows=5), st.integers(0, 2 ** 30), st.floats(-2, 2), st.floats(1e-7, 1e-2), st.floats(0, 1))
def test_policy_inputs_match_reference(mask, seed, coef, epsilon, delta):
    rewards, groups, old, teacher = rollout(mask, seed)
    out = sod_policy_inputs(rewards, groups, old, teacher, mask, coef=coef, epsilon=epsilon, delta=delta)
    assert isinstance(out, PolicyInputs)
    # The advantages are exactly sod_advantages(grpo_advantages(...), ...).
    assert torch.equal(out.grpo_advantages, grpo_advantages(rewards, groups))
    assert torch.equal(out.advantages, sod_advantages(out.grpo_advantages, old, teacher, mask, coef, epsilon, delta))
    assert torch.allclose(out.grpo_advantages, ref_grpo_advantages(rewards, groups), rtol=1e-10, atol=1e-10)
    want_adv = authors_sod_advantages(out.grpo_advantages, old, teacher, mask, coef, epsilon, delta)
    assert torch.allclose(out.advantages, want_adv, rtol=1e-9, atol=1e-12)
    # Per-step statistics against loops over the reference's step ids.
    ids = ref_step_ids_from_mask(mask)
    d = ref_step_divergence((old - teacher).abs(), ids)
    w = [ref_step_weights_running_product(row, epsilon, delta) for row in d]
    K = max((len(row) for row in d), default=0)
    assert out.step_divergence.shape == (mask.shape[0], K) == out.step_weights.shape == out.step_tokens.shape
    assert out.num_steps.tolist() == [len(row) for row in d]
    for b, row in enumerate(d):
        n = len(row)
        assert torch.allclose(out.step_divergence[b, :n], torch.tensor(row, dtype=torch.float64), rtol=1e-10)
        assert torch.allclose(out.step_weights[b, :n], torch.tensor(w[b], dtype=torch.float64), rtol=1e-9)
        assert out.step_tokens[b, :n].tolist() == [int((ids[b] == k).sum()) for k in range(n)]
        assert bool((out.step_divergence[b, n:] == 0).all() and (out.step_weights[b, n:] == 0).all())
        assert bool((out.step_tokens[b, n:] == 0).all())
    with_steps = [b for b, row in enumerate(d) if row]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    assert out.mean_num_steps.item() == pytest.approx(mean([len(row) for row in d]), abs=1e-12)
    assert out.mean_first_divergence.item() == pytest.approx(mean([d[b][0] for b in with_steps]), rel=1e-10)
    assert out.mean_last_weight.item() == pytest.approx(mean([w[b][-1] for b in with_steps]), rel=1e-10)


def test_known_values():
    # Row 0: steps with d = 0.2, 0.6, 0.1 -> w = 1, 1/3, min(2, 1.2) = 1.2 (epsilon negligible).
    mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    old = torch.zeros(2, 7)
    teacher = torch.tensor([[-0.2, -0.2, 5.0, -0.6, 5.0, -0.1, -0.1], [0.0] * 7])
    out = sod_policy_inputs(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), old, teacher, mask, epsilon=1e-9)
    assert out.step_tokens.tolist() == [[2, 1, 2], [0, 0, 0]]
    assert out.num_steps.tolist() == [2 + 1, 0]
    assert torch.allclose(out.step_weights[0], torch.tensor([1.0, 1 / 3, 1.2]), rtol=1e-6)
    assert out.mean_num_steps.item() == pytest.approx(1.5)
    assert out.mean_first_divergence.item() == pytest.approx(0.2, rel=1e-6)  # only row 0 has steps
    assert out.mean_last_weight.item() == pytest.approx(1.2, rel=1e-6)
    a = out.grpo_advantages[0].item()  # group (1, 0): (1 - 0.5) / (std + 1e-6)
    assert out.advantages[0, 3].item() == pytest.approx(a + (1 / 3) * -0.6, rel=1e-5)
    assert out.advantages[0, 2].item() == 0.0 and bool((out.advantages[1] == 0).all())
    assert out.advantages.dtype == torch.float32


def test_empty_batch_and_no_steps():
    out = sod_policy_inputs(torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5), torch.zeros(0, 5),
                            torch.zeros(0, 5))
    assert out.advantages.shape == (0, 5) and out.step_weights.shape == (0, 0)
    assert out.mean_num_steps.item() == 0.0 and out.mean_last_weight.item() == 0.0
    out = sod_policy_inputs(torch.ones(2), torch.tensor([0, 0]), torch.zeros(2, 4), torch.ones(2, 4), torch.zeros(2, 4))
    assert out.step_divergence.shape == (2, 0) and bool((out.advantages == 0).all())
    assert out.mean_first_divergence.item() == 0.0


def test_errors_name_the_argument():
    B, T = 3, 6
    base = dict(rewards=torch.randn(B), group_ids=torch.zeros(B, dtype=torch.int64), old_logprobs=torch.randn(B, T),
                teacher_logprobs=torch.randn(B, T), response_mask=torch.ones(B, T))
    cases = [
        (dict(rewards=torch.randn(B + 1)), ValueError, "rewards"),
        (dict(group_ids=torch.zeros(B)), TypeError, "group_ids"),
        (dict(old_logprobs=torch.zeros(B, T, dtype=torch.int64)), TypeError, "old_logprobs"),
        (dict(teacher_logprobs=torch.randn(B, T + 1)), ValueError, "teacher_logprobs"),
        (dict(response_mask=torch.full((B, T), 0.5)), ValueError, "response_mask"),
        (dict(response_mask=torch.ones(B, T - 1)), ValueError, "response_mask"),
        (dict(epsilon=0.0), ValueError, "epsilon"),
        (dict(delta=-0.1), ValueError, "delta"),
        (dict(coef=float("inf")), ValueError, "coef"),
    ]
    for change, error, name in cases:
        with pytest.raises(error, match=name):
            sod_policy_inputs(**dict(base, **change))


@pytest.mark.parametrize("convert", [lambda x: x.numpy(), lambda x: x.tolist()], ids=["numpy", "list"])
def test_non_tensor_group_ids_name_the_argument(convert):
    mask = torch.ones(3, 4)
    rewards, groups, old, teacher = rollout(mask, seed=0)
    with pytest.raises(TypeError, match="group_ids must be a torch.Tensor"):
        sod_policy_inputs(rewards, convert(groups), old, teacher, mask)


@given(step_masks(max_rows=4, max_len=60), st.integers(0, 2 ** 30))
def test_step_tokens_and_weights_come_from_the_shared_helper(mask, seed):
    rewards, groups, old, teacher = rollout(mask, seed)
    out = sod_policy_inputs(rewards, groups, old.float(), teacher.float(), mask)
    stats = trim_steps(sod_step_statistics(old.float(), teacher.float(), mask))
    assert torch.equal(out.step_tokens, stats.step_tokens) and torch.equal(out.step_weights, stats.step_weights)
    assert torch.equal(out.token_weights, stats.token_weights)
    K = out.step_weights.shape[1]
    exists = torch.arange(K) < out.num_steps[:, None]
    w = out.step_weights[exists]
    assert bool(torch.isfinite(w).all() and (w > 0).all() and (w <= torch.tensor(1.2)).all())
