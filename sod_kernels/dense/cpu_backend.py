"""The CPU single pass of ``fused_sod_loss`` (``memory="fast"``, the default on CPU tensors).

Whenever the step weights are known inside the pass (``token_weights``, ``step_divergence="none"``, or
``"kl"`` / ``"sampled"`` with row chunks cut at step boundaries; scalar reductions; a gradient wanted), the
loss and the student's gradients come from one pass over chunks of whole vocabulary rows.  Per chunk of
``C`` distilled tokens:

1. two matrix products into ``[C, V]`` blocks: ``xs = h_s W_s^T``, ``xt = h_t W_t^T`` (raw, float32 or
   float64);
2. the statistics epilogue (:func:`sod_kernels.core.cpu_epilogue.kl_stats`, compiled): row maxima first, then two
   exponentials per (token, vocabulary) pair, ``D``, the sampled-token log-probs, and in place the two
   blocks the gradient needs;
3. the chunk's weights (step means of ``D`` or of the sampled-token gap, ``w_k`` from ``d_1`` and ``d_k``:
   :class:`sod_kernels.steps.plan.InPassStepWeights`), the loss term ``sum w D`` (float64 accumulation);
4. the gradient epilogue (:func:`sod_kernels.core.cpu_epilogue.kl_grad`, compiled) writes ``d(logits)`` over
   ``xs``; two matrix products fold it: ``d(hidden)[rows] = d(logits) W_s`` and
   ``d(weight) += d(logits)^T h_s`` (``d(bias) += colsum``).

``2 N V (Hs + Ht) + 4 N V Hs`` FLOPs (the two-pass path recomputes the logits: ``2 N V (Hs + Ht)`` more)
and two ``[C, V]`` blocks (a few more with the eager epilogue) plus the ``[V, Hs]`` d(weight)
accumulator: at ``V = 32000``, ``Hs = 256`` and 512-row chunks about 170 MB.  Chunks hold :data:`CPU_CHUNK_BYTES` of
blocks (a multiple of 32 rows); with step weights a chunk grows up to :data:`CPU_MAX_CHUNK_BYTES` to hold a
whole step (or up to ``chunk_size`` rows when given), and a longer step falls back to the two-pass path.
Deterministic: fixed chunk order, fixed-order products and row-parallel reductions.

``divergence="jsd"`` (``0 < beta < 1``) runs :func:`sod_kernels.core.cpu_epilogue.jsd_stats` in step 2: whole
rows know both log-partition functions after the two sums, so the JSD is one more read of the blocks with one
more ``exp`` and one ``log1p`` per entry than the KL (``log M`` from the two shifted log-probs); its gradient
``(1 - beta) p_s (r - c)`` is the reverse-KL form of step 4.  A hard-label term (``hard_loss_weight = lambda``)
adds ``lambda * (-logp_s(y)) / normalizer`` per row to the loss and ``lambda / (normalizer tau) (p_s - onehot(y))``
(times the cap's slope) to ``d(logits)``: the softmax part inside the gradient epilogue, the one-hot entry
scattered into the row's column afterwards (one entry per row).

Dtypes: float32 and float64 compute in their own dtype; bfloat16 / float16 inputs compute in float32 (the
weights converted once per call) and get gradients in their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import cpu_epilogue
from ..core.chunks import LMHead
from ..core.cpu_pass import ComputeHead
from ..core.loop import CpuBlocks, CpuGrads, longest_chunk, run_chunks
from ..core.options import SinglePassResult
from ..core.rows import RowChunks, chunk_row_index
from ..core.tiles import apply_softcap, compute_dtype
from ..steps.cpu_plan import cpu_single_pass_plan

CPU_CHUNK_BYTES = 128 << 20       # the two [C, V] logit blocks of a chunk (512 rows at V = 32000, fp32)
CPU_MAX_CHUNK_BYTES = 256 << 20   # how far a chunk may grow to hold a whole step


def single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size, vocab, elem):
    """``(chunks, chunk_weights)`` of the CPU single pass, or None when a step is longer than the largest chunk
    (``chunk_size`` rows if given, else :data:`CPU_MAX_CHUNK_BYTES` of the two blocks): then the two-pass path
    runs (:func:`sod_kernels.steps.cpu_plan.cpu_single_pass_plan`; ``elem`` the hidden states' bytes per entry,
    the blocks hold at least 4)."""
    return cpu_single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size,
                                row_bytes=2 * vocab * max(elem, 4), budget=CPU_CHUNK_BYTES,
                                max_budget=CPU_MAX_CHUNK_BYTES)


@dataclass
class KLProblem(RowChunks):
    """The inputs of one call as the chunk loop sees them (the fields :class:`sod_kernels.dense.triton_backend.KLProblem`
    has), with the weights and biases already in the compute dtype."""

    student: LMHead
    teacher: LMHead
    row_index: torch.Tensor
    contiguous: bool
    target_ids: torch.Tensor | None
    forward_kl: bool
    temperature: float
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    beta: float | None = None  # the JSD's mixing weight (0 < beta < 1) for divergence="jsd", else None

    @classmethod
    def build(cls, sh, sw, sb, th, tw, tb, row_index, target_ids, divergence, temperature, *,
              student_softcap=None, teacher_softcap=None, beta=None) -> KLProblem:
        """The problem of one call; ``beta`` is required for (and only used by) ``divergence="jsd"``."""
        if divergence == "jsd" and (beta is None or not 0.0 < float(beta) < 1.0):
            raise ValueError(f"divergence='jsd' needs 0 < beta < 1 here (the ends are the KLs), got {beta!r}")
        vocab = sw.shape[0]
        rows, contiguous = chunk_row_index(row_index, sh.shape[0])
        return cls(LMHead(sh, sw, sb, vocab), LMHead(th, tw, tb, vocab), rows, contiguous,
                   None if target_ids is None else target_ids.to(torch.int64), divergence == "forward_kl",
                   float(temperature), student_softcap, teacher_softcap,
                   float(beta) if divergence == "jsd" else None)

    @property
    def jsd(self) -> bool:
        return self.beta is not None

    @property
    def vocab(self) -> int:
        return self.student.vocab


def _sampled(p: KLProblem, y: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, s: ComputeHead, t: ComputeHead):
    """The sampled tokens' capped, temperature-scaled logits (``[C]`` each) from the raw blocks, and the
    student cap's slope ``1 - tanh^2(x / cap)`` at them (``[C]``, None without a cap)."""
    col = y[:, None]
    xs_y = xs.gather(1, col).squeeze(1) + s.bias[y]
    zt = xt.gather(1, col).squeeze(1) + t.bias[y]
    zs, zt = apply_softcap(xs_y, p.student_softcap), apply_softcap(zt, p.teacher_softcap)
    slope = None if p.student_softcap is None else torch.cosh(xs_y / p.student_softcap).square().reciprocal()
    return zs / p.temperature, zt / p.temperature, slope


def single_pass_loss(p: KLProblem, chunks, chunk_weights, *, coef: float, normalizer: float, need_hidden: bool,
                     need_weight: bool, need_bias: bool, sampled_signal: bool = False,
                     hard_loss_weight: float = 0.0) -> SinglePassResult:
    """``L = (coef * sum_i w_i D_i + hard_loss_weight * sum_i (-logp_s(y_i))) / normalizer`` and its student
    gradients in one pass over ``chunks`` (the contract of :func:`sod_kernels.dense.triton_backend.single_pass_loss`,
    on CPU tensors; the hard-label term needs ``target_ids`` in the problem)."""
    with_hard = bool(hard_loss_weight)
    if with_hard and p.target_ids is None:
        raise ValueError("hard_loss_weight > 0 needs target_ids (the tokens whose cross-entropy is added)")
    dt = compute_dtype(p.student.hidden.dtype)
    s, t = ComputeHead(p.student, dt), ComputeHead(p.teacher, dt)
    n = p.n_rows
    D = torch.empty(n, dtype=dt)
    with_targets = p.target_ids is not None
    lp_s = torch.empty(n, dtype=dt) if with_targets else None
    lp_t = torch.empty(n, dtype=dt) if with_targets else None
    grads = CpuGrads(n, s, p.student, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                     need_bias=need_bias)
    scalar = lambda v: torch.tensor(v, dtype=dt)  # noqa: E731
    inv_temp = scalar(1.0 / p.temperature)
    beta = scalar(p.beta if p.jsd else 0.5)
    scap, tcap = scalar(p.student_softcap or 1.0), scalar(p.teacher_softcap or 1.0)
    caps = (p.student_softcap is not None, p.teacher_softcap is not None)
    total = torch.zeros((), dtype=torch.float64)
    nll_total = torch.zeros((), dtype=torch.float64)
    grad_scale = coef / (normalizer * p.temperature) * (1.0 - p.beta if p.jsd else 1.0)
    hard_scale = hard_loss_weight / (normalizer * p.temperature)
    hard = scalar(hard_scale)

    def epilogue(ch):
        start, stop, c = ch.start, ch.stop, ch.size
        xs, xt = ch.logits
        if with_targets:
            y = p.target_ids[ch.rows]
            zy_s, zy_t, slope_y = _sampled(p, y, xs, xt, s, t)
        if p.jsd:
            stats = cpu_epilogue.run_row_blocks("jsd_stats", xs, xt, s.bias, t.bias, inv_temp, scap, tcap, beta,
                                                *caps, rows=c)
        else:
            stats = cpu_epilogue.run("kl_stats", xs, xt, s.bias, t.bias, inv_temp, scap, tcap, p.forward_kl, *caps,
                                     rows=c)
        d, lse_s, lse_t, centre, sum_s, sum_t = stats
        D[start:stop] = d
        if with_targets:
            lp_s[start:stop], lp_t[start:stop] = zy_s - lse_s, zy_t - lse_t
        if with_hard:
            nll_total.sub_(lp_s[start:stop].to(torch.float64).sum())
        signal = (lp_s[start:stop] - lp_t[start:stop]).abs() if sampled_signal else d
        w = chunk_weights(start, stop, d, signal)
        total.add_((w.to(torch.float64) * d.to(torch.float64)).sum())
        if not grads.active:
            return None
        grad = ch.grad_block()   # xs, overwritten with d(logits)
        cpu_epilogue.run("kl_grad", grad, xt, centre, sum_s, sum_t, (w * grad_scale).to(dt), hard, p.forward_kl,
                         with_hard, rows=c)
        if with_hard:  # the one-hot part of lambda (p_s - onehot(y)) / tau, times the cap's slope at y
            onehot = grad.new_full((c, 1), -hard_scale) if slope_y is None else (slope_y * -hard_scale)[:, None]
            grad.scatter_add_(1, y[:, None], onehot.to(dt))
        return grad

    run_chunks(chunks, CpuBlocks((s, t), p.row_index, p.contiguous, longest_chunk(chunks)), epilogue, grads)
    loss = ((total * coef + nll_total * hard_loss_weight) / normalizer).to(dt)
    return SinglePassResult(loss, D, lp_s, lp_t, grads.finish())
