"""``fused_sod_loss``: the step-weighted on-policy distillation loss (docs/math.md).

Pipeline (all backends): find the distilled rows (one host sync, to size the work), compute the
per-token divergence ``D`` for those rows only with the chosen backend (never materializing
tokens x vocabulary), derive the step divergences and weights with the shared O(tokens) helpers in
:mod:`sod_kernels.steps`, and reduce ``coef * w * D``.  The gradient reaches the backend as ``dL/dD`` per
row, which it folds into recomputed logit tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import (BACKENDS, DIVERGENCES, MEMORY_MODES, REDUCTIONS, STEP_DIVERGENCES, check_choice,
                          check_chunk_size, check_finite_number, check_lm_head, check_positive, check_same_device,
                          check_shape, check_tensor)
from .steps import DEFAULT_DELTA, DEFAULT_EPSILON, resolve_step_ids, step_weights_from_divergence, trim_steps
from .chunked_core import FAST_CHUNK_BYTES, chunk_rows, even_chunks
from .chunked_torch import compute_dtype
from .step_plan import InPassStepWeights
from .cpu_single_pass import CPUSinglePassKL, uses_cpu_single_pass  # [cpu-single-pass hook]
from .cpu_single_pass import single_pass_plan as cpu_single_pass_plan  # [cpu-single-pass hook]
from .token_divergence import (TokenDivergence, check_softcap, no_autocast, resolve_backend,
                               single_pass_gradients, single_pass_outputs)


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


def _needs_student_grad(hidden, weight, bias) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad or
                                        (bias is not None and bias.requires_grad))


def _single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size, vocab, elem):
    """``(chunks, chunk_weights)`` for :class:`SinglePassKL`, or None when a step is longer than a chunk."""
    n = row_index.numel()
    rows = chunk_rows(n, vocab, 8 + 2 * elem, budget=FAST_CHUNK_BYTES, chunk_size=chunk_size)
    if given is not None:
        w = given.reshape(-1)[row_index].to(torch.float32)
        return even_chunks(n, rows), lambda a, b, D, signal: w[a:b]
    if step_divergence == "none":
        return even_chunks(n, rows), lambda a, b, D, signal: torch.ones_like(D)
    steps = InPassStepWeights(step_rows, row_index, epsilon=epsilon, delta=delta)
    chunks = steps.chunks(rows, n)
    if chunks is None:
        return None
    return chunks, lambda a, b, D, signal: steps.chunk_weights(a, b, signal)


class SinglePassKL(torch.autograd.Function):
    """The weighted loss and its student gradients in one pass (Triton backend, scalar reductions).

    Inputs: the flattened student/teacher hidden ``[N, H]``, weights, biases, ``row_index``, ``target_ids``
    or None, divergence, temperature, the chunks and their weight function (see
    :func:`sod_kernels.triton_divergence.single_pass_loss`), coef, normalizer, whether the weights use the
    sampled signal, and ``(student_softcap, teacher_softcap)`` (each None or the cap).  Outputs: loss (0-D float32, differentiable), ``D``, ``logp_s(y)``, ``logp_t(y)``
    (``[Na]``, not differentiable; the last two empty without targets).  The gradients are computed in the
    forward for an upstream gradient of 1 and scaled in backward; first-order only.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, row_index, y, divergence, temperature, chunks, chunk_weights, coef,
                normalizer, sampled_signal, softcaps=(None, None)):
        from .triton_divergence import KLProblem, single_pass_loss
        problem = KLProblem.build(sh, sw, sb, th, tw, tb, row_index, y, divergence, temperature,
                                  student_softcap=softcaps[0], teacher_softcap=softcaps[1])
        need = ctx.needs_input_grad
        res = single_pass_loss(problem, chunks, chunk_weights, coef=coef, normalizer=normalizer,
                               need_hidden=need[0], need_weight=need[1], need_bias=need[2],
                               sampled_signal=sampled_signal)
        return single_pass_outputs(ctx, res)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return single_pass_gradients(ctx, grad_loss, "fused_sod_loss", "pass memory='low' or reduction='none' "
                                     "for a recomputing backward") + (None,) * 13


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


def finish_loss(loss, D, lp_s, lp_t, row_index, step_rows, given, *, single: bool, step_divergence: str,
                epsilon: float, delta: float, coef: float, reduction: str, return_stats: bool, check_inputs: bool,
                inputs: str):
    """Everything after the per-token divergences: step weights (when the loss still needs them or stats are
    asked for), the reduction, the finiteness check and :class:`SODStats`.

    ``loss`` is the single pass's loss or None; ``D``, ``lp_s``, ``lp_t`` are ``[Na]`` per distilled row
    (``row_index`` into the flattened ``step_rows [B, T]``); ``given`` the ``[B, T]`` token weights or None;
    ``inputs`` names the tensors blamed for a non-finite loss.
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


def fused_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                   step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                   token_weights: torch.Tensor | None = None, divergence: str = "reverse_kl",
                   step_divergence: str | None = None, epsilon: float = DEFAULT_EPSILON,
                   delta: float = DEFAULT_DELTA, temperature: float = 1.0, coef: float = 1.0,
                   student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                   reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                   memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                   student_softcap: float | None = None, teacher_softcap: float | None = None):
    """Step-weighted on-policy distillation loss from hidden states, without materializing logits.

    ``L = coef * sum_{b,t} m[b,t] * w[b,t] * D[b,t] / normalizer`` (docs/math.md).

    Args:
        student_hidden: ``[B, T, Hs]`` or ``[T, Hs]``, float32 / bfloat16 / float16 (float64 on the torch
            backend); receives a gradient.
        student_weight: ``[Vs, Hs]`` lm_head weight, same dtype as ``student_hidden``; receives a gradient.
        teacher_hidden: ``[B, T, Ht]`` or ``[T, Ht]``; teacher_weight ``[Vt, Ht]`` with ``Vt >= Vs`` (only
            the first ``Vs`` rows are used). The teacher never receives a gradient.
        response_mask: ``[B, T]`` 0/1, 1 on tokens the student generated. Exactly one of this and
            ``step_ids`` ([B, T] int, -1 outside steps, 0-based step index otherwise).
        target_ids: ``[B, T]`` sampled tokens in ``[0, Vs)``; needed for ``step_divergence="sampled"``.
        token_weights: optional ``[B, T]`` (or ``[T]``) precomputed per-token weights (finite, ``>= 0``, treated
            as constants) that replace the step weights: ``L = coef * sum m * token_weights * D / normalizer``.
            Use it for weights computed elsewhere (e.g. the sampled signal from rollout-time log-probs).
            Cannot be combined with ``step_divergence="kl"`` / ``"sampled"``.
        divergence: ``"reverse_kl"`` (default) or ``"forward_kl"``.
        step_divergence: ``"kl"`` (d_k = step mean of D; the default without ``token_weights``),
            ``"sampled"`` (step mean of ``|log p_s(y) - log p_t(y)|``) or ``"none"`` (every weight 1: plain
            OPD; the default with ``token_weights``).
        epsilon, delta: docs/math.md (``epsilon > 0``, ``delta >= 0``).
        temperature: ``> 0``; logits are divided by it (no tau^2 factor).
        coef: multiplies the loss.
        student_bias, teacher_bias: optional ``[Vs]`` / ``[Vt]``.
        reduction: ``"token_mean"`` (divide by the number of distilled tokens, at least 1), ``"sum"``, or
            ``"none"`` (per-token ``[B, T]`` tensor).
        return_stats: also return step divergences and weights (one extra host sync).
        backend: ``"auto"`` (Triton for CUDA tensors, chunked PyTorch for CPU), ``"triton"``, ``"torch"``.
        memory: ``"fast"`` (default: the loss and its gradients in one pass over row chunks whenever the
            weights are known in-pass, i.e. scalar reductions with ``token_weights``, ``"none"``, or
            ``"kl"``/``"sampled"`` steps that fit a chunk; extra memory about 1.3 GiB at a 152k x 1024
            student head on the Triton backend, about 170 MB at 32k x 256 on CPU) or ``"low"`` (two
            passes, recomputing the logits in backward: a few hundred MiB on the Triton backend, about
            70 MiB at 32k x 256 on CPU).  On CPU tensors see docs/cpu.md (compiled epilogues,
            ``SOD_KERNELS_CPU_COMPILE=0``).
        chunk_size: rows per chunk (default: from a memory budget and the vocabulary size).
        check_inputs: validate mask / step id values and the loss's finiteness (host syncs); on by default.
        student_softcap, teacher_softcap: logit soft-capping of each model (Gemma 2/3
            ``final_logit_softcapping``): that model's logits are ``cap * tanh((hidden @ weight.T + bias) / cap)``
            before the temperature.  None (default) for none, else a finite number > 0; the two may differ.
            Applied inside the kernels (the capped logits are never materialized), gradient included.
    Returns:
        The loss (float32, or float64 for float64 inputs), or :class:`SODStats` if ``return_stats``.
    """
    step_divergence, epsilon, delta, temperature, coef = check_loss_options(
        divergence, step_divergence, token_weights, reduction, backend, chunk_size, epsilon, delta, temperature,
        coef)
    check_choice(memory, "memory", MEMORY_MODES)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    teacher_softcap = check_softcap(teacher_softcap, "teacher_softcap")
    for who, h, w, b in (("student", student_hidden, student_weight, student_bias),
                         ("teacher", teacher_hidden, teacher_weight, teacher_bias)):
        check_lm_head(h, w, b, hidden_name=f"{who}_hidden", weight_name=f"{who}_weight", bias_name=f"{who}_bias")
    lead = tuple(student_hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden's leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {lead}")
    Vs = student_weight.shape[0]
    if teacher_weight.shape[0] < Vs:
        raise ValueError(f"teacher_weight has a smaller vocabulary ({teacher_weight.shape[0]}) than student_weight "
                         f"({Vs}); Vt >= Vs is required (a padded teacher vocabulary is sliced to Vs)")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, response_mask=response_mask, step_ids=step_ids,
                      target_ids=target_ids, student_bias=student_bias, teacher_bias=teacher_bias)
    ids = check_targets_and_steps(step_divergence, target_ids, lead, Vs, response_mask, step_ids, token_weights,
                                  check_inputs)
    if token_weights is not None:
        check_same_device(student_hidden=student_hidden, token_weights=token_weights)
    impl = resolve_backend(backend, student_hidden.device)

    single = student_hidden.dim() == 2
    step_rows = ids.unsqueeze(0) if single else ids
    B, T = step_rows.shape
    flat_ids = step_rows.reshape(-1)
    row_index = torch.nonzero(flat_ids >= 0).squeeze(1)
    num_active = row_index.numel()  # the one host sync the API needs: it sizes the kernels' work
    sh = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    th = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous()
    y = None if target_ids is None else target_ids.reshape(-1).to(torch.int64).contiguous()
    sw, tw = student_weight.contiguous(), teacher_weight.contiguous()
    acc = compute_dtype(student_hidden.dtype)
    given = None if token_weights is None else token_weights.detach().to(acc).reshape(B, T)
    loss = None
    with no_autocast(student_hidden.device):
        # [cpu-single-pass hook] CPU tensors, memory="fast": the CPU single pass (cpu_single_pass.py)
        cpu_fast = uses_cpu_single_pass(impl, student_hidden.device, memory, reduction, num_active,
                                        _needs_student_grad(student_hidden, student_weight, student_bias))
        if cpu_fast or (impl == "triton" and memory == "fast" and reduction != "none" and num_active and
                        _needs_student_grad(student_hidden, student_weight, student_bias)):
            plan = (cpu_single_pass_plan if cpu_fast else _single_pass_plan)(  # [cpu-single-pass hook]
                step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size,
                student_weight.shape[0], student_hidden.element_size())
            if plan is not None:
                chunks, chunk_weights = plan
                normalizer = float(max(num_active, 1)) if reduction == "token_mean" else 1.0
                loss, D, lp_s, lp_t = (CPUSinglePassKL if cpu_fast else SinglePassKL).apply(  # [cpu-single-pass hook]
                    sh, sw, student_bias, th, tw, teacher_bias, row_index, y, divergence, temperature, chunks,
                    chunk_weights, coef, normalizer, step_divergence == "sampled", (student_softcap, teacher_softcap))
        if loss is None:
            options = {"chunk_size": chunk_size, "memory": memory} if impl == "triton" else {}
            options.update({k: v for k, v in (("student_softcap", student_softcap),
                                              ("teacher_softcap", teacher_softcap)) if v is not None})
            D, _, _, lp_s, lp_t = TokenDivergence.apply(sh, sw, student_bias, th, tw, teacher_bias, row_index, y,
                                                        divergence, temperature, impl, options)
    return finish_loss(loss, D, lp_s, lp_t, row_index, step_rows, given, single=single, step_divergence=step_divergence,
                       epsilon=epsilon, delta=delta, coef=coef, reduction=reduction, return_stats=return_stats,
                       check_inputs=check_inputs, inputs="student_hidden, teacher_hidden or the weights/biases")
