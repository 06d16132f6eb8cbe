"""``fused_sod_policy_loss``: the policy-gradient form of SOD that the authors' trainer optimizes (docs/math.md).

PPO's clipped surrogate with dual clip on per-token advantages (typically from
:func:`sod_kernels.sod_policy_inputs`), with the new policy's log-probs of the sampled tokens computed by
:func:`sod_kernels.fused_token_logprobs` for the masked-in tokens only (a row index, as in
``fused_sod_loss``), so neither the ``tokens x vocabulary`` logits nor the log-probs of prompt / tool /
padding tokens are ever computed.  Everything after the log-probs is O(tokens) PyTorch; autograd hands the
log-prob backend ``dL/dlogp`` per token, folded into its recomputed logit tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.validation import (MEMORY_MODES, REDUCTIONS, check_binary_mask, check_choice, check_chunk_size,
                               check_lm_head, check_positive, check_same_device, check_shape, check_tensor)
from ..core.options import PassOptions, input_grads
from ..core.runtime import check_softcap, needs_student_grad, no_autocast, single_pass_gradients
from ..core.finite import check_finite
from . import cpu_backend
from .token_logprobs import TokenLogprobs, check_target_ids, resolve_logprob_backend

LOG_RATIO_CLAMP = 20.0  # docs/math.md: ratio = exp(clamp(logp_new - old_logp, -20, 20))


@dataclass
class PolicyLossStats:
    """What ``fused_sod_policy_loss(..., return_stats=True)`` returns (all but ``loss`` detached).

    Fractions and means are over the masked-in tokens (0 for an empty mask); 0-D float32 tensors
    (float64 for float64 inputs).

    loss:            the loss, as without stats.
    clip_frac_low:   share of tokens with ``A < 0`` and ``ratio < 1 - clip_low`` (lower clip active).
    clip_frac_high:  share of tokens with ``A > 0`` and ``ratio > 1 + clip_high`` (upper clip active).
    clip_frac_dual:  share of tokens with ``A < 0`` where the dual clip ``-c A`` bounds the loss.
    mean_ratio:      mean of ``ratio = exp(clamp(logp_new - old_logp, -20, 20))``.
    approx_kl:       ``KL(pi_old || pi_new)`` estimated as the mean of ``(ratio - 1) - log ratio`` (Schulman's
                     "k3" estimator; unbiased and >= 0 for tokens sampled from the old policy).
    logprobs:        ``[B, T]`` (or ``[T]``) new log-probs of the sampled tokens, 0 outside the mask.
    """

    loss: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    clip_frac_dual: torch.Tensor
    mean_ratio: torch.Tensor
    approx_kl: torch.Tensor
    logprobs: torch.Tensor


def check_policy_tensors(student_hidden, student_weight, student_bias, target_ids, old_logprobs, advantages,
                         response_mask, *, check_inputs: bool) -> tuple[int, ...]:
    """Types, shapes and devices of a policy loss's tensors (``student_weight`` may be a vocabulary shard);
    returns the leading shape.  Target values are checked by the caller on the masked-in tokens only (padding
    may hold ids such as -100)."""
    check_lm_head(student_hidden, student_weight, student_bias, hidden_name="student_hidden",
                  weight_name="student_weight", bias_name="student_bias")
    lead = tuple(student_hidden.shape[:-1])
    check_target_ids(target_ids, lead, 1, check_values=False, hidden_name="student_hidden")
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages)):
        check_tensor(x, name, ndim=(len(lead),), floating=True)
        check_shape(x, name, lead, "the leading shape of student_hidden")
    check_tensor(response_mask, "response_mask", ndim=(len(lead),))
    check_shape(response_mask, "response_mask", lead, "the leading shape of student_hidden")
    check_binary_mask(response_mask, "response_mask", check_values=check_inputs)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, target_ids=target_ids,
                      old_logprobs=old_logprobs, advantages=advantages, response_mask=response_mask,
                      student_bias=student_bias)
    return lead


def ppo_dual_clip(logp_new: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                  clip_high: float, dual_clip: float | None):
    """Per-token PPO dual-clip loss (docs/math.md) and its branch masks; all tensors ``[Na]``.

    Returns ``(loss, ratio, log_ratio, low, high, dual)``: ``low`` / ``high`` / ``dual`` are bool masks of
    the tokens whose loss the lower clip, the upper clip or the dual clip decided.
    """
    log_ratio = torch.clamp(logp_new - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    low = negative & (clipped > unclipped)
    high = (advantages > 0) & (clipped > unclipped)
    if dual_clip is None:
        dual = torch.zeros_like(negative)
    else:
        bound = -dual_clip * advantages
        dual = negative & (loss > bound)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    return loss, ratio, log_ratio, low, high, dual


def ppo_dual_clip_grad(logp_new: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                       clip_high: float, dual_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, dloss/dlogp_new)`` per token (``[Na]``, the inputs' dtype) in closed form, without autograd.

    The loss is :func:`ppo_dual_clip`'s; the derivative is what torch autograd returns for it, subgradients
    included, bitwise: ``maximum`` / ``minimum`` send half the gradient to each side at a tie (inside the clip
    range the two branches are equal, each gets half), ``clamp`` passes it on its closed interval.  So
    ``d = [|logp - old| <= 20 clamp] (k_u (-A) + [lo <= ratio <= hi] k_c (-A)) ratio`` with
    ``k_u = g w_u``, ``k_c = g w_c``, ``w`` in ``{0, 1/2, 1}`` from the ``max`` and ``g`` in ``{0, 1/2, 1}``
    from the dual ``min`` (1 where ``A >= 0`` or without it), each product formed in autograd's order.  The
    Triton kernel's ``ppo_dual_clip_terms`` is the same expression.  O(Na) elementwise operations.
    """
    d = logp_new - old_logp
    log_ratio = torch.clamp(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    in_clamp = (d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    neg_a = -advantages
    u = neg_a * ratio
    c = neg_a * torch.clamp(ratio, lo, hi)
    loss = torch.maximum(u, c)
    one, half, zero = (torch.tensor(v, dtype=loss.dtype, device=loss.device) for v in (1.0, 0.5, 0.0))
    w_u = torch.where(u > c, one, torch.where(u == c, half, zero))
    w_c = torch.where(c > u, one, torch.where(u == c, half, zero))
    if dual_clip is None:
        g = one
    else:
        negative = advantages < 0
        bound = -dual_clip * advantages
        g = torch.where(negative, torch.where(loss < bound, one, torch.where(loss == bound, half, zero)), one)
        loss = torch.where(negative, torch.minimum(loss, bound), loss)
    in_clip = (ratio >= lo) & (ratio <= hi)
    grad_ratio = (g * w_u) * neg_a + torch.where(in_clip, (g * w_c) * neg_a, zero)
    return loss, torch.where(in_clamp, grad_ratio * ratio, zero)


class SinglePassPolicyLoss(torch.autograd.Function):
    """The PPO dual-clip loss and its student gradients in one pass (Triton backend or CPU tensors, scalar
    reductions).

    The loss is a per-token function of ``logp_new``; its derivative is known in closed form
    (:func:`ppo_dual_clip_grad`, equal to autograd of :func:`ppo_dual_clip`, the expression the two-pass
    path differentiates) and folded into ``d(logits)`` right after the chunk's log-sum-exp: on the Triton
    backend inside one small kernel per chunk
    (:func:`sod_kernels.logprobs.triton_backend.single_pass_policy_loss`: 6 or 7 launches per chunk, no
    host synchronisation in its loop), on the CPU per chunk in PyTorch.  Inputs: hidden ``[N, H]``, weight,
    bias, row_index ``[Na]``, target_ids ``[N]``, temperature, old log-probs and advantages ``[Na]``,
    ``(clip_low, clip_high, dual_clip)``, the divisor of the sum (``Na`` for a token mean, 1 for a sum), and
    :class:`~sod_kernels.core.options.PassOptions` (backend, temperature, chunk_size, ``student_softcap``): the
    Triton backend's routine, or for CPU tensors on the torch backend
    :func:`sod_kernels.logprobs.cpu_backend.single_pass_token_loss` with the closed form as its ``token_loss``.
    Outputs: the loss (0-D float32, float64 for float64 inputs on CPU; differentiable) and ``logp [Na]`` (not
    differentiable).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_index, target_ids, old, adv, clip, divisor, options: PassOptions):
        need = ctx.needs_input_grad
        if options.backend == "torch":
            def token_loss(start, stop, logp):
                per, grad = ppo_dual_clip_grad(logp, old[start:stop], adv[start:stop], *clip)
                return per.sum(), grad / divisor

            total, logp, grads = cpu_backend.single_pass_token_loss(
                hidden, weight, bias, row_index, target_ids, temperature=options.temperature, token_loss=token_loss,
                need_hidden=need[0], need_weight=need[1], need_bias=need[2], chunk_size=options.chunk_size,
                softcap=options.student_softcap)
        else:
            from .triton_backend import single_pass_policy_loss
            total, logp, grads = single_pass_policy_loss(
                hidden, weight, bias, row_index, target_ids, old, adv, clip, divisor,
                temperature=options.temperature, need_hidden=need[0], need_weight=need[1], need_bias=need[2],
                chunk_size=options.chunk_size, softcap=options.student_softcap)
        ctx.grads = grads
        ctx.mark_non_differentiable(logp)
        return (total / divisor).to(logp.dtype), logp  # float64 inputs on CPU: a float64 loss

    @staticmethod
    def backward(ctx, grad_loss, unused):
        return input_grads(ctx, single_pass_gradients(ctx, grad_loss, "fused_sod_policy_loss",
                                                      "pass memory='low' or reduction='none' for a recomputing "
                                                      "backward"))


def finish_policy_loss(logp, old, adv, clip, row_index, lead, *, reduction: str, return_stats: bool,
                       check_inputs: bool, loss=None):
    """The PPO dual-clip loss of the distilled rows from their new log-probs, reduced, with its statistics.

    ``logp``, ``old``, ``adv``: ``[Na]`` (float32 / float64) of the rows ``row_index [Na]`` of the flattened
    ``lead`` shape; ``clip = (clip_low, clip_high, dual_clip)``.  ``loss``: the already reduced loss when a
    single pass formed it (with its gradient), else None.  Returns the loss or :class:`PolicyLossStats`.
    """
    n_flat = math.prod(lead)
    normalizer = max(row_index.numel(), 1)
    # the per-token terms again (O(Na) elementwise operations) only where something reads them: a single pass
    # without statistics has its loss already, and its finiteness is that of the loss
    terms = None if (loss is not None and not return_stats) else ppo_dual_clip(logp, old, adv, *clip)
    if loss is None:
        per_row, acc = terms[0], terms[0].dtype
        if reduction == "none":
            loss = torch.zeros(n_flat, dtype=acc, device=logp.device).index_copy(0, row_index, per_row).view(lead)
        elif reduction == "sum":
            loss = per_row.sum()
        else:
            loss = per_row.sum() / normalizer
    if check_inputs:  # read only at the response tokens (the rows given)
        check_finite(old, "old_logprobs", where="where response_mask is 1")
        check_finite(adv, "advantages", where="where response_mask is 1")
    if check_inputs and row_index.numel() and \
            not bool(torch.isfinite((loss if terms is None else terms[0]).detach()).all()):
        raise ValueError("the policy loss is not finite: student_hidden, student_weight / student_bias, "
                         "old_logprobs or advantages contain NaN or Inf (or the logits overflow)")
    if not return_stats:
        return loss
    per_row, ratio, log_ratio, low, high, dual = terms
    acc = per_row.dtype
    with torch.no_grad():
        share = lambda flags: flags.to(acc).sum() / normalizer  # noqa: E731
        logprobs = torch.zeros(n_flat, dtype=acc, device=logp.device).index_copy(0, row_index,
                                                                                  logp.detach().to(acc))
        return PolicyLossStats(loss=loss, clip_frac_low=share(low), clip_frac_high=share(high),
                               clip_frac_dual=share(dual), mean_ratio=ratio.sum() / normalizer,
                               approx_kl=((ratio - 1.0) - log_ratio).sum() / normalizer,
                               logprobs=logprobs.view(lead))


def check_policy_options(reduction, clip_low, clip_high, dual_clip, temperature):
    """The PPO dual-clip options every policy loss shares -> ``(clip_low, clip_high, dual_clip, temperature)``
    as floats, with clear errors naming the argument."""
    check_choice(reduction, "reduction", REDUCTIONS)
    clip_low = check_positive(clip_low, "clip_low", allow_zero=True)
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), got {clip_low}")
    clip_high = check_positive(clip_high, "clip_high", allow_zero=True)
    if dual_clip is not None:
        dual_clip = check_positive(dual_clip, "dual_clip")
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (or None to disable the dual clip), got {dual_clip}")
    return clip_low, clip_high, dual_clip, check_positive(temperature, "temperature")


def fused_sod_policy_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, target_ids: torch.Tensor,
                          old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, *,
                          clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
                          temperature: float = 1.0, student_bias: torch.Tensor | None = None,
                          reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                          chunk_size: int | None = None, check_inputs: bool = True,
                          student_softcap: float | None = None, memory: str = "fast"):
    """PPO dual-clip policy loss on SOD advantages, from hidden states (docs/math.md).

    ``ratio = exp(clamp(logp_new - old_logprobs, -20, 20))``,
    ``l = max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))``, and where ``A < 0``
    ``l = min(l, -dual_clip A)``; ``L = sum(m l) / max(sum m, 1)`` for ``reduction="token_mean"``.

    Args:
        student_hidden: ``[B, T, H]`` or ``[T, H]`` (float32 / bfloat16 / float16; float64 on the torch
            backend); receives a gradient.
        student_weight: ``[V, H]`` lm_head weight, same dtype; receives a gradient.
        target_ids: ``[B, T]`` sampled tokens, in ``[0, V)`` wherever ``response_mask`` is 1 (other
            positions are never read, so padding ids such as -100 are fine).
        old_logprobs: ``[B, T]`` floating, log-probs of the sampled tokens at rollout time (detached).
        advantages: ``[B, T]`` floating per-token advantages (detached), e.g. ``sod_policy_inputs(...).advantages``.
        response_mask: ``[B, T]`` 0/1, 1 on tokens the student generated.
        clip_low, clip_high: ``>= 0`` (``clip_low < 1``); dual_clip: ``> 1``, or None for no dual clip.
        temperature: ``> 0``; the student logits are divided by it (use the sampling temperature).
        student_bias: optional ``[V]``.
        reduction: ``"token_mean"`` (default), ``"sum"``, or ``"none"`` (per-token ``[B, T]``, 0 off the mask).
        return_stats: return :class:`PolicyLossStats` (a few host-free reductions) instead of the loss.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch on CPU), ``"triton"`` or ``"torch"``.  On the Triton
            backend a scalar reduction runs in one pass (the gradient is formed right after each chunk's
            log-sum-exp); ``reduction="none"`` or ``memory="low"`` recomputes the logits in backward.
        chunk_size: rows per chunk (default: from a memory budget and the vocabulary size).
        check_inputs: validate mask and target values and the loss's finiteness (host syncs).
        student_softcap: logit soft-capping (Gemma 2/3 ``final_logit_softcapping``): the logits are
            ``cap * tanh((hidden @ weight.T + bias) / cap)`` before the temperature; None (default) for none,
            else a finite number > 0.  Applied inside the kernels, gradient included.
        memory: ``"fast"`` (default) or ``"low"`` (Triton: two passes over row chunks sized from a small memory
            budget; the torch backend runs the same chunks in both modes).
    Returns:
        The loss (float32, or float64 for float64 hidden states), or :class:`PolicyLossStats`.
    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` only.  An empty mask gives a
    loss of exactly 0 and zero gradients.
    """
    clip_low, clip_high, dual_clip, temperature = check_policy_options(reduction, clip_low, clip_high, dual_clip,
                                                                       temperature)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    check_chunk_size(chunk_size)
    check_choice(memory, "memory", MEMORY_MODES)
    lead = check_policy_tensors(student_hidden, student_weight, student_bias, target_ids, old_logprobs, advantages,
                                response_mask, check_inputs=check_inputs)
    impl = resolve_logprob_backend(backend, student_hidden, "student_hidden")

    flat_mask = response_mask.reshape(-1) != 0
    row_index = torch.nonzero(flat_mask).squeeze(1)
    num_active = row_index.numel()  # one host sync: it sizes the log-prob kernels' work
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    y = target_ids.reshape(-1).to(torch.int64).contiguous()
    if check_inputs and num_active:
        used = y[row_index]
        if bool(((used < 0) | (used >= student_weight.shape[0])).any()):
            raise ValueError(f"target_ids must lie in [0, {student_weight.shape[0]}) (the vocabulary of "
                             "student_weight) wherever response_mask is 1")
    weight = student_weight.contiguous()
    bias = None if student_bias is None else student_bias.contiguous()
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    old = old_logprobs.detach().reshape(-1)[row_index].to(acc)
    adv = advantages.detach().reshape(-1)[row_index].to(acc)
    normalizer = max(num_active, 1)
    clip = (clip_low, clip_high, dual_clip)
    options = PassOptions(backend=impl, memory=memory, chunk_size=chunk_size, temperature=temperature,
                          student_softcap=student_softcap)
    loss = None
    with no_autocast(student_hidden.device):
        if (impl == "triton" or (impl == "torch" and cpu_backend.enabled(hidden))) and \
                memory == "fast" and reduction != "none" and num_active and \
                needs_student_grad(hidden, weight, bias):
            divisor = float(normalizer) if reduction == "token_mean" else 1.0
            loss, logp = SinglePassPolicyLoss.apply(hidden, weight, bias, row_index, y, old, adv, clip, divisor,
                                                    options)
        else:
            logp, _ = TokenLogprobs.apply(hidden, weight, bias, row_index, y, options)
    return finish_policy_loss(logp, old, adv, clip, row_index, lead, reduction=reduction, return_stats=return_stats,
                              check_inputs=check_inputs, loss=loss)
