"""Step segmentation and the SOD step weights (docs/math.md), shared by every backend.

Everything here is O(tokens), vectorised (no Python loop over tokens, steps or rows) and free of host
synchronisation unless stated, so the Triton path, the chunked PyTorch path and the policy-gradient
helpers all call the same functions and cannot drift apart.

Shapes: ``B`` rows of ``T`` tokens; ``S`` = step capacity of the returned per-step tensors (on CPU the
largest step count; on accelerators ``T``, which bounds it without a host sync; or ``max_steps``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .segments import segmented_cumsum
from ..core.validation import (check_binary_mask, check_positive, check_same_device, check_shape, check_step_ids_values,
                               check_tensor)

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
    """Dtype of the returned step statistics: float32, or float64 when the signal is float64.

    Internally the step sums and the weight ratio are always formed in float64 (O(steps) work)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class StepWeights(NamedTuple):
    """Result of :func:`step_weights_from_divergence`.

    token_weights:   ``[B, T]`` weight of the step holding each token; 0 outside steps.
    step_divergence: ``[B, S]`` d_k, the mean of the (clamped at 0) signal over step k; 0 past the row's last step.
    step_weights:    ``[B, S]`` w_k; 0 past the row's last step.
    num_steps:       ``[B]`` int64 number of steps K_b of each row.
    step_tokens:     ``[B, S]`` int64 number of tokens in step k; 0 past the row's last step.
    """

    token_weights: torch.Tensor
    step_divergence: torch.Tensor
    step_weights: torch.Tensor
    num_steps: torch.Tensor
    step_tokens: torch.Tensor


def closed_form_weights(step_divergence: torch.Tensor, epsilon: float, delta: float, *,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """docs/math.md in closed form: ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)``, ``w_1 = 1``.

    ``step_divergence`` is ``[B, S]`` floating with step 1 in column 0; returns ``[B, S]`` of ``dtype``
    (default: the dtype of ``step_divergence``).
    ``d`` is clamped at 0 (rounding can leave a true 0 slightly negative) and the ratio is formed in float64,
    where ``d + eps > 0`` holds for every ``eps > 0`` down to the smallest float64 subnormal, so for finite
    ``d`` every weight is finite and in ``(0, 1 + delta]`` (``1 + delta`` rounded to the output dtype).
    A weight below the output dtype's smallest normal number (``eps`` far below ``d_k``) is raised to that
    number instead of underflowing to 0.
    """
    dtype = step_divergence.dtype if dtype is None else dtype
    d = step_divergence.to(torch.float64).clamp(min=0)
    ratio = (d[..., :1] + epsilon) / (d + epsilon)
    weights = ratio.clamp(min=torch.finfo(dtype).tiny, max=1.0 + delta)
    weights[..., :1] = 1.0
    return weights.to(dtype)


def step_weights_from_divergence(token_signal: torch.Tensor, step_ids: torch.Tensor, *,
                                 epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                                 weighted: bool = True, max_steps: int | None = None) -> StepWeights:
    """Segment means of a per-token signal and the SOD step weights, without a host sync.

    The signal is clamped at 0 per token (docs/math.md: a divergence used as a signal is ``max(D, 0)``),
    the step sums are formed in float64 by a fixed-order segmented scan (bitwise reproducible on every
    device, no float atomics; see :mod:`sod_kernels.steps.segments`), and the weights by
    :func:`closed_form_weights`.  O(B T) vectorised work.

    Args:
        token_signal: ``[B, T]`` floating per-token divergence (D_t, or |log p_s(y) - log p_t(y)|); only
            entries with ``step_ids >= 0`` are read. Treated as a constant (detached).
        step_ids: ``[B, T]`` signed integer, -1 outside steps, else the 0-based step index (see docs/math.md
            section 2; values are not checked here, see :func:`resolve_step_ids`).
        epsilon: ``> 0``; delta: ``>= 0`` (docs/math.md).
        weighted: False gives every step weight 1 (``step_divergence="none"``, plain OPD); the step
            divergences are still reported.
        max_steps: capacity ``S`` of the per-step outputs. Default: on CPU the largest step count (reading
            it costs nothing there); on accelerators ``T``, so that no host sync is needed. Steps with an
            index ``>= max_steps`` must not occur.
    Returns:
        :class:`StepWeights`, float32 (float64 when ``token_signal`` is float64).  For finite signals every
        weight of a step is finite and in ``(0, 1 + delta]``.
    """
    check_tensor(token_signal, "token_signal", ndim=(2,), floating=True)
    check_tensor(step_ids, "step_ids", ndim=(2,), integer=True, signed=True)
    check_shape(token_signal, "token_signal", tuple(step_ids.shape), "same as step_ids")
    check_same_device(token_signal=token_signal, step_ids=step_ids)
    epsilon = check_positive(epsilon, "epsilon")
    delta = check_positive(delta, "delta", allow_zero=True)
    B, T = step_ids.shape
    device = step_ids.device
    out = accumulation_dtype(token_signal.dtype)
    ids = step_ids.to(torch.int64)
    valid = ids >= 0
    num_steps = ids.amax(dim=1).add_(1).clamp_(min=0) if T > 0 else torch.zeros(B, dtype=torch.int64, device=device)
    if max_steps is not None:
        S = max(int(max_steps), 1)
    elif device.type == "cpu":
        S = max(int(num_steps.max()), 1) if B > 0 else 1  # reading a CPU value costs no device sync
    else:
        S = max(T, 1)  # capacity bound: no host sync on accelerators
    exists = torch.arange(S, device=device) < num_steps[:, None]
    if T == 0:
        zeros = torch.zeros(B, S, dtype=out, device=device)
        return StepWeights(torch.zeros(B, T, dtype=out, device=device), zeros, zeros.clone(), num_steps,
                           torch.zeros(B, S, dtype=torch.int64, device=device))
    # owner[b, t]: the step that t belongs to or follows (-1 before the first step); non-decreasing, so the
    # positions of one owner are contiguous.  Entries outside steps add 0.
    owner = torch.cummax(ids, dim=1).values
    signal = token_signal.detach().to(torch.float64).clamp(min=0).masked_fill(~valid, 0)
    # Positions and tokens per owner (column 0: before the first step).  Integer sums are exact, so their
    # order of accumulation cannot matter.
    column = (owner + 1).clamp_(max=S)
    span = torch.zeros(B, S + 1, dtype=torch.int64, device=device).scatter_add_(1, column, torch.ones_like(column))
    step_tokens = torch.zeros(B, S + 1, dtype=torch.int64, device=device).scatter_add_(1, column, valid.long())
    step_tokens = step_tokens[:, 1:].masked_fill_(~exists, 0)
    last = span.cumsum(dim=1)[:, 1:].sub_(1).clamp_(0, T - 1)  # last position owned by step k
    sums = segmented_cumsum(signal, owner).gather(1, last)
    present = exists & (step_tokens > 0)
    means = torch.where(present, sums / step_tokens.clamp(min=1), torch.zeros((), dtype=torch.float64, device=device))
    step_divergence = means.to(out)
    if weighted:
        step_weights = closed_form_weights(means, epsilon, delta, dtype=out)
    else:
        step_weights = torch.ones(B, S, dtype=out, device=device)
    step_weights.masked_fill_(~exists, 0)
    token_weights = step_weights.gather(1, ids.clamp(min=0)).masked_fill_(~valid, 0)
    return StepWeights(token_weights, step_divergence, step_weights, num_steps, step_tokens)


def trim_steps(weights: StepWeights) -> StepWeights:
    """Cut the per-step tensors to ``K = max(num_steps)`` columns (one host sync); for stats and logs."""
    K = int(weights.num_steps.max()) if weights.num_steps.numel() else 0
    return weights._replace(step_divergence=weights.step_divergence[:, :K].contiguous(),
                            step_weights=weights.step_weights[:, :K].contiguous(),
                            step_tokens=weights.step_tokens[:, :K].contiguous())


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 1 else x


def sod_step_weights(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor,
                     epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, *,
                     check_inputs: bool = True) -> torch.Tensor:
    """Per-token SOD weights from sampled-token log-probs, as the paper's authors compute them.

    ``d_k`` = mean over step k of ``|student_logprobs - teacher_logprobs|``; ``w_k`` per docs/math.md.

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
    check_same_device(student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs,
                      response_mask=response_mask)
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
    check_tensor(step_ids, "step_ids", ndim=(len(shape),), integer=True, signed=True)
    check_shape(step_ids, "step_ids", shape, "the leading shape of student_hidden")
    if check_inputs:
        check_step_ids_values(_as_rows(step_ids), "step_ids")
    return step_ids.to(torch.int64)
