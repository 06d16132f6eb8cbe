"""``fused_sparse_sod_loss``: the step-weighted distillation loss against a teacher given as top-k log-probs.

The teacher is served elsewhere (an inference server returns, per position, ``k`` token ids and their
log-probabilities), so only the student has logits.  Per distilled token the divergence is the exact KL (or
generalized JSD) between the student's and the teacher's distributions coarse-grained onto the ``k`` listed ids
plus one tail bucket (:mod:`sod_kernels.sparse.rows`); step divergences, step weights, ``token_weights``, the
hard-label term and the reductions are those of :func:`sod_kernels.fused_sod_loss` (the same O(tokens) helpers).

Backends: ``"triton"`` (:mod:`sod_kernels.sparse.triton_backend`, the chunked core with the epilogue kernels of
:mod:`sod_kernels.sparse.kernels`; CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"torch"``
(:mod:`sod_kernels.sparse.torch_backend`, chunked PyTorch two-pass tile sweeps; float64 supported; on CPU tensors the default single pass is :mod:`sod_kernels.sparse.cpu_backend`).  Neither holds a
``tokens x vocabulary`` tensor.  With ``memory="fast"`` (the default), scalar reductions whose weights are known
in the pass (``token_weights``, ``step_divergence="none"``, or steps that fit a chunk) and a student gradient
wanted, the loss and its gradients come from one pass (:class:`SinglePassSparse`): the Triton backend's
(:func:`sod_kernels.sparse.triton_backend.single_pass_loss`) or, for CPU tensors on the torch backend, the CPU
single pass over whole-vocabulary row chunks with a compiled epilogue (:mod:`sod_kernels.sparse.cpu_backend`).
Otherwise (``memory="low"``, ``reduction="none"``, forward-only calls, steps longer than the largest chunk)
the backward recomputes the logit blocks (:class:`SparseDivergence`).
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..core.chunks import GradAccumulator, chunk_rows
from ..core.options import PassOptions, SinglePassPlan, input_grads
from ..core.runtime import (backend_module, check_softcap, needs_student_grad, no_autocast, refuse_double_backward,
                            resolve_backend, single_pass_forward, single_pass_gradients, single_pass_module, zero_student_grads)
from ..core.tiles import compute_dtype
from ..core.validation import check_lm_head, check_same_device
from ..steps.finish import check_distillation_call, check_targets_and_steps, finish_loss, single_pass_plan
from ..steps.weights import DEFAULT_DELTA, DEFAULT_EPSILON
from .rows import SparseForward
from .validation import check_topk_shapes, check_topk_values

NAME = "fused_sparse_sod_loss"


def _backend(name: str) -> ModuleType:
    """The two-pass backend ``name`` (``"torch"`` or ``"triton"``, the latter imported lazily)."""
    return backend_module(name, __package__)


def single_pass_backend(name: str, device: torch.device) -> ModuleType | None:
    """The module of a backend's single pass (``SparseProblem.build(...)``, ``single_pass_loss(problem, chunks,
    chunk_weights, *, coef, normalizer, need_hidden, need_weight, need_bias, sampled_signal, hard_loss_weight)``,
    the contract of :func:`sod_kernels.sparse.triton_backend.single_pass_loss`), or None for a backend that runs
    two passes: Triton -> :mod:`~sod_kernels.sparse.triton_backend`; the torch backend on CPU tensors ->
    :mod:`~sod_kernels.sparse.cpu_backend` (whole-vocabulary rows, a compiled epilogue); the torch backend on
    other devices -> None."""
    return single_pass_module(name, device, __package__)


class SparseDivergence(torch.autograd.Function):
    """``D[i]`` of the rows ``row_index`` against the sparse teacher (two passes).

    Inputs: student hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, ``row_index [Na]`` int64,
    ``ids [Na, k]`` int64, ``logprobs [Na, k]``, ``target_ids [Na]`` int64 or None (of the same rows),
    :class:`~sod_kernels.core.options.PassOptions` (divergence, beta, temperature, backend, chunk_size, memory,
    student_softcap), and ``hard``: whether the student's log-prob of the sampled token is differentiable (a
    hard-label term; needs ``target_ids``; keeps the ``O(Na k)`` cell probabilities for the backward).
    Outputs (``[Na]``, float32 or float64): D (differentiable), the student's log-prob of the sampled token
    (differentiable with ``hard``) and the teacher's (not differentiable); both empty without targets.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, row_index, ids, logprobs, y, options: PassOptions, hard: bool = False):
        with no_autocast(sh.device):
            res = _backend(options.backend).sparse_forward(sh, sw, sb, row_index, ids, logprobs, y,
                                                           divergence=options.divergence, beta=options.beta,
                                                           keep_probs=hard, **_sweep_kwargs(options))
        ctx.save_for_backward(sh, sw, sb, row_index, ids, res.lse_tail, res.grad_tail, res.grad_ids,
                              y if hard else None, res.prob_ids, res.prob_tail)
        ctx.options, ctx.hard = options, hard
        lp_s = res.lp_s if res.lp_s is not None else res.D.new_empty(0)
        lp_t = res.lp_t if res.lp_t is not None else res.D.new_empty(0)
        ctx.mark_non_differentiable(*((lp_t,) if hard else (lp_s, lp_t)))
        return res.D, lp_s, lp_t

    @staticmethod
    def backward(ctx, grad_D, grad_lp_s, *unused):
        refuse_double_backward(NAME)
        sh, sw, sb, row_index, ids, lse_tail, grad_tail, grad_ids, y, prob_ids, prob_tail = ctx.saved_tensors
        options: PassOptions = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        hard = {"target_ids": y, "grad_target_logprob": grad_lp_s.contiguous()} \
            if ctx.hard and grad_lp_s is not None else {}
        if (grad_D is None and not hard) or row_index.numel() == 0:
            dh, dw, db = zero_student_grads(sh, sw, sb, need_h, need_w, need_b)
        else:
            if grad_D is None:
                grad_D = torch.zeros_like(lse_tail)
            saved = SparseForward(grad_D, None, None, lse_tail, grad_tail, grad_ids, prob_ids, prob_tail)
            with no_autocast(sh.device):
                dh, dw, db = _backend(options.backend).sparse_backward(
                    sh, sw, sb, row_index, ids, saved, grad_D.contiguous(), need_hidden=need_h, need_weight=need_w,
                    need_bias=need_b, **hard, **_sweep_kwargs(options))
        return input_grads(ctx, (dh, dw, db))


def _sweep_kwargs(options: PassOptions) -> dict:
    return {"temperature": options.temperature, "chunk_size": options.chunk_size, "memory": options.memory,
            "softcap": options.student_softcap}


class SinglePassSparse(torch.autograd.Function):
    """The weighted loss and its student gradients in one pass (scalar reductions; the Triton backend, or the torch
    backend on CPU tensors: :func:`single_pass_backend`).

    Inputs: student hidden, weight, bias, ``row_index``, ``ids``, ``logprobs``, ``target_ids`` (as
    :class:`SparseDivergence`), the :class:`~sod_kernels.core.options.PassOptions` and the
    :class:`~sod_kernels.core.options.SinglePassPlan` (see :func:`sod_kernels.sparse.triton_backend.single_pass_loss`).
    Outputs: loss (0-D float32; float64 for float64 inputs on the CPU single pass; differentiable), ``D``,
    ``logp_s(y)``, ``logp_t(y)`` (``[Na]``, not differentiable).  Gradients are formed for an upstream gradient
    of 1 and scaled in backward.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, row_index, ids, logprobs, y, options: PassOptions, plan: SinglePassPlan):
        backend = single_pass_backend(options.backend, sh.device)
        problem = backend.SparseProblem.build(sh, sw, sb, row_index, ids, logprobs, y, options.divergence,
                                              options.temperature, softcap=options.student_softcap, beta=options.beta)
        return single_pass_forward(ctx, backend.single_pass_loss, problem, plan)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        return input_grads(ctx, single_pass_gradients(ctx, grad_loss, NAME, "pass memory='low', or reduction='none' "
                                                      "and reduce it yourself, for a recomputing backward"))


def fused_sparse_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                          teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                          response_mask: torch.Tensor | None = None, *, step_ids: torch.Tensor | None = None,
                          target_ids: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                          divergence: str = "reverse_kl", step_divergence: str | None = None,
                          epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA, temperature: float = 1.0,
                          coef: float = 1.0, student_bias: torch.Tensor | None = None,
                          reduction: str = "token_mean", return_stats: bool = False, backend: str = "auto",
                          memory: str = "fast", chunk_size: int | None = None, check_inputs: bool = True,
                          student_softcap: float | None = None, beta: float = 0.5, hard_loss_weight: float = 0.0):
    """Step-weighted on-policy distillation loss against a teacher given as top-k log-probs.

    ``L = coef * sum_{b,t} m[b,t] * w[b,t] * D[b,t] / normalizer`` as :func:`sod_kernels.fused_sod_loss`, with
    ``D`` the KL between student and teacher coarse-grained onto the ``k`` ids of the position plus a tail
    bucket: with ``q_i`` the student's probabilities of the ids, ``Q = 1 - sum q_i``, ``a_i`` the teacher's
    log-probs and ``P = 1 - sum exp(a_i)`` (clamped to [0, 1]; 0 when ``k = V``),

    - ``reverse_kl``: ``D = sum_i q_i (log q_i - a_i) + Q (log Q - log P)``
    - ``forward_kl``: ``D = sum_i e^{a_i} (a_i - log q_i) + P (log P - log Q)``
    - ``jsd`` (generalized Jensen-Shannon, ``beta``): over the ``k + 1`` cells ``c`` (the ids and the tail, the
      tail left out when ``k = V``) with student ``q_c`` and teacher ``p_c``, ``M_c = (1 - beta) q_c + beta p_c``,
      ``D = beta KL(p || M) + (1 - beta) KL(q || M)`` (``log M_c`` by ``logaddexp`` of the shifted log-probs; no
      floor needed).  ``beta = 0`` is exactly ``forward_kl`` and ``beta = 1`` exactly ``reverse_kl``.

    with ``0 log 0 = 0`` and, for the KLs, the tail masses floored inside the logarithms: ``Q`` at ``1e-12``,
    ``P`` at ``max(1e-12, (1 + log k) eps)`` with ``eps`` of the log-probs' dtype, the resolution of
    ``1 - sum exp(a)`` (4.8e-7 for float32 at k = 20; :mod:`sod_kernels.sparse.rows`).  ``D`` never exceeds the
    full-vocabulary divergence and equals it when the ids are the whole vocabulary.  Only the student's full
    log-sum-exp and its ``k`` logits per token are needed; no ``tokens x vocabulary`` tensor is held.

    With ``hard_loss_weight = lambda > 0`` the loss gains ``lambda * sum_{b,t} m[b,t] (-log p_s(y[b,t])) /
    normalizer`` (the student's full-vocabulary cross-entropy of ``target_ids``, wherever ``y`` lies: among the
    ids or not; not step-weighted, not times ``coef``).  The JSD and the hard term each cost ``O(k)`` per row
    on top of the KL's work (row math, and one gradient column per row for the hard term; the two-pass path
    also keeps the ``k + 1`` cell probabilities per row for the backward): negligible next to the ``O(V H)``
    logit products.

    Args:
        student_hidden: ``[B, T, H]`` or ``[T, H]``, float32 / bfloat16 / float16 (float64 on the torch
            backend); receives a gradient.
        student_weight: ``[V, H]`` lm_head weight, same dtype; receives a gradient.
        teacher_topk_ids: ``[B, T, k]`` (or ``[T, k]``) integer ids, ``k >= 1`` distinct ids in ``[0, V)`` per
            distilled position (e.g. the teacher's top-k).  Positions outside the steps are not read.
        teacher_topk_logprobs: same shape, floating: the teacher's log-probabilities of those ids at
            ``temperature`` (as a server returns them): finite, ``<= 0`` and ``sum exp <= 1`` up to a rounding
            tolerance (:func:`sod_kernels.sparse.validation.logprob_tolerance`; entries above 0 within it are
            read as 0).  Never receives a gradient.
        response_mask: ``[B, T]`` 0/1; exactly one of this and ``step_ids`` (``[B, T]`` int, -1 outside steps).
        target_ids: ``[B, T]`` sampled tokens in ``[0, V)``; needed for ``step_divergence="sampled"``, whose
            signal is ``|log p_s(y) - log p_t(y)|`` with ``log p_t(y)`` the teacher's listed log-prob when ``y``
            is among the ids, else ``log(P' / (V - k))`` (the tail mass spread evenly over the tail ids;
            ``P'`` the floored ``P``).  List the sampled token among the ids for the exact signal.
        token_weights: optional ``[B, T]`` precomputed weights replacing the step weights (as
            :func:`sod_kernels.fused_sod_loss`); cannot be combined with ``step_divergence="kl"``/``"sampled"``.
        divergence: ``"reverse_kl"`` (default), ``"forward_kl"`` or ``"jsd"``.
        step_divergence: ``"kl"`` (step mean of ``D``; the default without ``token_weights``), ``"sampled"`` or
            ``"none"`` (every weight 1; the default with ``token_weights``).
        epsilon, delta: step-weight parameters (``epsilon > 0``, ``delta >= 0``).
        temperature: ``> 0``; the student's logits are divided by it (the teacher's log-probs are taken as given).
        coef: multiplies the loss.
        student_bias: optional ``[V]``.
        reduction: ``"token_mean"`` (default), ``"sum"`` or ``"none"`` (per-token ``[B, T]``).
        return_stats: return :class:`sod_kernels.SODStats` (loss, token divergences, weights, step statistics).
        backend: ``"auto"`` (Triton for CUDA tensors, chunked PyTorch otherwise), ``"triton"``, ``"torch"``.
        memory: ``"fast"`` (default: the loss and its gradients in one pass over row chunks whenever the
            weights are known in-pass, a scalar reduction is asked for and a gradient is wanted; Triton, and the
            torch backend on CPU tensors, whose chunks are whole vocabulary rows: about ``C x V`` floats of extra
            memory, 64 MiB by default (512 rows at V = 32000 in float32), plus the ``[V, H]`` weight-gradient
            accumulator) or ``"low"`` (two passes, the backward recomputing the logits: Triton over smaller
            row chunks, the torch backend over rows x vocabulary tiles of about 8 MiB; ``2 N V H`` more FLOPs).
            The torch backend on non-CPU devices runs the two passes in both modes.
        chunk_size: rows per chunk (default: from a memory budget and the vocabulary size).
        check_inputs: validate mask / step ids / teacher ids and log-probs at the distilled positions and the
            loss's finiteness (host synchronisations); on by default.
        student_softcap: logit soft-capping of the student (Gemma 2/3 ``final_logit_softcapping``): its logits
            are ``cap * tanh((hidden @ weight.T + bias) / cap)`` before the temperature.  None (default) for
            none, else a finite number > 0; applied inside the kernels, gradient included.
        beta: the JSD's weight in ``[0, 1]`` (default 0.5; checked for every divergence, used by ``"jsd"``).
        hard_loss_weight: ``lambda >= 0`` (default 0) of the hard-label cross-entropy; ``> 0`` needs
            ``target_ids``.
    Returns:
        The loss (float32, or float64 for float64 inputs), or :class:`sod_kernels.SODStats` if ``return_stats``.
    """
    divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef = check_distillation_call(
        divergence, beta, hard_loss_weight, step_divergence, epsilon, delta, temperature, coef, reduction, backend,
        memory, chunk_size, token_weights, target_ids)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    check_lm_head(student_hidden, student_weight, student_bias, hidden_name="student_hidden",
                  weight_name="student_weight", bias_name="student_bias")
    lead = tuple(student_hidden.shape[:-1])
    V = student_weight.shape[0]
    k = check_topk_shapes(teacher_topk_ids, teacher_topk_logprobs, lead, V)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
                      response_mask=response_mask, step_ids=step_ids, target_ids=target_ids,
                      student_bias=student_bias, token_weights=token_weights)
    ids = check_targets_and_steps(step_divergence, target_ids, lead, V, response_mask, step_ids, token_weights,
                                  check_inputs)
    impl = resolve_backend(backend, student_hidden.device)

    single = student_hidden.dim() == 2
    step_rows = ids.unsqueeze(0) if single else ids
    B, T = step_rows.shape
    row_index = torch.nonzero(step_rows.reshape(-1) >= 0).squeeze(1)
    num_active = row_index.numel()  # the one host sync the API needs: it sizes the kernels' work
    topk = teacher_topk_ids.reshape(-1, k).index_select(0, row_index).to(torch.int64).contiguous()
    logprobs = teacher_topk_logprobs.detach().reshape(-1, k).index_select(0, row_index).contiguous()
    if check_inputs:
        check_topk_values(topk, logprobs, V)
    sh = student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()
    sw = student_weight.contiguous()
    y = None if target_ids is None else target_ids.reshape(-1).index_select(0, row_index).to(torch.int64)
    acc = compute_dtype(student_hidden.dtype)
    given = None if token_weights is None else token_weights.detach().to(acc).reshape(B, T)
    options = PassOptions(backend=impl, memory=memory, chunk_size=chunk_size, temperature=temperature,
                          divergence=divergence, beta=beta, student_softcap=student_softcap)
    loss = None
    with no_autocast(student_hidden.device):
        backend = single_pass_backend(impl, student_hidden.device) if memory == "fast" else None
        if backend is not None and reduction != "none" and num_active and \
                needs_student_grad(student_hidden, student_weight, student_bias):
            if impl == "triton":
                rows = chunk_rows(num_active, V, 4 + GradAccumulator.GROUP * student_hidden.element_size(),
                                  chunk_size=chunk_size)
                plan = single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, rows, V,
                                        student_hidden.element_size())
            else:
                plan = backend.single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta,
                                                chunk_size, V, student_hidden.element_size())
            if plan is not None:
                chunks, chunk_weights = plan
                normalizer = float(max(num_active, 1)) if reduction == "token_mean" else 1.0
                loss, D, lp_s, lp_t = SinglePassSparse.apply(
                    sh, sw, student_bias, row_index, topk, logprobs, y, options,
                    SinglePassPlan(chunks, chunk_weights, coef, normalizer, step_divergence == "sampled",
                                   hard_loss_weight))
        if loss is None:
            hard = hard_loss_weight > 0 and needs_student_grad(student_hidden, student_weight, student_bias)
            D, lp_s, lp_t = SparseDivergence.apply(sh, sw, student_bias, row_index, topk, logprobs, y, options, hard)
    return finish_loss(loss, D, lp_s, lp_t, row_index, step_rows, given, single=single, step_divergence=step_divergence,
                       epsilon=epsilon, delta=delta, coef=coef, reduction=reduction, return_stats=return_stats,
                       check_inputs=check_inputs, inputs="student_hidden, student_weight or student_bias",
                       hard_loss_weight=hard_loss_weight)
