"""From per-token divergences to a distillation loss, shared by every distillation loss (dense teacher, sparse
teacher, their vocabulary-parallel forms): the options and tensor checks they share, the chunk plan of a
single pass (which rows form a chunk and how its weights are known in-pass), and :func:`finish_loss` (step
weights, reduction, finiteness check, :class:`SODStats`).  All O(tokens): nothing here sees a logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.chunks import FAST_CHUNK_BYTES, chunk_rows, even_chunks
from ..core.validation import (BACKENDS, DIVERGENCES, MEMORY_MODES, REDUCTIONS, STEP_DIVERGENCES, check_chunk_size,
                               check_choice, check_finite_number, check_positive, check_shape, check_tensor,
                               resolve_divergence)
from .plan import InPassStepWeights, with_kernel_plan
from .weights import resolve_step_ids, step_weights_from_divergence, trim_steps


@dataclass
class SODStats:
    """What ``fused_sod_loss(..., return_stats=True)`` returns (all but ``loss`` detached).

    loss:            the loss, as without stats.
    token_divergence ``[B, T]`` D_t (0 outside steps), float32 (float64 for float64 inputs).
    token_weights    ``[B, T]`` weight of each token's step (0 outside steps).
    step_divergence  ``[B, K]`` d_k (K = most steps in a row; 0-padded).
    step_weights     ``[B, K]`` w_k (0-padded).
    num_steps        ``[B]`` int64.
    For ``[T, H]`` inputs the leading ``B`` dimension is dropped.
    """

    loss: torch.Tensor
    token_divergence: torch.Tensor
    token_weights: torch.Tensor
    step_divergence: torch.Tensor
    step_weights: torch.Tensor
    num_steps: torch.Tensor


def single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size, vocab, elem):
    """``(chunks, chunk_weights)`` for :class:`SinglePassKL`, or None when a step is longer than a chunk.
    ``chunk_weights`` is called per chunk, or read without a call: its ``kernel_plan``
    (:func:`~sod_kernels.steps.plan.with_kernel_plan`) by a backend that forms the weights inside its kernels (the
    plan's tensors are made here, once per call)."""
    n = row_index.numel()
    rows = chunk_rows(n, vocab, 8 + elem, budget=FAST_CHUNK_BYTES, chunk_size=chunk_size)
    if given is not None:
        w = given.reshape(-1)[row_index].to(torch.float32)
        return even_chunks(n, rows), with_kernel_plan(lambda a, b, D, signal: w[a:b], "given", given=w)
    if step_divergence == "none":
        return even_chunks(n, rows), with_kernel_plan(lambda a, b, D, signal: torch.ones_like(D), "none")
    steps = InPassStepWeights(step_rows, row_index, epsilon=epsilon, delta=delta)
    chunks = steps.chunks(rows, n)
    if chunks is None:
        return None
    return chunks, with_kernel_plan(lambda a, b, D, signal: steps.chunk_weights(a, b, signal), "steps", steps=steps)


def check_targets_and_steps(step_divergence, target_ids, lead, vocab, response_mask, step_ids, token_weights,
                            check_inputs):
    """The checks the dense and sparse losses share after the heads: sampled targets (needed by "sampled",
    in ``[0, vocab)``), the step ids (from ``step_ids`` or ``response_mask``) and ``token_weights``.
    Returns the resolved step ids (``lead`` shape, int64, -1 off the mask)."""
    if step_divergence == "sampled" and target_ids is None:
        raise ValueError("step_divergence='sampled' needs target_ids (the sampled tokens)")
    if target_ids is not None:
        check_tensor(target_ids, "target_ids", ndim=(len(lead),), integer=True)
        check_shape(target_ids, "target_ids", lead, "the leading shape of student_hidden")
        if check_inputs and target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab)).any()):
            raise ValueError(f"target_ids must lie in [0, {vocab}) (the student vocabulary)")
    ids = resolve_step_ids(response_mask, step_ids, lead, check_inputs=check_inputs)
    if token_weights is not None:
        check_token_weights(token_weights, lead, check_values=check_inputs)
    return ids


def check_loss_options(divergence, step_divergence, token_weights, reduction, backend, chunk_size, epsilon, delta,
                       temperature, coef):
    """The options every distillation loss shares; returns ``(step_divergence, epsilon, delta, temperature,
    coef)`` with the default step divergence resolved ("kl", or "none" with ``token_weights``)."""
    check_choice(divergence, "divergence", DIVERGENCES)
    if step_divergence is None:
        step_divergence = "kl" if token_weights is None else "none"
    check_choice(step_divergence, "step_divergence", STEP_DIVERGENCES)
    if token_weights is not None and step_divergence != "none":
        raise ValueError(f"token_weights replaces the step weights: it cannot be combined with "
                         f"step_divergence={step_divergence!r} (leave step_divergence unset or pass 'none')")
    check_choice(reduction, "reduction", REDUCTIONS)
    check_choice(backend, "backend", BACKENDS)
    check_chunk_size(chunk_size)
    return (step_divergence, check_positive(epsilon, "epsilon"), check_positive(delta, "delta", allow_zero=True),
            check_positive(temperature, "temperature"), check_finite_number(coef, "coef"))


def check_hard_loss(hard_loss_weight, target_ids) -> float:
    """``hard_loss_weight``: a finite number ``>= 0``; a positive one needs ``target_ids`` (the labels)."""
    weight = check_positive(hard_loss_weight, "hard_loss_weight", allow_zero=True)
    if weight and target_ids is None:
        raise ValueError("hard_loss_weight > 0 needs target_ids (the tokens whose cross-entropy is added)")
    return weight


def jsd_and_hard_options(divergence, beta, hard_loss_weight, target_ids) -> tuple[str, float, float]:
    """``(divergence, beta, hard_loss_weight)`` checked: ``"jsd"`` at ``beta`` 0 / 1 becomes the forward / reverse KL
    (:func:`~sod_kernels.core.validation.resolve_divergence`), ``beta`` in ``[0, 1]``, ``hard_loss_weight >= 0``
    (a positive one needs ``target_ids``)."""
    divergence, beta = resolve_divergence(divergence, beta)
    return divergence, beta, check_hard_loss(hard_loss_weight, target_ids)


def check_distillation_call(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef,
                            reduction, backend, memory, chunk_size, token_weights, target_ids):
    """The options of one call of a single-process distillation loss (dense or sparse teacher), checked:
    returns ``(divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef)``
    resolved as :func:`check_loss_options` and :func:`jsd_and_hard_options` do; ``memory`` one of
    :data:`~sod_kernels.core.validation.MEMORY_MODES`."""
    step_divergence, epsilon, delta, temperature, coef = check_loss_options(
        divergence, step_divergence, token_weights, reduction, backend, chunk_size, epsilon, delta, temperature,
        coef)
    divergence, beta, hard_loss_weight = jsd_and_hard_options(divergence, beta, hard_loss_weight, target_ids)
    check_choice(memory, "memory", MEMORY_MODES)
    return divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef


def finish_loss(loss, D, lp_s, lp_t, row_index, step_rows, given, *, single: bool, step_divergence: str,
                epsilon: float, delta: float, coef: float, reduction: str, return_stats: bool, check_inputs: bool,
                inputs: str, hard_loss_weight: float = 0.0):
    """Everything after the per-token divergences: step weights (when the loss still needs them or stats are
    asked for), the reduction, the finiteness check and :class:`SODStats`.

    ``loss`` is the single pass's loss or None; ``D``, ``lp_s``, ``lp_t`` are ``[Na]`` per distilled row
    (``row_index`` into the flattened ``step_rows [B, T]``); ``given`` the ``[B, T]`` token weights or None;
    ``inputs`` names the tensors blamed for a non-finite loss.  With ``hard_loss_weight`` (lambda > 0) and no
    single-pass ``loss``, ``lp_s`` must carry the student's gradient: each distilled token's loss gains
    ``lambda * (-lp_s)`` (unweighted, not times ``coef``).
    """
    B, T = step_rows.shape
    num_active = row_index.numel()
    acc = torch.float64 if D.dtype == torch.float64 else torch.float32
    token_divergence = torch.zeros(B * T, dtype=acc, device=D.device).index_copy(0, row_index, D.to(acc)).view(B, T)
    if step_divergence == "sampled":
        signal = torch.zeros(B * T, dtype=acc, device=D.device).index_copy(0, row_index, (lp_s - lp_t).abs().to(acc))
        signal = signal.view(B, T)
    else:
        signal = token_divergence
    if loss is None or return_stats:
        weights = step_weights_from_divergence(signal, step_rows, epsilon=epsilon, delta=delta,
                                               weighted=step_divergence != "none")
        if given is not None:
            weights = weights._replace(token_weights=given.to(acc).masked_fill(step_rows < 0, 0))
    if loss is None:
        per_token = coef * weights.token_weights * token_divergence
        if hard_loss_weight:
            nll = torch.zeros(B * T, dtype=acc, device=D.device).index_copy(0, row_index, -lp_s.to(acc))
            per_token = per_token + hard_loss_weight * nll.view(B, T)
        if reduction == "none":
            loss = per_token[0] if single else per_token
        elif reduction == "sum":
            loss = per_token.sum()
        else:
            loss = per_token.sum() / max(num_active, 1)
    if check_inputs and num_active and not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(f"the loss is not finite: {inputs} contain NaN or Inf (or the logits overflow)")
    if not return_stats:
        return loss
    w = trim_steps(weights)
    pick = (lambda x: x[0]) if single else (lambda x: x)
    return SODStats(loss=loss, token_divergence=pick(token_divergence.detach().clamp(min=0)),
                    token_weights=pick(w.token_weights), step_divergence=pick(w.step_divergence),
                    step_weights=pick(w.step_weights), num_steps=pick(w.num_steps))


def check_token_weights(token_weights, lead: tuple[int, ...], *, check_values: bool) -> None:
    """``token_weights``: floating, the leading shape of the hidden states, finite and ``>= 0``."""
    check_tensor(token_weights, "token_weights", ndim=(len(lead),), floating=True)
    check_shape(token_weights, "token_weights", lead, "the leading shape of student_hidden")
    if check_values and token_weights.numel():
        w = token_weights.detach()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("token_weights must be finite and >= 0")
