"""``fused_sod_loss``: the step-weighted on-policy distillation loss (docs/math.md).

Pipeline (all backends): find the distilled rows (one host sync, to size the work), compute the
per-token divergence ``D`` for those rows only with the chosen backend (never materializing
tokens x vocabulary), derive the step divergences and weights with the shared O(tokens) helpers in
:mod:`sod_kernels.steps`, and reduce ``coef * w * D``.  The gradient reaches the backend as ``dL/dD`` per
row, which it folds into recomputed logit tiles.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..core.options import PassOptions, SinglePassPlan, input_grads
from ..core.runtime import (check_softcap, needs_student_grad, no_autocast, resolve_backend, single_pass_forward,
                            single_pass_gradients, single_pass_module)
from ..core.tiles import compute_dtype
from ..core.validation import check_model_pair, check_same_device
from ..steps.finish import check_distillation_call, check_targets_and_steps, finish_loss, single_pass_plan
from ..steps.weights import DEFAULT_DELTA, DEFAULT_EPSILON
from .autograd import TokenDivergence

IMPLS = ("default", "dual_gemm")


def check_impl(impl: str, backend: str, memory: str) -> None:
    """``impl`` is ``"default"`` or ``"dual_gemm"``; the latter needs the Triton backend (``"auto"`` passes here and
    is checked again once resolved) and ``memory="fast"``.  ValueError otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "dual_gemm":
        if backend not in ("triton", "auto"):
            raise ValueError(f"impl='dual_gemm' needs the Triton backend (got backend={backend!r}: the torch backend "
                             "on CPU tensors, or backend='torch'); use impl='default'")
        if memory != "fast":
            raise ValueError(f"impl='dual_gemm' is a single pass: it needs memory='fast', got memory={memory!r}")


def dual_gemm_supports(divergence: str, student_softcap: float | None, teacher_softcap: float | None) -> bool:
    """Whether ``impl="dual_gemm"`` computes a call's single pass (a KL without soft-caps); other calls run the
    default path.  Kept here (no Triton import) so that the check costs nothing on CPU-only installs."""
    return divergence in ("reverse_kl", "forward_kl") and student_softcap is None and teacher_softcap is None


def single_pass_backend(name: str, device: torch.device) -> ModuleType | None:
    """Where a backend supplies its single-pass chunk routine: the backend module offering ``KLProblem.build(...)``
    (with ``beta=`` for ``"jsd"`` only) and ``single_pass_loss(problem, chunks, chunk_weights, *, coef, normalizer,
    need_hidden, need_weight, need_bias, sampled_signal[, hard_loss_weight])`` (the contract of
    :func:`sod_kernels.dense.triton_backend.single_pass_loss`), and optionally its own ``single_pass_plan``
    (else :func:`sod_kernels.steps.finish.single_pass_plan`), or None for a backend without one (it runs two
    passes).  Triton: :mod:`~sod_kernels.dense.triton_backend`; the torch
    backend on CPU tensors: :mod:`~sod_kernels.dense.cpu_backend` (whole-vocabulary rows, compiled epilogues);
    the torch backend on other devices runs two passes."""
    return single_pass_module(name, device, __package__)


class SinglePassKL(torch.autograd.Function):
    """The weighted loss and its student gradients in one pass (Triton backend, scalar reductions).

    Inputs: the flattened student/teacher hidden ``[N, H]``, weights, biases, ``row_index``, ``target_ids``
    or None, the :class:`~sod_kernels.core.options.PassOptions` (divergence, beta, temperature, soft-caps) and
    the :class:`~sod_kernels.core.options.SinglePassPlan` (chunks, their weights, coef, normalizer, the
    hard-label weight; see :func:`sod_kernels.dense.triton_backend.single_pass_loss`).  Outputs: loss (0-D
    float32, differentiable; the hard-label term included), ``D``, ``logp_s(y)``, ``logp_t(y)`` (``[Na]``, not
    differentiable; the last two empty without targets).
    The gradients are computed in the forward for an upstream gradient of 1 and scaled in backward;
    first-order only.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, row_index, y, options: PassOptions, plan: SinglePassPlan):
        backend = single_pass_backend(options.backend, sh.device)
        extra = {"beta": options.beta} if options.divergence == "jsd" else {}
        problem = backend.KLProblem.build(sh, sw, sb, th, tw, tb, row_index, y, options.divergence,
                                          options.temperature, student_softcap=options.student_softcap,
                                          teacher_softcap=options.teacher_softcap, **extra)
        routine = backend.single_pass_loss
        if options.impl == "dual_gemm":
            from . import dual_gemm  # imported lazily: the experimental Triton path
            routine = dual_gemm.single_pass_loss
        return single_pass_forward(ctx, routine, problem, plan)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return input_grads(ctx, single_pass_gradients(ctx, grad_loss, "fused_sod_loss", "pass memory='low' or "
                                                      "reduction='none' for a recomputing backward"))


def fused_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, response_mask: torch.Tensor | None = None, *,
                   step_ids: torch.Tensor | None = None, target_ids: torch.Tensor | None = None,
                   token_weights: torch.Tensor | None = None, divergence: str = "reverse_kl",
                   step_divergence: str | None = None, epsilon: float = DEFAULT_EPSILON,
                   delta: float = DEFAULT_DELTA, temperature: float = 1.0, coef: float = 1.0,
                   student_bias: torch.Tensor | None = None, teacher_bias: torch.Tensor | None = None,
                   reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                   memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                   student_softcap: float | None = None, teacher_softcap: float | None = None,
                   beta: float = 0.5, hard_loss_weight: float = 0.0, impl: str = "default"):
    """Step-weighted on-policy distillation loss from hidden states, without materializing logits.

    ``L = coef * sum_{b,t} m[b,t] * w[b,t] * D[b,t] / normalizer
    + hard_loss_weight * sum_{b,t} m[b,t] * (-log p_s(y[b,t])) / normalizer`` (docs/math.md; SPEC section 14).

    Args:
        student_hidden: ``[B, T, Hs]`` or ``[T, Hs]``, float32 / bfloat16 / float16 (float64 on the torch
            backend); receives a gradient.
        student_weight: ``[Vs, Hs]`` lm_head weight, same dtype as ``student_hidden``; receives a gradient.
        teacher_hidden: ``[B, T, Ht]`` or ``[T, Ht]``; teacher_weight ``[Vt, Ht]`` with ``Vt >= Vs`` (only
            the first ``Vs`` rows are used). The teacher never receives a gradient.
        response_mask: ``[B, T]`` 0/1, 1 on tokens the student generated. Exactly one of this and
            ``step_ids`` ([B, T] int, -1 outside steps, 0-based step index otherwise).
        target_ids: ``[B, T]`` sampled tokens in ``[0, Vs)``; needed for ``step_divergence="sampled"`` and for
            ``hard_loss_weight > 0`` (the labels of the hard-label term).
        token_weights: optional ``[B, T]`` (or ``[T]``) precomputed per-token weights (finite, ``>= 0``, treated
            as constants) that replace the step weights: ``L = coef * sum m * token_weights * D / normalizer``.
            Use it for weights computed elsewhere (e.g. the sampled signal from rollout-time log-probs).
            Cannot be combined with ``step_divergence="kl"`` / ``"sampled"``.
        divergence: ``"reverse_kl"`` (default: ``KL(p_s || p_t)``), ``"forward_kl"`` (``KL(p_t || p_s)``) or
            ``"jsd"``: the generalized Jensen-Shannon divergence (TRL's GKD / Liger convention)
            ``D = beta KL(p_t || M) + (1 - beta) KL(p_s || M)`` with ``M = (1 - beta) p_s + beta p_t``.
            ``beta = 0`` is exactly ``"forward_kl"`` and ``beta = 1`` exactly ``"reverse_kl"`` (those paths run).
            For ``0 < beta < 1`` the JSD costs one more ``exp`` and ``log`` per (token, vocabulary) entry than the
            KLs (``log M`` from the two log-probs), and on the two-pass path one more sweep over the logits.
        beta: the JSD's mixing weight, a number in ``[0, 1]`` (default 0.5); checked for every divergence,
            used by ``"jsd"`` only.
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
            student head on the Triton backend, about 170 MB at 32k x 256 on CPU tensors) or ``"low"`` (two
            passes, recomputing the logits in backward: a few hundred MiB on the Triton backend, about
            70 MiB at 32k x 256 on CPU).  The torch backend on a GPU runs two passes in both modes.  On CPU
            tensors see docs/cpu.md (compiled epilogues, ``SOD_KERNELS_CPU_COMPILE=0``).
        chunk_size: rows per chunk (default: from a memory budget and the vocabulary size).
        check_inputs: validate mask / step id values and the loss's finiteness (host syncs); on by default.
        student_softcap, teacher_softcap: logit soft-capping of each model (Gemma 2/3
            ``final_logit_softcapping``): that model's logits are ``cap * tanh((hidden @ weight.T + bias) / cap)``
            before the temperature.  None (default) for none, else a finite number > 0; the two may differ.
            Applied inside the kernels (the capped logits are never materialized), gradient included.
        hard_loss_weight: ``lambda >= 0`` (default 0): adds the hard-label cross-entropy ``lambda * (-log p_s(y))``
            of ``target_ids`` on every distilled token, with the soft term's mask, reduction and normalizer but
            neither its step weights nor ``coef`` (needs ``target_ids``; the teacher gets no gradient).  It raises
            the student's likelihood of the label tokens; on on-policy data ``target_ids`` are the student's own
            samples, so it sharpens the student towards what it sampled (an SFT-style anchor next to the
            distillation term).  ``hard_loss_weight = 1`` with ``coef = 0`` is the plain (token-mean)
            cross-entropy of the labels.
        impl: ``"default"`` (unchanged behaviour) or ``"dual_gemm"`` (experimental; Triton backend with
            ``memory="fast"`` only, else ValueError).  Wherever the default would run the single pass, one Triton
            kernel per row chunk computes both logit tiles (a dual GEMM, float32 accumulation) and keeps exact
            float32 row statistics in its epilogue: the loss, ``D``, the weights and the sampled log-probs are as
            on the default path.  For the gradient it stores two 16-bit ``[C, V]`` arrays (``exp(z_s - tile max)``
            and the tile-centred ``z_s - z_t``; for forward KL ``exp(z_t - tile max)``; fp16 by default,
            ``SOD_KERNELS_DUAL_GEMM_STORE=bf16`` for bf16) instead of two float32 logit blocks: 8 instead of 24
            bytes of epilogue traffic per (token, vocabulary) entry, for ``d(logits)`` rounded through 16 bits.
            Measured against float64 under the Triton interpreter (``benchmarks/dual_gemm_accuracy.py``:
            near-uniform and LM-like inputs, N=64, V=512): on float32 inputs gradient errors of 0.6-1.8e-4
            relative with fp16 storage and 0.9-3.5e-3 with bf16 storage, against 0.4-2.4e-6 on the default path;
            on bfloat16 inputs fp16 storage adds nothing measurable (3.4-3.9e-3 on both paths: the bf16
            gradients' own rounding), bf16 storage up to 6.4e-3.  Saturated softmaxes (logits of magnitude 1e4)
            keep the default path's gradient precision (the stored differences are centred per tile where the
            probability sits); teacher logits spread over ~1e4 or more around small student logits exceed fp16's
            spacing and range (1.8e-2 relative at a spread of 3e4, bf16 storage 3.9e-3; fp16 clamps differences
            beyond 65504).  Calls it does not cover (``divergence="jsd"``, soft-caps) and calls the default runs
            in two passes (``reduction="none"``, no gradient needed, steps longer than a chunk) take the default
            path.
    Returns:
        The loss (float32, or float64 for float64 inputs), or :class:`SODStats` if ``return_stats``.
    """
    divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef = check_distillation_call(
        divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef, reduction, backend,
        memory, chunk_size, token_weights, target_ids)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    teacher_softcap = check_softcap(teacher_softcap, "teacher_softcap")
    lead = check_model_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_bias)
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
    check_impl(impl, backend, memory)
    resolved = resolve_backend(backend, student_hidden.device)
    if impl == "dual_gemm":
        check_impl(impl, resolved, memory)
        if not dual_gemm_supports(divergence, student_softcap, teacher_softcap):
            impl = "default"  # the JSD and soft-capped logits run the default path (documented above)

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
    options = PassOptions(backend=resolved, memory=memory, chunk_size=chunk_size, temperature=temperature,
                          divergence=divergence, beta=beta, student_softcap=student_softcap,
                          teacher_softcap=teacher_softcap, impl=impl)
    loss = None
    with no_autocast(student_hidden.device):
        backend = single_pass_backend(resolved, student_hidden.device) if memory == "fast" else None
        if backend is not None and reduction != "none" and num_active and \
                needs_student_grad(student_hidden, student_weight, student_bias):
            plan = getattr(backend, "single_pass_plan", single_pass_plan)(
                step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size, student_weight.shape[0],
                student_hidden.element_size())
            if plan is not None:
                chunks, chunk_weights = plan
                normalizer = float(max(num_active, 1)) if reduction == "token_mean" else 1.0
                loss, D, lp_s, lp_t = SinglePassKL.apply(
                    sh, sw, student_bias, th, tw, teacher_bias, row_index, y, options,
                    SinglePassPlan(chunks, chunk_weights, coef, normalizer, step_divergence == "sampled",
                                   hard_loss_weight))
        if loss is None:
            D, _, _, lp_s, lp_t = TokenDivergence.apply(sh, sw, student_bias, th, tw, teacher_bias, row_index, y,
                                                        options)
    return finish_loss(loss, D, lp_s, lp_t, row_index, step_rows, given, single=single, step_divergence=step_divergence,
                       epsilon=epsilon, delta=delta, coef=coef, reduction=reduction, return_stats=return_stats,
                       check_inputs=check_inputs, inputs="student_hidden, teacher_hidden or the weights/biases",
                       hard_loss_weight=hard_loss_weight)
