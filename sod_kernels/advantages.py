"""GRPO and SOD advantages (SPEC section 7), vectorised over the batch."""

from __future__ import annotations

import torch

from ._validation import check_finite_number, check_shape, check_tensor
from .steps import DEFAULT_DELTA, DEFAULT_EPSILON, accumulation_dtype, sod_step_weights

GRPO_STD_EPSILON = 1e-6


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Group-normalised rewards: ``(R_b - mean_group R) / (std_group R + 1e-6)``.

    The std uses Bessel's correction (as ``torch.std``); a group of a single rollout uses mean 0 and
    std 1.

    Args:
        rewards: ``[B]`` floating (or integer) rewards.
        group_ids: ``[B]`` integer id of the prompt each rollout answers.
    Returns:
        ``[B]`` float32 (float64 for float64 rewards).
    """
    check_tensor(rewards, "rewards", ndim=(1,))
    check_tensor(group_ids, "group_ids", ndim=(1,), integer=True)
    check_shape(group_ids, "group_ids", tuple(rewards.shape), "one group id per reward")
    if group_ids.device != rewards.device:
        raise ValueError(f"rewards and group_ids must be on the same device, got {rewards.device} and {group_ids.device}")
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc)
    if r.numel() == 0:
        return r
    _, group = torch.unique(group_ids, return_inverse=True)
    G = int(group.max()) + 1
    count = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, group, r) / count
    squares = torch.zeros(G, dtype=acc, device=r.device).index_add_(0, group, (r - mean[group]) ** 2)
    std = torch.sqrt(squares / (count - 1).clamp(min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return (r - mean[group]) / (std[group] + GRPO_STD_EPSILON)


def sod_advantages(grpo_advantages: torch.Tensor, student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                   response_mask: torch.Tensor, coef: float = 1.0, epsilon: float = DEFAULT_EPSILON,
                   delta: float = DEFAULT_DELTA, *, check_inputs: bool = True) -> torch.Tensor:
    """Per-token SOD advantages: ``A = A_grpo * m + coef * w * (teacher_logprobs - student_logprobs) * m``.

    Args:
        grpo_advantages: ``[B]`` (from :func:`grpo_advantages`).
        student_logprobs, teacher_logprobs: ``[B, T]`` sampled-token log-probs (old policy, teacher).
        response_mask: ``[B, T]`` 0/1.
    Returns:
        ``[B, T]`` float32 (float64 for float64 log-probs), 0 outside the mask.
    """
    check_tensor(grpo_advantages, "grpo_advantages", ndim=(1,), floating=True)
    check_finite_number(coef, "coef")
    weights = sod_step_weights(student_logprobs, teacher_logprobs, response_mask, epsilon, delta,
                               check_inputs=check_inputs)
    if weights.dim() != 2 or grpo_advantages.shape[0] != weights.shape[0]:
        raise ValueError(f"grpo_advantages must have shape ({weights.shape[0]},) (one per row of response_mask), "
                         f"got {tuple(grpo_advantages.shape)}")
    acc = weights.dtype
    m = (response_mask != 0).to(acc)
    reward = (teacher_logprobs.detach().to(acc) - student_logprobs.detach().to(acc)) * m
    return grpo_advantages.detach().to(acc)[:, None] * m + coef * weights * reward
