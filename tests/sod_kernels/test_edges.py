"""Non-finite values at the library's edges: NaN / -inf where the mask is 0 never influence a result (the
documented 0 outside the mask included), and NaN / Inf where a value is read raises ValueError naming it."""

import math

import pytest
import torch

import sod_kernels
from sod_kernels import fused_sod_policy_loss, fused_topk_logprobs, sod_advantages, sod_policy_inputs

NAN, INF = float("nan"), float("inf")


def rollout(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 0, 0, 0], [0] * 8])
    student = -torch.rand(3, 8, generator=g) * 3
    teacher = -torch.rand(3, 8, generator=g) * 3
    return student, teacher, mask


def poison_padding(x, mask):
    """NaN, -inf and +inf at positions where the mask is 0."""
    x = x.clone()
    outside = torch.nonzero(mask == 0)
    for i, (b, t) in enumerate(outside.tolist()):
        x[b, t] = (NAN, -INF, INF)[i % 3]
    return x


def test_padding_values_never_reach_the_advantages():
    student, teacher, mask = rollout()
    grpo = torch.tensor([0.7, -0.4, 0.1])
    clean = sod_advantages(grpo, student, teacher, mask, coef=0.5, delta=0.2)
    dirty = sod_advantages(grpo, poison_padding(student, mask), poison_padding(teacher, mask), mask, coef=0.5,
                           delta=0.2)
    assert torch.isfinite(dirty).all() and (dirty[mask == 0] == 0).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    rewards, groups = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0])
    clean = sod_policy_inputs(rewards, groups, student, teacher, mask, coef=0.5)
    dirty = sod_policy_inputs(rewards, groups, poison_padding(student, mask), poison_padding(teacher, mask), mask,
                              coef=0.5)
    assert torch.isfinite(dirty.advantages).all() and (dirty.advantages[mask == 0] == 0).all()
    for field in ("advantages", "token_weights", "step_divergence", "step_weights"):
        torch.testing.assert_close(getattr(dirty, field), getattr(clean, field), rtol=0, atol=0)
    assert dirty.mean_first_divergence.item() == clean.mean_first_divergence.item()


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_log_probs_inside_the_mask_are_refused(bad):
    student, teacher, mask = rollout(1)
    grpo = torch.tensor([0.7, -0.4, 0.1])
    for name, position in (("student_logprobs", (0, 4)), ("teacher_logprobs", (1, 2))):
        s, t = student.clone(), teacher.clone()
        (s if name == "student_logprobs" else t)[position] = bad
        with pytest.raises(ValueError, match=f"{name} must be finite where response_mask is 1"):
            sod_advantages(grpo, s, t, mask)
        policy_name = "old_logprobs" if name == "student_logprobs" else name
        with pytest.raises(ValueError, match=f"{policy_name} must be finite where response_mask is 1"):
            sod_policy_inputs(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), s, t, mask)


def policy_case(seed=2, B=2, T=6, H=8, V=16):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g) * 0.3
    targets = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g) * 3
    advantages = torch.randn(B, T, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]])
    return hidden, weight, targets, old, advantages, mask


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_policy_loss_refuses_non_finite_old_logprobs_or_advantages_at_a_response_token(bad):
    hidden, weight, targets, old, advantages, mask = policy_case()
    for name in ("old_logprobs", "advantages"):
        o, a = old.clone(), advantages.clone()
        (o if name == "old_logprobs" else a)[0, 2] = bad
        with pytest.raises(ValueError, match=f"{name} must be finite where response_mask is 1"):
            fused_sod_policy_loss(hidden, weight, targets, o, a, mask, backend="torch")
    # Outside the mask they are never read: same loss, same gradient.
    o, a = poison_padding(old, mask), poison_padding(advantages, mask)
    clean = fused_sod_policy_loss(hidden, weight, targets, old, advantages, mask, backend="torch")
    (grad_clean,) = torch.autograd.grad(clean, hidden)
    dirty = fused_sod_policy_loss(hidden, weight, targets, o, a, mask, backend="torch")
    (grad_dirty,) = torch.autograd.grad(dirty, hidden)
    assert dirty.item() == clean.item() and torch.equal(grad_dirty, grad_clean)


@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_topk_logprobs_refuse_a_non_finite_hidden_state(bad):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    ids, logprobs = fused_topk_logprobs(hidden, weight, 4)
    assert torch.isfinite(logprobs).all()
    hidden[2, 3] = bad
    with pytest.raises(ValueError, match="not finite"):
        fused_topk_logprobs(hidden, weight, 4)
    with pytest.raises(ValueError, match="not finite"):
        fused_topk_logprobs(torch.full((2, 8), 1e30), weight * 1e10, 3)  # float32 logits overflow
    assert not math.isnan(sod_kernels.fused_topk_logprobs(hidden[:2], weight, 1)[1].sum().item())
