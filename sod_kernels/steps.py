"""Step segmentation and the SOD step weights (SPEC sections 2, 4 and 5), shared by every backend.

Everything here is O(tokens), vectorised (no Python loop over tokens, steps or rows) and free of host
synchronisation unless stated, so the Triton path, the chunked PyTorch path and the policy-gradient
helpers all call the same functions and cannot drift apart.

Shapes: ``B`` rows of ``T`` tokens; ``S`` = step capacity of the returned per-step tensors (on CPU the
largest step count; on accelerators ``T``, which bounds it without a host sync; or ``max_steps``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._validation import check_binary_mask, check_positive, check_shape, check_step_ids_values, check_tensor

DEFAULT_EPSILON = 1e-6
DEFAULT_DELTA = 0.2


def step_ids_from_mask(response_mask: torch.Tensor, *, check_inputs: bool = True) -> torch.Tensor:
    """Number the steps (maximal runs of ones) of each row of a 0/1 mask.

    Args:
        response_mask: ``[B, T]`` (or ``[T]``) bool / integer / floating tensor of 0s and 1s.
    Returns:
        ``[B, T]`` (same leading shape) int64: the 0-based step index of each distilled token, -1 elsewhere.
    """
    check_tensor(response_mask, "response_mask", ndim=(1, 2))
    check_binary_mask(response_mask, "response_mask", check_values=check_inputs)
    m = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    starts = m.clone()
    starts[..., 1:] &= ~m[..., :-1]  # a 1 whose left neighbour is 0 (or the row start) opens a step
    ids = torch.cumsum(starts, dim=-1, dtype=torch.int64).sub_(1)
    return ids.masked_fill_(~m, -1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Step statistics are computed in float32, or float64 when the signal is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class StepWeights(NamedTuple):
    """Result of :func:`step_weights_from_divergence`.

    token_weights:   ``[B, T]`` weight of the step holding each token; 0 outside steps.
    step_divergence: ``[B, S]`` d_k, the mean of the signal over step k; 0 past the row's last step.
    step_weights:    ``[B, S]`` w_k; 0 past the row's last step.
    num_steps:       ``[B]`` int64 number of steps K_b of each row.
    """

    token_weights: torch.Tensor
    step_divergence: torch.Tensor
    step_weights: torch.Tensor
    num_steps: torch.Tensor


def closed_form_weights(step_divergence: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """SPEC eq. 7 in closed form: ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)``, ``w_1 = 1``.

    ``step_divergence`` is ``[B, S]`` with step 1 in column 0; returns ``[B, S]`` of the same dtype.
    """
    first = step_divergence[..., :1]
    weights = torch.clamp((first + epsilon) / (step_divergence + epsilon), max=1.0 + delta)
    weights[..., :1] = 1.0
    return weights


def step_weights_from_divergence(token_signal: torch.Tensor, step_ids: torch.Tensor, *,
                                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                                 weighted: bool = True, max_steps: int | None = None) -> StepWeights:
    """Segment means of a per-token signal and the SOD step weights, without a host sync.

    Args:
        token_signal: ``[B, T]`` floating per-token divergence (D_t, or |log p_s(y) - log p_t(y)|); only
            entries with ``step_ids >= 0`` are read. Treated as a constant (detached).
        step_ids: ``[B, T]`` int, -1 outside steps, else the 0-based step index (see SPEC section 2).
        epsilon, delta: SPEC section 5.
        weighted: False gives every step weight 1 (``step_divergence="none"``, plain OPD); the step
            divergences are still reported.
        max_steps: capacity ``S`` of the per-step outputs. Default: on CPU the largest step count (reading
            it costs nothing there); on accelerators ``T``, so that no host sync is needed. Steps with an
            index ``>= max_steps`` must not occur.
    Returns:
        :class:`StepWeights`, float32 (float64 when ``token_signal`` is float64).
    """
    B, T = step_ids.shape
    device = step_ids.device
    acc = accumulation_dtype(token_signal.dtype)
    valid = step_ids >= 0
    num_steps = step_ids.amax(dim=1).add_(1).clamp_(min=0) if T > 0 else \
        torch.zeros(B, dtype=torch.int64, device=device)
    if max_steps is not None:
        S = max(int(max_steps), 1)
    elif device.type == "cpu":
        S = max(int(num_steps.max()), 1) if B > 0 else 1  # reading a CPU value costs no device sync
    else:
        S = max(T, 1)  # capacity bound: no host sync on accelerators
    index = step_ids.clamp(min=0)
    signal = token_signal.detach().to(acc).masked_fill(~valid, 0)
    sums = torch.zeros(B, S, dtype=acc, device=device).scatter_add_(1, index, signal)
    counts = torch.zeros(B, S, dtype=acc, device=device).scatter_add_(1, index, valid.to(acc))
    exists = torch.arange(S, device=device) < num_steps[:, None]
    step_divergence = (sums / counts.clamp_(min=1)).masked_fill_(~exists, 0)
    if weighted:
        step_weights = closed_form_weights(step_divergence, epsilon, delta)
    else:
        step_weights = torch.ones_like(step_divergence)
    step_weights.masked_fill_(~exists, 0)
    token_weights = step_weights.gather(1, index).masked_fill_(~valid, 0)
    return StepWeights(token_weights, step_divergence, step_weights, num_steps)


def trim_steps(weights: StepWeights) -> StepWeights:
    """Cut the per-step tensors to ``K = max(num_steps)`` columns (one host sync); for stats and logs."""
    K = int(weights.num_steps.max()) if weights.num_steps.numel() else 0
    return weights._replace(step_divergence=weights.step_divergence[:, :K].contiguous(),
                            step_weights=weights.step_weights[:, :K].contiguous())


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def sod_step_weights(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor,
                     epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, *,
                     check_inputs: bool = True) -> torch.Tensor:
    """Per-token SOD weights from sampled-token log-probs, as the paper's authors compute them.

    ``d_k`` = mean over step k of ``|student_logprobs - teacher_logprobs|``; ``w_k`` per SPEC eq. 7.

    Args:
        student_logprobs, teacher_logprobs: ``[B, T]`` floating (detached; the old policy's and the
            teacher's log-probs of the sampled tokens).
        response_mask: ``[B, T]`` 0/1.
    Returns:
        ``[B, T]`` float32 (float64 for float64 inputs): the weight of each token's step, 0 outside steps.
    """
    weights = sod_step_statistics(student_logprobs, teacher_logprobs, response_mask, epsilon, delta,
                                  check_inputs=check_inputs)
    return weights.token_weights.reshape(response_mask.shape)


def sod_step_statistics(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
                        response_mask: torch.Tensor, epsilon: float = DEFAULT_EPSILON,
                        delta: float = DEFAULT_DELTA, *, check_inputs: bool = True) -> StepWeights:
    """Like :func:`sod_step_weights` but returns the full :class:`StepWeights` (rows of ``[B, T]``)."""
    check_tensor(student_logprobs, "student_logprobs", ndim=(1, 2), floating=True)
    check_tensor(teacher_logprobs, "teacher_logprobs", ndim=(1, 2), floating=True)
    check_tensor(response_mask, "response_mask", ndim=(1, 2))
    check_shape(teacher_logprobs, "teacher_logprobs", tuple(student_logprobs.shape), "same as student_logprobs")
    check_shape(response_mask, "response_mask", tuple(student_logprobs.shape), "same as student_logprobs")
    if teacher_logprobs.device != student_logprobs.device or response_mask.device != student_logprobs.device:
        raise ValueError("student_logprobs, teacher_logprobs and response_mask must be on the same device")
    check_positive(epsilon, "epsilon")
    check_positive(delta, "delta", allow_zero=True)
    step_ids = step_ids_from_mask(_as_rows(response_mask), check_inputs=check_inputs)
    signal = (_as_rows(student_logprobs).detach() - _as_rows(teacher_logprobs).detach()).abs()
    return step_weights_from_divergence(signal, step_ids, epsilon=epsilon, delta=delta)


def resolve_step_ids(response_mask: torch.Tensor | None, step_ids: torch.Tensor | None, shape: tuple[int, ...],
                     *, check_inputs: bool = True) -> torch.Tensor:
    """Exactly one of ``response_mask`` / ``step_ids`` (each of leading shape ``shape``) -> step ids."""
    if (response_mask is None) == (step_ids is None):
        raise ValueError("give exactly one of response_mask and step_ids")
    if response_mask is not None:
        check_tensor(response_mask, "response_mask", ndim=(len(shape),))
        check_shape(response_mask, "response_mask", shape, "the leading shape of student_hidden")
        return step_ids_from_mask(response_mask, check_inputs=check_inputs)
    check_tensor(step_ids, "step_ids", ndim=(len(shape),), integer=True)
    check_shape(step_ids, "step_ids", shape, "the leading shape of student_hidden")
    if check_inputs:
        check_step_ids_values(_as_rows(step_ids), "step_ids")
    return step_ids.to(torch.int64)
