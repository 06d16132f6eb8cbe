"""Vocabulary-parallel form of :func:`sod_kernels.fused_sparse_sod_loss`: docs/scaling.md.

The student's lm_head rows are sharded by vocabulary across a ``torch.distributed`` group (as for
:func:`sod_kernels.vocab_parallel_sod_loss`); the teacher is its top-k ids and log-probs, the same on every
rank.  The coarse-grained divergence of a token needs only the student's logits at the ``k`` ids and the
log-sum-exp of its other logits (:mod:`sod_kernels.sparse.rows`), so each rank computes, over its own
columns (``backend="triton"``, the default for CUDA tensors: :mod:`sod_kernels.sparse.triton_backend`'s logit blocks
and epilogue kernels, with the ids another rank holds passed as ``-1``; ``"torch"``: chunked PyTorch,
:mod:`sod_kernels.sparse.torch_backend`'s tiles):

- the running maximum and sum of exponentials of its *tail* columns (its columns minus the ids it owns);
- its owned ids' logits (zero elsewhere) and the sampled token's logit if it owns it;

then one all-gather of the two tail statistics (merged in rank order on every rank) and one all-reduce of
the ``k + 1`` logits (each entry comes from exactly one rank: the sum adds zeros, it is exact) give every rank
the single-process row terms.  Backward: each rank recomputes its tiles and forms ``d(logits)`` of its columns
from the global terms (the backend's ``sparse_backward`` with its ids shifted to the shard), then
``d(hidden)`` is all-reduced as in the dense form.  ``2 + k + 1`` floats per distilled token travel in the
forward, never tokens x vocabulary.

``divergence="jsd"`` needs nothing more: the generalized JSD of the ``k + 1`` cells comes from the same row terms
(:func:`sod_kernels.sparse.rows.coarse_grained_rows`).  The hard-label term (``hard_loss_weight``) reads
``log p_s(y)`` from the same terms; in backward its ``-p_s`` part joins the per-row coefficients of the tail and
the ids (:func:`with_hard_label`) and its ``onehot(y)`` part is an ``O(tokens x H)`` fold on the rank owning ``y``
(:func:`target_logit_grads`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..core.chunks import even_chunks
from ..core.loop import TorchRows, run_chunks
from ..core.options import input_grads
from ..core.rows import chunk_row_index
from ..core.runtime import check_softcap, no_autocast, refuse_double_backward, zero_student_grads
from ..core.tiles import compute_dtype, grads_like, rows_per_tile, vocab_tile
from ..core.validation import check_lm_head, check_same_device
from ..logprobs.token_logprobs import resolve_logprob_backend
from ..sparse.rows import SparseForward, coarse_grained_rows
from ..sparse.torch_backend import sparse_backward as torch_sparse_backward
from ..sparse.torch_backend import sweep_tiles
from ..sparse.validation import check_topk_shapes, check_topk_values
from ..steps.finish import check_loss_options, check_targets_and_steps, finish_loss, jsd_and_hard_options
from ..steps.weights import DEFAULT_DELTA, DEFAULT_EPSILON
from .autograd import ParallelSetup, add_grads, finish_hidden
from .checks import (COMMON_FIELDS, check_targets_in_vocab, checksum, common, distillation_fields, distilled_rows,
                     exchange, rows_and_targets)
from .layout import ShardLayout, dtype_code, gather_stats
from .stats import owned_targets

SPARSE_FIELDS = COMMON_FIELDS + ("k", "teacher log-prob dtype", "divergence", "step_divergence", "epsilon",
                                 "delta", "coef", "return_stats", "token_weights given", "token_weights (checksum)",
                                 "step_ids (checksum)", "teacher_topk_ids (checksum)",
                                 "teacher_topk_logprobs (checksum)", "beta", "hard_loss_weight")


def shard_partials(hidden, weight, bias, row_index, ids_local, y_local, *, temperature: float,
                   chunk_size: int | None, softcap: float | None = None):
    """This rank's part of the row terms, over its ``Vr`` columns.

    ``ids_local [Na, k]`` / ``y_local [Na]``: global ids minus ``vocab_start`` (owned where in ``[0, Vr)``).
    Returns ``(tail [2, Na], owned_logits [Na, k + 1])``: the tail's running maximum and sum of exponentials
    (maximum ``MIN_LOGIT`` and sum 0 where the rank has no tail column), and the logits at the owned ids and
    at the owned sampled token (0 where not owned; the last column is the sampled token's).  ``softcap``:
    ``cap tanh(x / cap)`` of the raw logits before ``1/tau``, or None.
    """
    Vr, dt, device = weight.shape[0], compute_dtype(hidden.dtype), hidden.device
    w, b = weight.to(dt), None if bias is None else bias.to(dt)
    Na, k = ids_local.shape
    tail = torch.empty(2, Na, dtype=dt, device=device)
    owned = torch.zeros(Na, k + 1, dtype=dt, device=device)
    BV = vocab_tile(Vr)

    def epilogue(c):
        start, stop = c.start, c.stop
        y = None if y_local is None else y_local[start:stop]
        z_ids, z_y, m, l = sweep_tiles(c.hidden[0], w, b, ids_local[start:stop], y, Vr, BV, temperature, softcap)
        owned[start:stop, :k] = z_ids
        if z_y is not None:
            owned[start:stop, k] = z_y
        tail[0, start:stop], tail[1, start:stop] = m, l

    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    with torch.no_grad():
        run_chunks(even_chunks(Na, rows_per_tile(Vr, chunk_size)), TorchRows((hidden,), rows_idx, contiguous, dt),
                   epilogue)
    return tail, owned


def shard_ids(ids_local: torch.Tensor, rows: int) -> torch.Tensor:
    """``ids_local`` where this rank's ``rows`` columns hold them, ``-1`` elsewhere (the kernels skip ``-1``)."""
    return torch.where((ids_local >= 0) & (ids_local < rows), ids_local, torch.full_like(ids_local, -1))


def shard_partials_triton(hidden, weight, bias, row_index, ids_local, y_local, *, temperature: float,
                          chunk_size: int | None, softcap: float | None = None):
    """:func:`shard_partials` on the GPU path: per row chunk one float32 logit block (cuBLAS), the owned
    sampled token's logit read from it, the owned ids gathered and masked to ``-inf`` by
    ``sparse_gather_mask_kernel`` (the others skipped), and the online statistics of what is left, the tail.
    Same outputs, float32."""
    from ..core.kernels import logprob_row_stats
    from ..core.loop import run_chunks
    from ..core.tiles import apply_softcap
    from ..sparse.kernels import gather_and_mask
    from ..sparse.triton_backend import SparseProblem, blocks

    rows = weight.shape[0]
    p = SparseProblem.build(hidden, weight, bias, row_index, shard_ids(ids_local, rows), None, None, "reverse_kl",
                            temperature)
    Na, k = ids_local.shape
    tail = torch.empty(2, Na, dtype=torch.float32, device=hidden.device)
    owned = torch.zeros(Na, k + 1, dtype=torch.float32, device=hidden.device)

    def epilogue(c):
        start, stop, x = c.start, c.stop, c.logits[0]
        if y_local is not None:  # read before the ids are masked
            y = y_local[start:stop]
            col = y.clamp(0, rows - 1)
            z = x.gather(1, col[:, None]).squeeze(1)
            if p.head.used_bias is not None:
                z = z + p.head.used_bias[col].float()
            owned[start:stop, k] = torch.where((y >= 0) & (y < rows), apply_softcap(z, softcap) / temperature,
                                               torch.zeros_like(z))
        owned[start:stop, :k] = gather_and_mask(x, p.head.used_bias, p.ids[start:stop], temperature=temperature,
                                                softcap=softcap)[0]
        stats = logprob_row_stats(x, p.head.used_bias, temperature=temperature, with_entropy=False, softcap=softcap)
        tail[0, start:stop] = stats.max
        tail[1, start:stop] = (stats.lse - stats.max).exp()  # the sum of exponentials; 0 for an empty tail

    chunks = p.chunks(False, chunk_size)
    run_chunks(chunks, blocks(p, chunks), epilogue)
    return tail, owned


def merge_tails(gathered: torch.Tensor) -> torch.Tensor:
    """``[2, Na, world]`` (maximum, sum) of every rank -> the tail log-sum-exp ``[Na]`` (``-inf`` if empty),
    summed in rank order."""
    m, l = gathered[0], gathered[1]
    big = m.amax(-1)
    total = (l * (m - big[:, None]).exp()).sum(-1)
    return big + total.log()


class VocabParallelSparseDivergence(torch.autograd.Function):
    """``D[i]`` of the rows ``row_index`` against the teacher's top-k, the student's lm_head sharded.

    Inputs: student_hidden ``[N, H]`` (replicated), this rank's weight ``[Vr, H]`` and bias ``[Vr]`` or None,
    row_index ``[Na]``, ids minus ``vocab_start`` ``[Na, k]``, the teacher's log-probs ``[Na, k]``, the sampled
    tokens minus ``vocab_start`` ``[Na]`` or None, ``vocab`` (the full V), a :class:`ParallelSetup`.
    Outputs (``[Na]``; float32, float64 for float64 inputs): D (differentiable), logp_student(y),
    logp_teacher(y) (empty without targets).
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, row_index, ids_local, logprobs, y_local, vocab, setup: ParallelSetup):
        layout: ShardLayout = setup.layout
        partials = shard_partials_triton if setup.backend == "triton" else shard_partials
        tail, owned = partials(sh, sw, sb, row_index, ids_local, y_local, temperature=setup.temperature,
                               chunk_size=setup.chunk_size, softcap=setup.student_softcap)
        lse_tail = merge_tails(gather_stats(layout, tail))
        if layout.world > 1 and owned.numel():
            dist.all_reduce(owned, op=dist.ReduceOp.SUM, group=layout.group)
        k = ids_local.shape[1]
        with_targets = y_local is not None
        z_ids = owned[:, :k]
        t = coarse_grained_rows(z_ids, lse_tail, logprobs, divergence=setup.divergence, beta=setup.beta,
                                vocab=vocab, ids=ids_local if with_targets else None,
                                target_ids=y_local if with_targets else None,
                                z_target=owned[:, k] if with_targets else None)
        dt = compute_dtype(sh.dtype)
        saved = SparseForward.empty(row_index.numel(), k, sh.device, dt, with_targets)
        saved.store(0, row_index.numel(), t)
        ctx.setup, ctx.saved = setup, saved
        # The hard term's d(lp_s(y)) / d(z) = onehot(y) - p_s needs the student's cell probabilities.
        ctx.cells = torch.cat([t.prob_ids, t.prob_tail[:, None]], 1).to(dt) if setup.hard_label else None
        ctx.save_for_backward(sh, sw, sb, row_index, ids_local, y_local)
        lp_s = saved.lp_s if with_targets else saved.D.new_empty(0)
        lp_t = saved.lp_t if with_targets else saved.D.new_empty(0)
        ctx.mark_non_differentiable(lp_t)
        if not setup.hard_label:
            ctx.mark_non_differentiable(lp_s)
        return saved.D, lp_s, lp_t

    @staticmethod
    def backward(ctx, grad_D, grad_lp_s, grad_lp_t):
        refuse_double_backward("vocab_parallel_sparse_sod_loss")
        sh, sw, sb, row_index, ids_local, y_local = ctx.saved_tensors
        need = ctx.needs_input_grad
        setup: ParallelSetup = ctx.setup
        if not setup.hard_label or grad_lp_s is None or grad_lp_s.numel() == 0:
            grad_lp_s = None
        if row_index.numel() == 0 or (grad_D is None and grad_lp_s is None):
            d_hidden, d_weight, d_bias = zero_student_grads(sh, sw, sb, need[0], need[1], need[2])
        else:
            if setup.backend == "triton":
                from ..sparse.triton_backend import sparse_backward

                ids = shard_ids(ids_local, sw.shape[0])
            else:
                sparse_backward, ids = torch_sparse_backward, ids_local
            saved, grad_rows = ctx.saved, grad_D
            if grad_lp_s is not None:
                saved, grad_rows = with_hard_label(saved, ctx.cells, grad_D, grad_lp_s)
            with no_autocast(sh.device):
                d_hidden, d_weight, d_bias = sparse_backward(
                    sh, sw, sb, row_index, ids, saved, grad_rows, temperature=setup.temperature,
                    need_hidden=need[0], need_weight=need[1], need_bias=need[2], chunk_size=setup.chunk_size,
                    softcap=setup.student_softcap)
                if grad_lp_s is not None:
                    onehot = target_logit_grads(sh, sw, sb, row_index, y_local, grad_lp_s,
                                                temperature=setup.temperature, softcap=setup.student_softcap,
                                                need_hidden=need[0], need_weight=need[1], need_bias=need[2])
                    d_hidden, d_weight, d_bias = (add_grads(a, b) for a, b in zip((d_hidden, d_weight, d_bias),
                                                                                  onehot))
        if need[0] and d_hidden is None:
            d_hidden = torch.zeros_like(sh)
        d_hidden = finish_hidden(setup, d_hidden, row_index) if need[0] else None
        return input_grads(ctx, (d_hidden, d_weight, d_bias))


def with_hard_label(saved: SparseForward, cells: torch.Tensor, grad_D, grad_lp) -> tuple[SparseForward, torch.Tensor]:
    """Fold the hard term's ``-grad_lp p_s`` into the per-row coefficients of the sparse backward: ``grad_ids <-
    grad_D grad_ids - grad_lp q``, ``grad_tail <- grad_D grad_tail - grad_lp Q`` (``cells [Na, k + 1]`` = the
    student's ``(q, Q)``), with a unit upstream gradient.  The ``+grad_lp onehot(y)`` part is
    :func:`target_logit_grads`.  Returns ``(saved, grad_divergence [Na])``."""
    dt = saved.grad_ids.dtype
    g_d = (torch.zeros_like(saved.D) if grad_D is None else grad_D).to(dt)
    g_y = grad_lp.to(dt)
    k = saved.grad_ids.shape[1]
    grad_ids = g_d[:, None] * saved.grad_ids - g_y[:, None] * cells[:, :k]
    grad_tail = g_d * saved.grad_tail - g_y * cells[:, k]
    return dataclasses.replace(saved, grad_ids=grad_ids, grad_tail=grad_tail), torch.ones_like(g_d)


def target_logit_grads(hidden, weight, bias, row_index, y_local, grad_lp, *, temperature: float,
                       softcap: float | None, need_hidden: bool, need_weight: bool, need_bias: bool):
    """This rank's gradients of ``sum_i grad_lp[i] z_s(y_i)`` (the onehot part of ``d log p_s(y)``) over the rows
    whose target it owns: ``O(Na H)``, no logit block.  ``y_local [Na]`` the targets of the rows ``row_index``
    minus this rank's first id; ``grad_lp [Na]``.  On raw logits ``x``: ``grad_lp / tau`` times the soft-cap's slope
    ``cosh(x / cap)^-2``.  The weight / bias rows of repeated targets are summed deterministically
    (:func:`sum_into_rows`).  Returns ``(d_hidden [N, H] share, d_weight [Vr, H],
    d_bias [Vr])`` in the inputs' dtypes (None where not needed)."""
    V, dt = weight.shape[0], compute_dtype(hidden.dtype)
    local, owned = owned_targets(y_local, 0, V)
    hit = torch.nonzero(owned).squeeze(1)
    rows, cols = row_index[hit], local[hit]
    h, w = hidden[rows].to(dt), weight[cols].to(dt)
    g = grad_lp[hit].to(dt) / temperature
    if softcap is not None:
        x = (h * w).sum(1)
        if bias is not None:
            x = x + bias[cols].to(dt)
        g = g * torch.cosh(x / softcap).square().reciprocal()
    d_hidden = d_weight = d_bias = None
    if need_hidden:
        d_hidden = torch.zeros(hidden.shape, dtype=dt, device=hidden.device).index_copy_(0, rows, g[:, None] * w)
    if need_weight:
        d_weight = sum_into_rows(torch.zeros(weight.shape, dtype=dt, device=weight.device), cols, g[:, None] * h)
    if need_bias and bias is not None:
        d_bias = sum_into_rows(torch.zeros(V, dtype=dt, device=weight.device), cols, g)
    return grads_like((d_hidden, d_weight, d_bias), (hidden, weight, bias))


def sum_into_rows(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += values[i]`` (repeated indices summed) in a fixed order, no float atomics: ``index_add_``
    on the CPU (sequential), ``index_put_(accumulate=True)`` elsewhere (CUDA sorts the indices and sums each
    run in order)."""
    if out.device.type == "cpu":
        return out.index_add_(0, index, values)
    return out.index_put_((index,), values, accumulate=True)


def prepare_sparse(agreed: dict, student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs,
                   response_mask, *, step_ids, target_ids, token_weights, divergence, step_divergence, epsilon, delta,
                   temperature, coef, student_bias, reduction, return_stats, chunk_size, check_inputs,
                   reduce_hidden_grad, backend, student_softcap=None, beta=0.5, hard_loss_weight=0.0) -> dict:
    """The checks of ``fused_sparse_sod_loss`` on one rank (the id range is checked after the exchange,
    against the full vocabulary) -> what the computation needs."""
    step_divergence, epsilon, delta, temperature, coef = check_loss_options(
        divergence, step_divergence, token_weights, reduction, backend, chunk_size, epsilon, delta, temperature,
        coef)
    divergence, beta, hard_loss_weight = jsd_and_hard_options(divergence, beta, hard_loss_weight, target_ids)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    check_lm_head(student_hidden, student_weight, student_bias, hidden_name="student_hidden",
                  weight_name="student_weight", bias_name="student_bias")
    impl = resolve_logprob_backend(backend, student_hidden, "student_hidden")
    lead = tuple(student_hidden.shape[:-1])
    k = check_topk_shapes(teacher_topk_ids, teacher_topk_logprobs, lead, 1 << 62)  # k <= V: after the exchange
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
                      response_mask=response_mask, step_ids=step_ids, target_ids=target_ids,
                      student_bias=student_bias, token_weights=token_weights)
    ids = check_targets_and_steps(step_divergence, target_ids, lead, 1 << 62, response_mask, step_ids,
                                  token_weights, check_inputs)
    single = student_hidden.dim() == 2
    step_rows, row_index, given = distilled_rows(ids, single, token_weights, student_hidden.dtype)
    topk = teacher_topk_ids.reshape(-1, k).index_select(0, row_index).to(torch.int64).contiguous()
    logprobs = teacher_topk_logprobs.detach().reshape(-1, k).index_select(0, row_index).contiguous()
    y = None if target_ids is None else target_ids.reshape(-1).index_select(0, row_index).to(torch.int64)
    common(agreed, student_hidden, student_weight, student_bias, lead, temperature=temperature,
           reduction=reduction, impl=impl, chunk_size=chunk_size, check_inputs=check_inputs,
           reduce_hidden_grad=reduce_hidden_grad, softcap=student_softcap)
    rows_and_targets(agreed, row_index, y, check_inputs=check_inputs, active_targets_only=False)
    agreed["k"] = float(k)
    agreed["teacher log-prob dtype"] = dtype_code(teacher_topk_logprobs.dtype)
    distillation_fields(agreed, divergence, step_divergence, epsilon, delta, coef, return_stats, given, step_rows,
                        beta=beta, hard_loss_weight=hard_loss_weight)
    agreed["teacher_topk_ids (checksum)"] = checksum(topk)
    agreed["teacher_topk_logprobs (checksum)"] = checksum(logprobs)
    return dict(impl=impl, single=single, step_rows=step_rows, row_index=row_index, topk=topk, logprobs=logprobs, y=y,
                given=given, k=k, step_divergence=step_divergence, epsilon=epsilon, delta=delta,
                temperature=temperature, coef=coef, softcap=student_softcap, divergence=divergence, beta=beta,
                hard_loss_weight=hard_loss_weight,
                sh=student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous())


def vocab_parallel_sparse_sod_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                   teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                                   response_mask: torch.Tensor | None = None, *, process_group=None,
                                   vocab_start: int | None = None, step_ids: torch.Tensor | None = None,
                                   target_ids: torch.Tensor | None = None, token_weights: torch.Tensor | None = None,
                                   divergence: str = "reverse_kl", step_divergence: str | None = None,
                                   epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA,
                                   temperature: float = 1.0, coef: float = 1.0,
                                   student_bias: torch.Tensor | None = None, reduction: str = "token_mean",
                                   return_stats: bool = False, backend: str = "auto", chunk_size: int | None = None,
                                   check_inputs: bool = True, reduce_hidden_grad: bool = True,
                                   student_softcap: float | None = None, beta: float = 0.5,
                                   hard_loss_weight: float = 0.0):
    """:func:`sod_kernels.fused_sparse_sod_loss` with the student's lm_head sharded by vocabulary.

    Arguments are those of ``fused_sparse_sod_loss`` (the top-k ids and ``target_ids`` are global ids in
    ``[0, V)``, the same on every rank) plus ``process_group``, ``vocab_start`` and ``reduce_hidden_grad`` as in
    :func:`sod_kernels.vocab_parallel_sod_loss`; ``student_weight`` ``[Vr, H]`` / ``student_bias`` ``[Vr]`` are
    this rank's rows; ``student_softcap`` as in ``fused_sparse_sod_loss``.  ``backend``: ``"auto"`` (the Triton kernels for CUDA tensors of float32 / bfloat16 /
    float16, else chunked PyTorch), ``"triton"`` or ``"torch"``; every rank must pass the same.  Two passes
    (the logit blocks are recomputed in backward).

    ``divergence="jsd"`` with ``beta`` (default 0.5; ``beta`` 0 / 1 are exactly the forward / reverse KL): the
    generalized Jensen-Shannon divergence over the ``k + 1`` coarse-grained cells (SPEC sections 11 and 14), no
    extra pass or communication (the cells need only the exchanged row terms;
    :func:`sod_kernels.sparse.rows.coarse_grained_rows`).  ``hard_loss_weight`` (``lambda >= 0``, needs
    ``target_ids``) adds ``lambda * sum m (-log p_s(y)) / normalizer`` (unweighted, not times ``coef``); its
    gradient rides on the same backward sweep (plus an ``O(tokens x H)`` gather for the target's own column).
    Returns the same as ``fused_sparse_sod_loss``, identical on every rank; backward (every rank, on the same
    loss) gives ``student_weight`` / ``student_bias`` the gradient of this rank's rows.
    """
    what = "vocab_parallel_sparse_sod_loss"
    layout, p, agreed = exchange(
        what, process_group, vocab_start, student_hidden, student_weight, None, SPARSE_FIELDS,
        lambda agreed: prepare_sparse(
            agreed, student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, response_mask,
            step_ids=step_ids, target_ids=target_ids, token_weights=token_weights, divergence=divergence,
            step_divergence=step_divergence, epsilon=epsilon, delta=delta, temperature=temperature, coef=coef,
            student_bias=student_bias, reduction=reduction, return_stats=return_stats, chunk_size=chunk_size,
            check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad, backend=backend,
            student_softcap=student_softcap, beta=beta, hard_loss_weight=hard_loss_weight))
    check_targets_in_vocab(agreed, layout.vocab)
    if p["k"] > layout.vocab:
        raise ValueError(f"teacher_topk_ids lists k = {p['k']} ids per position, more than the vocabulary "
                         f"({layout.vocab}, the sum of the shards)")
    if check_inputs:  # the same values on every rank (checked by checksum): every rank raises alike
        check_topk_values(p["topk"], p["logprobs"], layout.vocab)
    hard = p["hard_loss_weight"] > 0
    setup = ParallelSetup(layout, p["impl"], p["temperature"], chunk_size, reduce_hidden_grad,
                          divergence=p["divergence"], student_softcap=p["softcap"], beta=p["beta"], hard_label=hard)
    wants_y = p["step_divergence"] == "sampled" or hard
    y_local = p["y"] - layout.vocab_start if p["y"] is not None and wants_y else None
    with no_autocast(student_hidden.device):
        D, lp_s, lp_t = VocabParallelSparseDivergence.apply(
            p["sh"], student_weight.contiguous(), None if student_bias is None else student_bias.contiguous(),
            p["row_index"], p["topk"] - layout.vocab_start, p["logprobs"], y_local, layout.vocab, setup)
    return finish_loss(None, D, lp_s, lp_t, p["row_index"], p["step_rows"], p["given"], single=p["single"],
                       step_divergence=p["step_divergence"], epsilon=p["epsilon"], delta=p["delta"], coef=p["coef"],
                       reduction=reduction, return_stats=return_stats, check_inputs=check_inputs,
                       inputs="student_hidden, student_weight or student_bias",
                       hard_loss_weight=p["hard_loss_weight"])
