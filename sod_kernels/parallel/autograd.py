"""Autograd Functions of the vocabulary-parallel functions: statistics forward, recomputing backward.

Forward (each rank): the partial statistics of its own vocabulary columns
(:mod:`sod_kernels.parallel.stats`), one all-gather of those ``O(tokens)`` floats, and the merge into
the full-vocabulary statistics, identical on every rank.  Backward (each rank): the single-process backend's
backward on the rank's shard with the *global* statistics (per column, ``d(logits)`` only needs the row's
global log-sum-exp, maxima and centre), which yields exactly this rank's rows of ``d(weight)`` and
``d(bias)`` and this rank's share of ``d(hidden)``; with ``reduce_hidden_grad`` the shares are all-reduced
so every rank holds the single-process ``d(hidden)``.  Every rank must run backward on the same loss (the
all-reduce is a collective).  First-order only.

The generalized JSD adds a second forward round (:mod:`sod_kernels.parallel.jsd`); with the hard-label term the
student's target log-prob is a differentiable output whose gradient joins the same backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dense.autograd import student_grads
from ..core.options import input_grads
from ..core.runtime import no_autocast, refuse_double_backward, zero_student_grads
from .jsd import JSDFrame, jsd_partials_torch, jsd_shard_backward_torch, merge_jsd
from .layout import ShardLayout, all_reduce_hidden_grad, gather_stats
from .stats import (kl_partials_torch, kl_partials_triton, logprob_partials_torch, logprob_partials_triton, merge_kl,
                    merge_logprob, owned_targets)


@dataclass(frozen=True)
class ParallelSetup:
    """Options of one call: the layout, the backend (``"torch"`` / ``"triton"``), temperature, rows per
    chunk, whether backward all-reduces ``d(hidden)``; ``divergence`` (``"reverse_kl"``, ``"forward_kl"``, or
    ``"jsd"`` with ``beta``) and ``hard_label`` (distillation losses) or ``with_entropy`` (log-probs)."""

    layout: ShardLayout
    backend: str
    temperature: float
    chunk_size: int | None
    reduce_hidden_grad: bool
    divergence: str = "reverse_kl"
    with_entropy: bool = False
    student_softcap: float | None = None  # cap tanh(x / cap) of the raw logits before 1/tau (log-probs: the model's)
    teacher_softcap: float | None = None
    beta: float = 0.5                     # the generalized JSD's weight (divergence "jsd": 0 < beta < 1)
    hard_label: bool = False              # the student's log-prob of the target carries a gradient (hard term)


def finish_hidden(setup: ParallelSetup, d_hidden, row_index):
    if d_hidden is None or not setup.reduce_hidden_grad:
        return d_hidden
    return all_reduce_hidden_grad(setup.layout, d_hidden, row_index)


class VocabParallelDivergence(torch.autograd.Function):
    """``D[i]`` of the rows ``row_index`` over the full (sharded) vocabulary.

    Inputs: student_hidden ``[N, Hs]`` (replicated), this rank's student_weight ``[Vr, Hs]`` and bias ``[Vr]``
    or None, teacher_hidden ``[N, Ht]``, teacher_weight ``[>= Vr, Ht]`` and bias or None, row_index ``[Na]``
    int64, target ids minus ``vocab_start`` ``[N]`` int64 or None, a :class:`ParallelSetup`.
    Outputs (``[Na]``; float32, float64 for float64 inputs): D (differentiable), lse_student, lse_teacher,
    logp_student(y), logp_teacher(y) (the last two empty without targets; logp_student(y) is differentiable
    with ``setup.hard_label``).

    Forward: the KL statistics round (for ``"jsd"`` the reverse-KL partials, of which only the maxima, norms,
    lse and target logits are used), then for ``"jsd"`` the second round of :mod:`sod_kernels.parallel.jsd`.
    Backward: the KLs use the dense backend's backward on the shard (plus, for the hard term, the log-prob
    backward of :func:`hard_label_grads`: one more pass of the student's products); ``"jsd"`` one chunked PyTorch
    sweep that forms both terms.
    """

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, row_index, y_local, setup: ParallelSetup):
        jsd = setup.divergence == "jsd"
        forward_kl = setup.divergence == "forward_kl"
        partials = kl_partials_triton if setup.backend == "triton" else kl_partials_torch
        with no_autocast(sh.device):
            part = partials(sh, sw, sb, th, tw, tb, row_index, y_local, forward_kl=forward_kl,
                            temperature=setup.temperature, chunk_size=setup.chunk_size,
                            student_softcap=setup.student_softcap, teacher_softcap=setup.teacher_softcap)
            stats = merge_kl(gather_stats(setup.layout, part), forward_kl=forward_kl)
            D, frame = stats.D, stats.frame
            if jsd:
                D, frame = jsd_round(setup, sh, sw, sb, th, tw, tb, row_index, stats)
        if stats.zy_s is not None:
            lp_s, lp_t = stats.zy_s - stats.lse_s, stats.zy_t - stats.lse_t
        else:
            lp_s, lp_t = D.new_empty(0), D.new_empty(0)
        ctx.save_for_backward(sh, sw, sb, th, tw, tb, row_index, y_local, stats.lse_s, stats.lse_t, D, frame)
        ctx.setup = setup
        ctx.mark_non_differentiable(stats.lse_s, stats.lse_t, lp_t)
        if not setup.hard_label:
            ctx.mark_non_differentiable(lp_s)
        return D, stats.lse_s, stats.lse_t, lp_s, lp_t

    @staticmethod
    def backward(ctx, grad_D, grad_lse_s, grad_lse_t, grad_lp_s, grad_lp_t):
        refuse_double_backward("vocab_parallel_sod_loss")
        sh, sw, sb, th, tw, tb, row_index, y_local, lse_s, lse_t, D, frame = ctx.saved_tensors
        setup: ParallelSetup = ctx.setup
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not setup.hard_label or grad_lp_s is None or grad_lp_s.numel() == 0:
            grad_lp_s = None
        if row_index.numel() == 0 or (grad_D is None and grad_lp_s is None):
            return input_grads(ctx, zero_student_grads(sh, sw, sb, need_h, need_w, need_b))
        with no_autocast(sh.device):
            if setup.divergence == "jsd":
                dh, dw, db = jsd_shard_backward_torch(
                    sh, sw, sb, th, tw, tb, row_index, JSDFrame.unstacked(frame), grad_D, beta=setup.beta,
                    temperature=setup.temperature, need_hidden=need_h, need_weight=need_w, need_bias=need_b,
                    y_local=y_local, grad_lp=grad_lp_s, chunk_size=setup.chunk_size,
                    student_softcap=setup.student_softcap, teacher_softcap=setup.teacher_softcap)
            else:
                caps = {k: v for k, v in (("student_softcap", setup.student_softcap),
                                          ("teacher_softcap", setup.teacher_softcap)) if v is not None}
                dh, dw, db = student_grads(ctx, setup, (sh, sw, sb, th, tw, tb, row_index, lse_s, lse_t, D), grad_D,
                                           dict(frame=frame, chunk_size=setup.chunk_size, **caps))
                if grad_lp_s is not None:
                    hard = hard_label_grads(setup, sh, sw, sb, row_index, y_local, lse_s, grad_lp_s, need_h, need_w,
                                            need_b)
                    dh, dw, db = (add_grads(a, b) for a, b in zip((dh, dw, db), hard))
            if need_h:
                dh = finish_hidden(setup, dh, row_index)
        return input_grads(ctx, (dh, dw, db))


def jsd_round(setup: ParallelSetup, sh, sw, sb, th, tw, tb, row_index, stats):
    """The JSD's second round (:mod:`sod_kernels.parallel.jsd`): this rank's ``(D', c')``, one all-gather, the
    rank-order sums.  Returns ``(D [Na], frame [5, Na])`` (the frame of :class:`~sod_kernels.parallel.jsd.JSDFrame`
    for the backward)."""
    frame = JSDFrame.from_stats(stats)
    part = jsd_partials_torch(sh, sw, sb, th, tw, tb, row_index, frame, beta=setup.beta,
                              temperature=setup.temperature, chunk_size=setup.chunk_size,
                              student_softcap=setup.student_softcap, teacher_softcap=setup.teacher_softcap)
    D, c = merge_jsd(gather_stats(setup.layout, part))
    return D, frame._replace(c=c).stacked()


def hard_label_grads(setup: ParallelSetup, hidden, weight, bias, row_index, y_local, lse, grad_lp, need_h, need_w,
                     need_b):
    """This rank's gradients of ``sum_i grad_lp[i] log p_s(y_i)`` (the hard-label term) from the global ``lse``:
    the backend's token log-prob backward on the shard (``d(logits) = grad_lp (onehot(y) - p_s) / tau``, the
    onehot on the rank owning ``y``).  ``d(hidden)`` is this rank's share (not all-reduced)."""
    grad_lp = grad_lp.contiguous()
    if setup.backend == "triton":
        from ..logprobs.triton_backend import logprob_backward
        return logprob_backward(hidden, weight, bias, row_index, y_local, lse, grad_lp,
                                temperature=setup.temperature, need_hidden=need_h, need_weight=need_w,
                                need_bias=need_b, chunk_size=setup.chunk_size, softcap=setup.student_softcap)
    return logprob_shard_backward_torch(hidden, weight, bias, row_index, y_local, lse, lse, lse, grad_lp, None,
                                        temperature=setup.temperature, need_hidden=need_h, need_weight=need_w,
                                        need_bias=need_b, chunk_size=setup.chunk_size, softcap=setup.student_softcap)


def add_grads(a, b):
    """``a + b`` where both are given, else the one given (or None)."""
    if a is None:
        return b
    return a if b is None else a + b


def logprob_shard_backward_torch(hidden, weight, bias, row_index, y_local, lse, big, mean, grad_logp, grad_entropy, *,
                                 temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                                 chunk_size: int | None = None, softcap: float | None = None):
    """This rank's gradients of ``sum_i grad_logp[i] logp[i] (+ grad_entropy[i] H[i])`` (chunked PyTorch).

    Per row, on this rank's columns: ``d(logits) = (a (onehot(y) - p) - e p ((z - M) - mean)) / tau`` with
    the global ``lse``, max ``M`` and shifted mean (``onehot(y)`` only where this rank owns ``y``).  Returns
    ``(d_hidden [N, H] partial, d_weight [Vr, H], d_bias [Vr])`` in the inputs' dtypes (None where not needed).
    With ``softcap`` the logits are capped and ``d(logits)`` is multiplied by the cap's slope.
    """
    from ..core.chunks import even_chunks
    from ..core.loop import TileGrads, TorchRows, run_chunks
    from ..core.rows import chunk_row_index
    from ..core.tiles import compute_dtype, rows_per_chunk, tile_logits_and_slope
    from ..logprobs.token_logprobs import MIN_CHUNK_ROWS
    from .stats import in_dtype

    dt = compute_dtype(hidden.dtype)
    V = weight.shape[0]
    w, b = in_dtype(weight, bias, V, dt)
    grads = TileGrads(hidden, w, bias, dt, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                      like=(hidden, weight, bias))
    if not grads.active:
        return grads.finish()
    C = rows_per_chunk(V, chunk_size) if chunk_size is not None else max(rows_per_chunk(V), MIN_CHUNK_ROWS)

    def epilogue(c):
        start, stop = c.start, c.stop
        z, slope = tile_logits_and_slope(c.hidden[0], w, b, temperature, softcap)
        p = (z - lse[start:stop, None]).exp_()
        a = grad_logp[start:stop].to(dt) / temperature
        dx = p * (-a[:, None])
        local, owned = owned_targets(y_local[c.rows], 0, V)
        hit = torch.nonzero(owned).squeeze(1)
        dx[hit, local[hit]] += a[hit]
        if grad_entropy is not None:
            e = grad_entropy[start:stop].to(dt) / temperature
            centred = z.sub_(big[start:stop, None]).sub_(mean[start:stop, None])
            dx -= e[:, None] * p * centred
        c.fold_tile(dx, slice(0, V), w, slope)   # one tile: the shard's whole vocabulary

    rows_idx, contiguous = chunk_row_index(row_index, hidden.shape[0])
    with torch.no_grad():
        run_chunks(even_chunks(row_index.numel(), C), TorchRows((hidden,), rows_idx, contiguous, dt), epilogue, grads)
    return grads.finish()


class VocabParallelLogprobs(torch.autograd.Function):
    """``log softmax(z)[y]`` (and the entropy) of the rows ``row_index`` over the full (sharded) vocabulary.

    Inputs: hidden ``[N, H]`` (replicated), this rank's weight ``[Vr, H]`` and bias ``[Vr]`` or None,
    row_index ``[Na]`` int64, target ids minus ``vocab_start`` ``[N]`` int64, a :class:`ParallelSetup`.
    Outputs ``logp [Na]`` and ``entropy [Na]`` (empty without ``with_entropy``), both differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, row_index, y_local, setup: ParallelSetup):
        partials = logprob_partials_triton if setup.backend == "triton" else logprob_partials_torch
        with no_autocast(hidden.device):
            part = partials(hidden, weight, bias, row_index, y_local, temperature=setup.temperature,
                            with_entropy=setup.with_entropy, chunk_size=setup.chunk_size,
                            softcap=setup.student_softcap)
            stats = merge_logprob(gather_stats(setup.layout, part), with_entropy=setup.with_entropy)
        entropy = stats.entropy if stats.entropy is not None else stats.logp.new_empty(0)
        ctx.save_for_backward(hidden, weight, bias, row_index, y_local, stats.lse, stats.max, stats.mean)
        ctx.setup = setup
        return stats.logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        refuse_double_backward("vocab_parallel_token_logprobs")
        hidden, weight, bias, row_index, y_local, lse, big, mean = ctx.saved_tensors
        setup: ParallelSetup = ctx.setup
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_entropy is None) or row_index.numel() == 0:
            return input_grads(ctx, zero_student_grads(hidden, weight, bias, need_h, need_w, need_b))
        if grad_logp is None:
            grad_logp = lse.new_zeros(lse.shape)
        if not setup.with_entropy:
            grad_entropy = None
        with no_autocast(hidden.device):
            if setup.backend == "triton":
                from ..logprobs.triton_backend import logprob_backward
                extra = {} if grad_entropy is None else {"grad_entropy": grad_entropy.contiguous(),
                                                         "frame": torch.stack([big, mean])}
                dh, dw, db = logprob_backward(hidden, weight, bias, row_index, y_local, lse, grad_logp.contiguous(),
                                              temperature=setup.temperature, need_hidden=need_h, need_weight=need_w,
                                              need_bias=need_b, chunk_size=setup.chunk_size,
                                              softcap=setup.student_softcap, **extra)
            else:
                dh, dw, db = logprob_shard_backward_torch(
                    hidden, weight, bias, row_index, y_local, lse, big, mean, grad_logp.contiguous(),
                    None if grad_entropy is None else grad_entropy.contiguous(), temperature=setup.temperature,
                    need_hidden=need_h, need_weight=need_w, need_bias=need_b, chunk_size=setup.chunk_size,
                    softcap=setup.student_softcap)
            dh = finish_hidden(setup, dh, row_index)
        return input_grads(ctx, (dh, dw, db))
