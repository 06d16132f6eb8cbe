"""``sod_policy_inputs``: SOD advantages and the authors' logging statistics in one vectorised pass.

From rollout data (rewards, prompt groups, the old policy's and the teacher's sampled-token log-probs,
the response mask) it returns what a PPO/GRPO trainer needs before :func:`sod_kernels.fused_sod_policy_loss`:
the per-token advantages of docs/math.md, ``A = A_grpo * m + coef * w * (teacher_logp - old_logp) * m``,
plus the per-step quantities the authors' trainer logs.  The step statistics are computed once by the
shared helpers of :mod:`sod_kernels.steps` and the advantage uses the same formula as
:func:`sod_kernels.sod_advantages` (tests pin that the two agree exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.validation import (check_binary_mask, check_finite_number, check_positive, check_same_device, check_shape,
                               check_tensor)
from ..core.finite import masked_finite
from .advantages import grpo_advantages
from .weights import DEFAULT_DELTA, DEFAULT_EPSILON, step_ids_from_mask, step_weights_from_divergence, trim_steps


@dataclass
class PolicyInputs:
    """What :func:`sod_policy_inputs` returns (all detached; float32, or float64 for float64 log-probs).

    advantages:            ``[B, T]`` per-token SOD advantages, 0 outside the mask.
    grpo_advantages:       ``[B]`` group-normalised rewards (float32, float64 for float64 rewards).
    token_weights:         ``[B, T]`` step weight of each token, 0 outside the mask.
    step_divergence:       ``[B, K]`` d_k = step mean of ``|old_logp - teacher_logp|`` (K = most steps in a
                           row, 0-padded).
    step_weights:          ``[B, K]`` w_k (0-padded).
    step_tokens:           ``[B, K]`` int64 number of tokens in each step (0-padded).
    num_steps:             ``[B]`` int64 K_b.
    mean_num_steps:        0-D, mean of ``num_steps`` over the batch (0 for an empty batch).
    mean_first_divergence: 0-D, mean of d_1 over rows with at least one step (0 if none).
    mean_last_weight:      0-D, mean of w_{K_b} over rows with at least one step (0 if none).
    """

    advantages: torch.Tensor
    grpo_advantages: torch.Tensor
    token_weights: torch.Tensor
    step_divergence: torch.Tensor
    step_weights: torch.Tensor
    step_tokens: torch.Tensor
    num_steps: torch.Tensor
    mean_num_steps: torch.Tensor
    mean_first_divergence: torch.Tensor
    mean_last_weight: torch.Tensor


def sod_policy_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, old_logprobs: torch.Tensor,
                      teacher_logprobs: torch.Tensor, response_mask: torch.Tensor, *, coef: float = 1.0,
                      epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                      check_inputs: bool = True) -> PolicyInputs:
    """SOD advantages (``sod_advantages(grpo_advantages(rewards, group_ids), ...)``) and step statistics.

    Args:
        rewards: ``[B]`` rollout rewards (floating or integer).
        group_ids: ``[B]`` integer id of each rollout's prompt (GRPO groups).
        old_logprobs: ``[B, T]`` floating, the old (rollout) policy's log-probs of the sampled tokens.
        teacher_logprobs: ``[B, T]`` floating, the teacher's log-probs of the same tokens.
        response_mask: ``[B, T]`` 0/1, 1 on tokens the student generated; steps are its runs of ones.
        coef: weight of the distillation reward; epsilon ``> 0``, delta ``>= 0``: docs/math.md.
        check_inputs: check that the mask holds only 0/1 and the log-probs are finite where it is 1 (host
            syncs). Values where the mask is 0 are never read (NaN or -inf padding is fine).
    Returns:
        :class:`PolicyInputs`.  Cost: O(B T) vectorised work and one host sync (to size the per-step
        tensors to K columns).
    """
    check_tensor(old_logprobs, "old_logprobs", ndim=(2,), floating=True)
    check_tensor(teacher_logprobs, "teacher_logprobs", ndim=(2,), floating=True)
    check_tensor(response_mask, "response_mask", ndim=(2,))
    shape = tuple(old_logprobs.shape)
    check_shape(teacher_logprobs, "teacher_logprobs", shape, "same as old_logprobs")
    check_shape(response_mask, "response_mask", shape, "same as old_logprobs")
    check_tensor(rewards, "rewards", ndim=(1,))
    check_shape(rewards, "rewards", shape[:1], "one reward per row of old_logprobs")
    check_tensor(group_ids, "group_ids", ndim=(1,), integer=True)
    check_shape(group_ids, "group_ids", shape[:1], "one group id per row of old_logprobs")
    check_same_device(rewards=rewards, group_ids=group_ids, old_logprobs=old_logprobs,
                      teacher_logprobs=teacher_logprobs, response_mask=response_mask)
    coef = check_finite_number(coef, "coef")
    epsilon = check_positive(epsilon, "epsilon")
    delta = check_positive(delta, "delta", allow_zero=True)
    check_binary_mask(response_mask, "response_mask", check_values=check_inputs)
    old_logprobs = masked_finite(old_logprobs, response_mask, "old_logprobs", check=check_inputs)
    teacher_logprobs = masked_finite(teacher_logprobs, response_mask, "teacher_logprobs", check=check_inputs)

    grpo = grpo_advantages(rewards, group_ids)
    step_ids = step_ids_from_mask(response_mask, check_inputs=False)
    # The one host sync: size the per-step tensors to the most steps in a row (K) instead of T.
    K = int(step_ids.max()) + 1 if step_ids.numel() else 0
    old, teacher = old_logprobs.detach(), teacher_logprobs.detach()
    weights = step_weights_from_divergence((old - teacher).abs(), step_ids, epsilon=epsilon, delta=delta,
                                           max_steps=max(K, 1))
    acc = weights.token_weights.dtype
    m = (response_mask != 0).to(acc)
    reward = (teacher.to(acc) - old.to(acc)) * m
    advantages = grpo.detach().to(acc)[:, None] * m + coef * weights.token_weights * reward

    trimmed = trim_steps(weights)  # K columns (0 when no row has a step)
    B = step_ids.shape[0]
    num_steps = trimmed.num_steps
    has_steps = num_steps > 0
    rows_with_steps = has_steps.to(acc).sum().clamp(min=1)
    zero = torch.zeros((), dtype=acc, device=step_ids.device)
    if K:
        first = torch.where(has_steps, trimmed.step_divergence[:, 0], zero)
        last = trimmed.step_weights.gather(1, (num_steps - 1).clamp(min=0)[:, None]).squeeze(1)
        last = torch.where(has_steps, last, zero)
    else:
        first = last = torch.zeros(B, dtype=acc, device=step_ids.device)
    return PolicyInputs(
        advantages=advantages, grpo_advantages=grpo, token_weights=weights.token_weights,
        step_divergence=trimmed.step_divergence, step_weights=trimmed.step_weights, step_tokens=trimmed.step_tokens,
        num_steps=num_steps, mean_num_steps=num_steps.to(acc).sum() / max(B, 1),
        mean_first_divergence=first.sum() / rows_with_steps, mean_last_weight=last.sum() / rows_with_steps)
