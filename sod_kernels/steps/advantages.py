"""GRPO and SOD advantages (docs/math.md), vectorised over the batch."""

from __future__ import annotations

import torch

from .segments import segmented_cumsum
from ..core.validation import check_finite_number, check_same_device, check_shape, check_tensor
from .weights import DEFAULT_DELTA, DEFAULT_EPSILON, accumulation_dtype, sod_step_weights
from ..core.finite import masked_finite

GRPO_STD_EPSILON = 1e-6


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Group-normalised rewards: ``(R_b - mean_group R) / (std_group R + 1e-6)``.

    The std uses Bessel's correction (as ``torch.std``); a group of a single rollout uses mean 0 and
    std 1.  Group sums are formed in float64 by a fixed-order scan over the rollouts sorted by group (no
    float atomics: bitwise reproducible on every device) without a host sync.

    Args:
        rewards: ``[B]`` floating (or integer) rewards.
        group_ids: ``[B]`` integer id of the prompt each rollout answers.
    Returns:
        ``[B]`` float32 (float64 for float64 rewards).
    """
    check_tensor(rewards, "rewards", ndim=(1,))
    check_tensor(group_ids, "group_ids", ndim=(1,), integer=True)
    check_shape(group_ids, "group_ids", tuple(rewards.shape), "one group id per reward")
    check_same_device(rewards=rewards, group_ids=group_ids)
    acc = accumulation_dtype(rewards.dtype)
    if rewards.numel() == 0:
        return rewards.to(acc)
    order = torch.argsort(group_ids, stable=True)
    groups = group_ids[order][None]  # [1, B], non-decreasing: each group is one contiguous segment
    first = torch.searchsorted(groups, groups)[0]
    last = torch.searchsorted(groups, groups, right=True)[0] - 1
    count = (last - first + 1).to(torch.float64)
    r = rewards.detach()[order].to(torch.float64)

    def group_sum(x: torch.Tensor) -> torch.Tensor:  # each rollout gets the sum over its group
        return segmented_cumsum(x[None], groups)[0][last]

    mean = group_sum(r) / count
    std = torch.sqrt(group_sum((r - mean) ** 2) / (count - 1).clamp(min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    normalised = (r - mean) / (std + GRPO_STD_EPSILON)
    return normalised[torch.argsort(order)].to(acc)


def sod_advantages(grpo_advantages: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                   response_mask: torch.Tensor, coef: float = 1.0, epsilon: float = DEFAULT_EPSILON,
                   delta: float = DEFAULT_DELTA, *, check_inputs: bool = True) -> torch.Tensor:
    """Per-token SOD advantages: ``A = A_grpo * m + coef * w * (teacher_logprobs - student_logprobs) * m``.

    Args:
        grpo_advantages: ``[B]`` floating (from :func:`grpo_advantages`); for a single sequence (``[T]``
            log-probs) a 0-D tensor or ``[1]``.
        student_logprobs, teacher_logprobs: ``[B, T]`` (or ``[T]``) sampled-token log-probs (old policy, teacher).
        response_mask: ``[B, T]`` (or ``[T]``) 0/1.
    Returns:
        Same shape as ``response_mask``; float32 (float64 for float64 log-probs), 0 outside the mask.
    Raises:
        ValueError: NaN or Inf in a log-prob where ``response_mask`` is 1 (checked with ``check_inputs``);
        values outside the mask are never read.
    """
    check_tensor(grpo_advantages, "grpo_advantages", ndim=(0, 1), floating=True)
    check_finite_number(coef, "coef")
    student_logprobs = masked_finite(student_logprobs, response_mask, "student_logprobs", check=check_inputs)
    teacher_logprobs = masked_finite(teacher_logprobs, response_mask, "teacher_logprobs", check=check_inputs)
    weights = sod_step_weights(student_logprobs, teacher_logprobs, response_mask, epsilon, delta,
                               check_inputs=check_inputs)
    check_same_device(grpo_advantages=grpo_advantages, student_logprobs=student_logprobs)
    if weights.dim() == 2:
        check_shape(grpo_advantages, "grpo_advantages", (weights.shape[0],), "one per row of response_mask")
        per_row = grpo_advantages.detach()[:, None]
    else:
        if grpo_advantages.numel() != 1:
            raise ValueError(f"grpo_advantages must have shape () or (1,) (one value for the single sequence of "
                             f"{tuple(response_mask.shape)} log-probs), got {tuple(grpo_advantages.shape)}")
        per_row = grpo_advantages.detach().reshape(())
    acc = weights.dtype
    m = (response_mask != 0).to(acc)
    reward = (teacher_logprobs.detach().to(acc) - student_logprobs.detach().to(acc)) * m
    return per_row.to(acc) * m + coef * weights * reward
