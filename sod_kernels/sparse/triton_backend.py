"""GPU backend of :func:`sod_kernels.fused_sparse_sod_loss`: the sparse-teacher epilogues
(:mod:`sod_kernels.sparse.kernels`) on the one chunked loop (:mod:`sod_kernels.core.loop`); this module writes
only the epilogues.

Per row chunk of ``C`` distilled tokens: one logit product ``h[rows] @ W.T`` with float32 output (cuBLAS),
the gather-and-mask kernel, the online log-sum-exp of the masked block (the tail), ``O(C k)`` row math,
and where a gradient is formed the tail-gradient and scatter kernels and the two contraction products
(no atomics; bitwise reproducible).  Only the student has a logit block: the teacher is its ``k`` log-probs.

- :func:`sparse_forward` / :func:`sparse_backward`: two passes (``reduction="none"``, forward-only calls, and
  steps longer than a chunk): the forward keeps ``O(N k)`` per-row terms, the backward recomputes the logit
  blocks.  ``2 N V H`` FLOPs forward, ``2 N V H + 4 N V H`` backward.
- :func:`single_pass_loss`: the loss and its gradients in one pass when the weights are known in-pass
  (:func:`sod_kernels.steps.finish.single_pass_plan`): ``6 N V H`` FLOPs, the single-pass minimum.  Its row
  math, step weights and the id columns of ``d(logits)`` run in four small kernels
  (:mod:`sod_kernels.sparse.kernels`, float32 with cancellation-free forms where a float32 difference would
  lose the float64 reference's accuracy): 7 launches per chunk (8 with in-pass step weights), none of them a
  host synchronisation, against ~110 with the float64 torch row math it replaces
  (:func:`sod_kernels.sparse.rows.coarse_grained_rows`, still the two-pass path's and the reference).

The generalized JSD only changes the ``O(C k)`` row math; a hard-label term adds ``O(C k)`` to the cell
coefficients (:func:`sod_kernels.sparse.rows.logit_coefficients`) and one column per row of the gradient block
(the sampled token's, distinct per row: no atomics).

Headline (N = 16384, Hs = 1024, V = 151936, bf16, one pass): 1.53e13 FLOP (~20 ms at 780 TFLOP/s); the
epilogue moves ``4 N V`` (statistics) + ``6 N V`` (gradient) bytes = 25 GB (~6 ms at 4.3 TB/s).

Dtypes: float32, bfloat16, float16 hidden states (float64: use the torch backend).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.chunks import (FAST_CHUNK_BYTES, LOW_MEMORY_CHUNK_BYTES, GradAccumulator, LMHead, chunk_rows, even_chunks,
                           row_plan)
from ..core.kernels import logprob_partials, logprob_row_stats
from ..core.loop import DeviceBlocks, DeviceGrads, longest_chunk, run_chunks
from ..core.options import SinglePassResult
from ..core.rows import RowChunks
from ..core.tiles import apply_softcap
from ..steps.plan import InPassStepWeights, kernel_plan
from .kernels import (MAX_ROW_BLOCK_K, gather_and_mask, gather_id_logits, row_block_k, rows_terms, sparse_logit_grad,
                      step_weights, tail_fill)
from .rows import (LogitCoefficients, SinglePassTotals, SparseForward, coarse_grained_rows, logit_coefficients,
                   teacher_tail_log_mass)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIN_LOGIT = -1e30  # the statistics kernel's starting maximum (sod_kernels.core.kernels.MIN_LOGIT)


@dataclass
class SparseProblem(RowChunks):
    """One call's inputs as the chunk loops see them; ``ids``, ``logprobs``, ``target_ids`` are already
    restricted to the distilled rows (``[Na, k]``, ``[Na, k]``, ``[Na]``)."""

    head: LMHead
    row_index: torch.Tensor
    contiguous: bool
    ids: torch.Tensor
    logprobs: torch.Tensor | None
    target_ids: torch.Tensor | None
    divergence: str                  # "reverse_kl", "forward_kl" or "jsd"
    temperature: float
    softcap: float | None = None     # cap tanh(x / cap) of the student's raw logits, before 1/tau
    budget: int = FAST_CHUNK_BYTES   # bytes of the chunk buffers (LOW_MEMORY_CHUNK_BYTES for memory="low")
    beta: float = 0.5                # the JSD's mixing weight (only for "jsd")

    @classmethod
    def build(cls, hidden, weight, bias, row_index, ids, logprobs, target_ids, divergence, temperature, *,
              softcap: float | None = None, memory: str = "fast", beta: float = 0.5):
        hidden, weight, rows, contiguous = row_plan(hidden, weight, row_index, SUPPORTED_DTYPES)
        return cls(LMHead(hidden, weight, bias, weight.shape[0]), rows, contiguous, ids.to(torch.int64).contiguous(),
                   None if logprobs is None else logprobs.contiguous(),
                   None if target_ids is None else target_ids.to(torch.int64),
                   divergence, float(temperature), None if softcap is None else float(softcap),
                   LOW_MEMORY_CHUNK_BYTES if memory == "low" else FAST_CHUNK_BYTES, float(beta))

    @property
    def forward_kl(self) -> bool:
        return self.divergence == "forward_kl"

    @property
    def vocab(self) -> int:
        return self.head.vocab

    def chunks(self, grad: bool, chunk_size: int | None) -> list[tuple[int, int]]:
        per_entry = 4 + (GradAccumulator.GROUP * self.head.hidden.element_size() if grad else 0)
        return even_chunks(self.n_rows, chunk_rows(self.n_rows, self.vocab, per_entry, budget=self.budget,
                                                   chunk_size=chunk_size))


def blocks(p: SparseProblem, chunks: list[tuple[int, int]], gather: str = "chunk") -> DeviceBlocks:
    """The chunks' reusable float32 logit block (:class:`~sod_kernels.core.loop.DeviceBlocks`)."""
    return DeviceBlocks((p.head,), p.row_index, p.contiguous, longest_chunk(chunks), gather=gather)


def grads_of(p: SparseProblem, chunks: list[tuple[int, int]], need_hidden: bool, need_weight: bool, need_bias: bool,
             bias: str = "fold") -> DeviceGrads:
    """The student's gradient sink of a pass over ``chunks`` (:class:`~sod_kernels.core.loop.DeviceGrads`)."""
    return DeviceGrads(p.head, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                       need_bias=need_bias, block_rows=longest_chunk(chunks), bias=bias)


def target_logits(p: SparseProblem, x: torch.Tensor, y: torch.Tensor):
    """``(z_y [C], slope_y [C] or None)`` float32: the temperature-scaled (capped) logit of each row's token
    ``y [C]`` in the raw block ``x [C, V]`` (read before the ids are masked) and the soft-cap's slope there
    (``1 - tanh^2 = 4 e / (1 + e)^2``, ``e = exp(-2|u|)``, as the kernels; None without a cap).  A ``y`` outside
    ``[0, V)`` reads column 0 (callers mask those rows)."""
    col = y.clamp(0, p.vocab - 1)
    raw = x.gather(1, col[:, None]).squeeze(1)
    if p.head.used_bias is not None:
        raw = raw + p.head.used_bias[col].float()
    if p.softcap is None:
        return raw / p.temperature, None
    e = torch.exp(-2.0 * (raw / p.softcap).abs())
    return apply_softcap(raw, p.softcap) / p.temperature, 4.0 * e / (1.0 + e) ** 2


def _chunk_terms(p: SparseProblem, x: torch.Tensor, start: int, stop: int):
    """Gather the id logits (masking them in ``x``), the tail statistics and the per-row terms:
    ``(SparseRowTerms, the soft-cap's slope at the ids or None, the slope at the targets or None)``."""
    z_target = y = slope_y = None
    if p.target_ids is not None:  # read before the ids are masked
        y = p.target_ids[start:stop]
        z_target, slope_y = target_logits(p, x, y)
    ids = p.ids[start:stop]
    z_ids, slope = gather_and_mask(x, p.head.used_bias, ids, temperature=p.temperature, softcap=p.softcap)
    tail = logprob_row_stats(x, p.head.used_bias, temperature=p.temperature, with_entropy=False, softcap=p.softcap)
    # A row whose columns are all masked keeps the kernel's starting maximum: its tail is empty.
    lse_tail = torch.where(tail.max <= MIN_LOGIT, torch.full_like(tail.lse, float("-inf")), tail.lse)
    terms = coarse_grained_rows(z_ids, lse_tail, p.logprobs[start:stop], divergence=p.divergence, beta=p.beta,
                                vocab=p.vocab, ids=ids, target_ids=y, z_target=z_target)
    return terms, slope, slope_y


def _grad_block(p: SparseProblem, x, start, stop, lse_tail, coefs: LogitCoefficients, out, slope, slope_y=None):
    """``d(logits)`` of a masked block from the rows' cell coefficients ``coefs`` (upstream gradients and ``1/tau``
    included); ``slope``, ``slope_y``: the soft-cap's slope at the ids and at the targets (None without a cap).
    With ``coefs.target`` (a hard-label term) each row's target column then gains ``target * slope_y``: one
    read-modify-write of a distinct column per row (deterministic, no atomics)."""
    values = coefs.ids if slope is None else coefs.ids * slope
    sparse_logit_grad(x, p.head.used_bias, p.ids[start:stop], lse_tail, coefs.tail, values, out,
                      temperature=p.temperature, softcap=p.softcap)
    if coefs.target is not None:
        add_at_targets(out, p.target_ids[start:stop], coefs.target if slope_y is None else coefs.target * slope_y)
    return out


def add_at_targets(out: torch.Tensor, y: torch.Tensor, values: torch.Tensor) -> None:
    """``out[r, y[r]] += values[r]`` (float32 sum, stored in ``out``'s dtype) for the rows with ``0 <= y < width``
    (the others add 0 to their column 0, which changes nothing: a vocabulary shard's caller passes ``-1``).  One
    distinct address per row, no host synchronisation."""
    inside = (y >= 0) & (y < out.shape[1])
    rows = torch.arange(out.shape[0], device=out.device)
    cols = torch.where(inside, y, torch.zeros_like(y))
    add = torch.where(inside, values.float(), torch.zeros_like(values, dtype=torch.float32))
    out[rows, cols] = (out[rows, cols].float() + add).to(out.dtype)


def sparse_forward(hidden, weight, bias, row_index, ids, logprobs, target_ids, *, divergence: str,
                   temperature: float, chunk_size: int | None = None, softcap: float | None = None,
                   memory: str = "fast", beta: float = 0.5, keep_probs: bool = False) -> SparseForward:
    """Per-row coarse-grained divergence of the rows ``row_index`` (no gradient work).

    Args: ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]`` or None; ``row_index [Na]`` int64 ascending;
    ``ids [Na, k]`` int64 and ``logprobs [Na, k]`` of those rows; ``target_ids [Na]`` int64 or None;
    ``divergence``: ``"reverse_kl"``, ``"forward_kl"`` or ``"jsd"`` (with ``0 < beta < 1``);
    ``softcap``: ``cap tanh(x / cap)`` of the raw logits before ``1/tau``, or None; ``memory``: ``"fast"``
    (chunks from ``FAST_CHUNK_BYTES``) or ``"low"`` (from ``LOW_MEMORY_CHUNK_BYTES``); ``keep_probs``: also keep
    the student's cell probabilities (``O(Na k)``, for a hard-label term's backward).
    """
    p = SparseProblem.build(hidden, weight, bias, row_index, ids, logprobs, target_ids, divergence, temperature,
                            softcap=softcap, memory=memory, beta=beta)
    out = SparseForward.empty(p.n_rows, p.ids.shape[1], hidden.device, torch.float32, target_ids is not None,
                              keep_probs)
    chunks = p.chunks(False, chunk_size)
    run_chunks(chunks, blocks(p, chunks), lambda c: out.store(c.start, c.stop,
                                                              _chunk_terms(p, c.logits[0], c.start, c.stop)[0]))
    return out


def sparse_backward(hidden, weight, bias, row_index, ids, saved: SparseForward, grad_divergence, *,
                    temperature: float, need_hidden: bool = True, need_weight: bool = True, need_bias: bool = True,
                    chunk_size: int | None = None, softcap: float | None = None, memory: str = "fast",
                    target_ids: torch.Tensor | None = None, grad_target_logprob: torch.Tensor | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i]`` w.r.t. hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``
    (inputs' dtypes, None where not needed), recomputing the logit blocks; ``saved`` from :func:`sparse_forward`
    (``softcap`` and ``memory`` as there).  With ``grad_target_logprob [Na]`` (a hard-label term: the upstream
    gradient of ``log p_s(y)``; needs ``target_ids [Na]`` and ``saved`` from ``keep_probs=True``) its gradient
    ``grad_target_logprob * (onehot(y) - p_s)`` is added (a ``y`` outside ``[0, V)`` gets no one-hot part)."""
    if grad_target_logprob is not None and target_ids is None:
        raise ValueError("sparse_backward: grad_target_logprob needs target_ids")
    hard = grad_target_logprob is not None
    p = SparseProblem.build(hidden, weight, bias, row_index, ids, None, target_ids if hard else None, "reverse_kl",
                            temperature, softcap=softcap, memory=memory)
    chunks = p.chunks(True, chunk_size)
    grads = grads_of(p, chunks, need_hidden, need_weight, need_bias)
    if not grads.active or p.n_rows == 0:
        return grads.finish()
    scale = grad_divergence.to(torch.float32) / p.temperature
    hard_scale = -grad_target_logprob.to(torch.float32) / p.temperature if hard else None

    def epilogue(c):
        start, stop, x = c.start, c.stop, c.logits[0]
        slope_y = target_logits(p, x, p.target_ids[start:stop])[1] if hard else None  # before the ids are masked
        _, slope = gather_and_mask(x, p.head.used_bias, p.ids[start:stop], temperature=p.temperature,
                                   softcap=p.softcap)
        pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
        coefs = logit_coefficients(saved.grad_ids[start:stop], saved.grad_tail[start:stop], scale[start:stop],
                                   hard=pick(hard_scale), prob_ids=pick(saved.prob_ids),
                                   prob_tail=pick(saved.prob_tail))
        return _grad_block(p, x, start, stop, saved.lse_tail[start:stop], coefs, c.grad_block(), slope, slope_y)

    run_chunks(chunks, blocks(p, chunks), epilogue, grads)
    return grads.finish()


def single_pass_loss(p: SparseProblem, chunks: list[tuple[int, int]],
                     chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                     coef: float, normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                     sampled_signal: bool = False, hard_loss_weight: float = 0.0) -> SinglePassResult:
    """``L = coef * sum_i w_i D_i / normalizer`` (``+ hard_loss_weight * sum_i (-log p_s(y_i)) / normalizer``, the
    hard-label term, which needs ``p.target_ids``) and its student gradients in one pass over ``chunks``;
    ``chunk_weights(start, stop, D, signal)`` as in :func:`sod_kernels.dense.triton_backend.single_pass_loss`.

    The weight functions of :func:`sod_kernels.steps.finish.single_pass_plan` (precomputed ``token_weights``,
    all ones, in-pass step weights, described by their ``kernel_plan``: :func:`_weight_source`) run fused (:func:`_fused_single_pass`: at most 8
    launches per chunk, no host synchronisation in the loop); any other callable, or more than
    ``MAX_ROW_BLOCK_K`` ids per row, runs the torch row math (:func:`_single_pass_torch_rows`)."""
    if hard_loss_weight and p.target_ids is None:
        raise ValueError("single_pass_loss: hard_loss_weight > 0 needs target_ids")
    source = _weight_source(chunk_weights, p.n_rows)
    kwargs = dict(coef=coef, normalizer=normalizer, need_hidden=need_hidden, need_weight=need_weight,
                  need_bias=need_bias, sampled_signal=sampled_signal, hard_loss_weight=hard_loss_weight)
    if source is None or row_block_k(p.ids.shape[1]) > MAX_ROW_BLOCK_K:
        return _single_pass_torch_rows(p, chunks, chunk_weights, **kwargs)
    return _fused_single_pass(p, chunks, source, **kwargs)


def _weight_source(chunk_weights: Callable, n_rows: int) -> tuple[str, object] | None:
    """What a weight function of :func:`sod_kernels.steps.finish.single_pass_plan` computes, read from the
    :class:`~sod_kernels.steps.plan.KernelWeightPlan` it carries (no call, no synchronisation):
    ``("steps", InPassStepWeights)`` (step weights from the chunk's signal), ``("given", w [Na] float32)``
    (``token_weights``), ``("ones", None)`` (``step_divergence="none"``), or None for any other callable (the
    caller then calls it chunk by chunk)."""
    plan = kernel_plan(chunk_weights)
    if plan is None:
        return None
    if plan.mode == "steps" and isinstance(plan.steps, InPassStepWeights):
        return "steps", plan.steps
    w = plan.given
    if plan.mode == "given" and isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.dim() == 1 \
            and w.numel() == n_rows:
        return "given", w.contiguous()
    if plan.mode == "none":
        return "ones", None
    return None


def _fused_single_pass(p: SparseProblem, chunks: list[tuple[int, int]], source: tuple[str, object], *, coef: float,
                       normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                       sampled_signal: bool, hard_loss_weight: float) -> SinglePassResult:
    """The single pass with the row math, the weights and the id columns of ``d(logits)`` in Triton kernels.

    Once per call: the teacher's tail masses ``P``, ``log P'`` of all rows (float64 torch ops, stored float32:
    the one place where ``1 - sum exp(a)`` cancels), the distilled rows' hidden states (one gather unless they
    are all rows), the step plan as tensors (``bounds``, ``first_step`` of
    :class:`~sod_kernels.steps.plan.InPassStepWeights`) and the scratch buffers.  Per chunk of ``C`` rows,
    launches: the logit product, :func:`~sod_kernels.sparse.kernels.gather_id_logits`, the statistics partials,
    :func:`~sod_kernels.sparse.kernels.rows_terms`, with step weights
    :func:`~sod_kernels.sparse.kernels.step_weights`, :func:`~sod_kernels.sparse.kernels.tail_fill`, then
    ``d(hidden)`` and the ``d(weight)`` fold's copy or product: 7, 8 with step weights (plus the fold's product
    once per fold group; with a bias the tail kernel adds ``d(bias)``'s column sums itself).  Host work per
    chunk is Python integers only (slices and the chunk's first step by bisection of the plan's step starts).
    Once per call after the loop, in float64:
    ``loss = coef / normalizer * sum(w D) + hard_loss_weight / normalizer * sum(-log p_s(y))``.
    """
    kind, steps = source
    device = p.head.hidden.device
    n, k, vocab = p.n_rows, p.ids.shape[1], p.vocab
    bias = p.head.used_bias
    longest = longest_chunk(chunks)
    # d(bias) comes from the tail kernel's column sums (bias="epilogue"); with only d(bias) wanted the sink owns
    # the d(logits) block
    sink = grads_of(p, chunks, need_hidden, need_weight, need_bias, bias="epilogue")
    grads = sink.active
    d_bias = sink.d_bias
    with_targets, hard = p.target_ids is not None, bool(hard_loss_weight)
    f32 = torch.float32
    D = torch.empty(n, dtype=f32, device=device)
    lp_s = torch.empty_like(D) if with_targets else None
    lp_t = torch.empty_like(D) if with_targets else None
    P, log_p = teacher_tail_log_mass(p.logprobs, vocab)
    teacher_tail = torch.stack([P, log_p]).to(f32)
    targets = p.target_ids.contiguous() if with_targets else None
    if kind == "given":
        w_all = steps
    elif kind == "ones":
        w_all = torch.ones(n, dtype=f32, device=device)
    else:
        w_all = torch.empty(n, dtype=f32, device=device)
        plan = (steps.bounds, steps.first_step, torch.empty(steps.num_steps, dtype=f32, device=device))
    zid = torch.empty(longest, k, dtype=f32, device=device)
    slope = torch.empty_like(zid) if p.softcap is not None else None
    zy = torch.empty(longest, dtype=f32, device=device) if with_targets else None
    rows = torch.empty(4, longest, dtype=f32, device=device)
    idv = torch.empty(2, longest, k, dtype=f32, device=device) if (kind == "steps" and grads) else None
    grad_scale = coef / (normalizer * p.temperature)
    hard_scale = hard_loss_weight / (normalizer * p.temperature)
    cap = dict(temperature=p.temperature, softcap=p.softcap)
    pick = lambda t, start, stop: None if t is None else t[start:stop]  # noqa: E731

    def epilogue(ch):
        start, stop, c, x = ch.start, ch.stop, ch.size, ch.logits[0]
        ids = p.ids[start:stop]
        y = pick(targets, start, stop)
        gather_id_logits(x, bias, ids, y, zid[:c], pick(slope, 0, c), pick(zy, 0, c), **cap)
        part = logprob_partials(x, bias, **cap)  # the tail's (max, sum) per vocabulary split
        grad = ch.grad_block() if grads else None
        w = w_all[start:stop]
        rows_terms(part, zid[:c], pick(slope, 0, c), ids, p.logprobs[start:stop], teacher_tail[:, start:stop], y,
                   pick(zy, 0, c), None if kind == "steps" else w,
                   (D[start:stop], pick(lp_s, start, stop), pick(lp_t, start, stop)),
                   grad, idv, rows, divergence=p.divergence, beta=p.beta, grad_scale=grad_scale,
                   hard_scale=hard_scale, vocab=vocab)
        if kind == "steps":
            first = bisect.bisect_left(steps.starts, start)
            step_weights(D[start:stop], pick(lp_s, start, stop), pick(lp_t, start, stop), plan, first,
                         bisect.bisect_left(steps.starts, stop) - first, start, w, ids,
                         idv if idv is not None else zid[None], grad, grad_scale=grad_scale, epsilon=steps.epsilon,
                         delta=steps.delta, sampled=sampled_signal, hard=hard)
        if not grads:
            return None
        tail_fill(x, bias, grad, rows, w, y, grad_scale=grad_scale, hard=hard,
                  d_bias=None if d_bias is None else d_bias[:vocab], **cap)
        return grad

    run_chunks(chunks, blocks(p, chunks, gather="once"), epilogue, sink)
    loss = (w_all.to(torch.float64) * D.to(torch.float64)).sum() * (coef / normalizer)
    if hard:
        loss = loss - lp_s.sum(dtype=torch.float64) * (hard_loss_weight / normalizer)
    return SinglePassResult(loss.to(f32), D, lp_s, lp_t, sink.finish())


def _single_pass_torch_rows(p: SparseProblem, chunks: list[tuple[int, int]],
                     chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                     coef: float, normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                     sampled_signal: bool = False, hard_loss_weight: float = 0.0) -> SinglePassResult:
    """:func:`single_pass_loss` with the torch row math (:func:`coarse_grained_rows`, float64) and any
    ``chunk_weights`` callable: ~110 launches per chunk, one host-visible call per chunk.  Kept for weight
    functions the fused pass does not know and for rows of more than ``MAX_ROW_BLOCK_K`` ids."""
    grads = grads_of(p, chunks, need_hidden, need_weight, need_bias)
    totals = SinglePassTotals(p.n_rows, torch.float32, p.head.hidden.device, with_targets=p.target_ids is not None,
                              coef=coef, normalizer=normalizer, temperature=p.temperature,
                              hard_loss_weight=hard_loss_weight, sampled_signal=sampled_signal)

    def epilogue(c):
        start, stop, x = c.start, c.stop, c.logits[0]
        t, slope, slope_y = _chunk_terms(p, x, start, stop)
        coefs = totals.add(t, start, stop, chunk_weights, grads.active)  # weights see the float32 values reported
        if coefs is None:
            return None
        return _grad_block(p, x, start, stop, t.lse_tail, coefs, c.grad_block(), slope, slope_y)

    run_chunks(chunks, blocks(p, chunks), epilogue, grads)
    return SinglePassResult(totals.loss(torch.float32), totals.D, totals.lp_s, totals.lp_t, grads.finish())
