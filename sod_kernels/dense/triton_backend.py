"""GPU backend of ``fused_sod_loss``: the KL / generalized-JSD epilogue on the chunked core
(:mod:`sod_kernels.core.chunks`).

Three ways to run, all deterministic (no atomics) and none holding ``tokens x vocabulary`` memory:

- :func:`single_pass_loss` (default whenever the weights are known in-pass: ``token_weights``,
  ``step_divergence="none"``, or ``"kl"``/``"sampled"`` with chunks cut at step boundaries; scalar
  reductions).  Per row chunk: both logit products (float32 output), the statistics kernel (for the JSD also its
  partial sums kernel), one row-finish kernel (split merge, sampled log-probs, weights, the loss partial into a
  per-chunk slot, the gradient scale), and right away ``d(logits)`` and its d(hidden) product: 6 launches per
  chunk (7 for the JSD) plus, once per d(weight) fold, the d(weight) product (and the d(bias) product); no host
  synchronisation inside the pass.  ``2 N V (Hs + Ht) + 4 N V Hs`` FLOPs: the single-pass
  minimum.  The gradients are formed during the forward for an upstream gradient of 1 and scaled by the
  real one in backward.
- :func:`divergence_forward` / :func:`divergence_backward` (the :class:`~sod_kernels.dense.autograd.TokenDivergence`
  contract; used for ``reduction="none"``, forward-only calls, and steps longer than a chunk): the forward
  keeps only O(N) statistics; the backward recomputes the logit blocks.  ``2 N V (Hs + Ht)`` more FLOPs.
- ``memory="low"``: the same two passes over ``rows x vocabulary-slice`` blocks (the backward with the
  vocabulary slices outermost, so the float32 ``d(weight)`` accumulator is one slice, not ``V x Hs``).

Headline arithmetic (N = 16384, V = 151936, Hs = 1024, Ht = 2560, bf16): products 2.80e13 FLOP in one pass
(36 ms at 780 TFLOP/s); the epilogue moves ``8 N V`` (statistics) + ``10 N V`` (gradient) bytes = 45 GB
(~11 ms at 4.3 TB/s); the d(weight) accumulation ``8 V Hs`` bytes per chunk.  Chunk rows come from a byte
budget (:data:`sod_kernels.core.chunks.FAST_CHUNK_BYTES`, ~500 rows at V = 152k).

Divergences: ``"reverse_kl"``, ``"forward_kl"`` (one statistics kernel per block: online log-sum-exps and the
KL accumulator) and ``"jsd"`` with ``0 < beta < 1`` (:mod:`sod_kernels.dense.jsd_kernels`: ``log M`` needs both
rows' log-sum-exps first, so after the statistics a second kernel reads the float32 blocks again, ``8 C V``
more bytes and 4 transcendentals per entry; with ``memory="low"`` the blocks are not kept, so the forward
recomputes each slice's logit products once more, ``2 N V (Hs + Ht)`` more FLOPs).  Every mode takes the
optional hard-label term ``lambda * (-logp_s(y))`` (``hard_loss_weight`` in the single pass,
``grad_target_logprob`` in the two-pass backward): ``hard_row (p_s - onehot(y))`` added inside the
``d(logits)`` kernel (the onehot by a column comparison, no atomics), no extra pass.

Dtypes: float32, bfloat16, float16 (products with float32 accumulation and float32 logits; the gradient
blocks in the input dtype).  float64 raises TypeError (use ``backend="torch"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core.chunks import (FAST_CHUNK_BYTES, LOW_MEMORY_CHUNK_BYTES, GradAccumulator, LMHead, chunk_rows, even_chunks,
                           gather_rows, logits_into, row_selector)
from ..core.loop import DeviceBlocks, DeviceGrads, longest_chunk, run_chunks
from ..core.tiles import apply_softcap
from .jsd_kernels import jsd_logit_grad, jsd_partials, jsd_row_stats
from .kernels import (WEIGHTS_STEPS, KLRowStats, kl_logit_grad, kl_partials, kl_row_finish, kl_row_stats,
                      merge_kl_partials)
from .pass_state import ChunkWeightPlan, ForwardResult

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIVERGENCE_NAMES = ("reverse_kl", "forward_kl", "jsd")
MEMORY_MODES = ("fast", "low")
LOW_MEMORY_ROWS = 1024   # rows per block in the low-memory mode (the vocabulary slice is sized from the budget)
SLICE_MULTIPLE = 2048


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, divergence, temperature,
                  beta=0.5):
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if t.dtype == torch.float64:
            raise TypeError(f"the Triton backend does not support float64 ({name} is float64); "
                            "use backend='torch' for float64 inputs")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the Triton backend supports float32, bfloat16 and float16")
    if student_hidden.dtype != student_weight.dtype or teacher_hidden.dtype != teacher_weight.dtype:
        raise TypeError("student_hidden/student_weight and teacher_hidden/teacher_weight must share a dtype per "
                        f"model; got {student_hidden.dtype}/{student_weight.dtype} and "
                        f"{teacher_hidden.dtype}/{teacher_weight.dtype}")
    if divergence not in DIVERGENCE_NAMES:
        raise ValueError(f"divergence must be one of {DIVERGENCE_NAMES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"the Triton backend's JSD needs 0 < beta < 1 (the loss maps beta = 0 / 1 to the KLs), "
                         f"got beta={beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_weight.shape[0] < student_weight.shape[0]:
        raise ValueError(f"teacher_weight has a smaller vocabulary ({teacher_weight.shape[0]}) than student_weight "
                         f"({student_weight.shape[0]})")


@dataclass
class KLProblem:
    """The inputs of one call, as the chunk loops see them (rows of ``row_index`` in order).  ``jsd``: the
    generalized JSD with weight ``beta`` (``forward_kl`` is then False and unused)."""

    student: LMHead
    teacher: LMHead
    row_index: torch.Tensor
    contiguous: bool          # row_index is arange(N): chunks are slices, no gathers
    target_ids: torch.Tensor | None
    forward_kl: bool
    temperature: float
    student_softcap: float | None = None  # cap tanh(x / cap) of each model's raw logits, before 1/tau
    teacher_softcap: float | None = None
    jsd: bool = False
    beta: float = 0.5

    @classmethod
    def build(cls, sh, sw, sb, th, tw, tb, row_index, target_ids, divergence, temperature, *,
              student_softcap: float | None = None, teacher_softcap: float | None = None,
              beta: float = 0.5) -> KLProblem:
        _check_inputs(sh, sw, th, tw, divergence, temperature, beta)
        vocab = sw.shape[0]
        rows = row_index.to(torch.int64).contiguous()
        # row_index ascends strictly within range(N) (every caller's contract), so it is arange(N) exactly when it
        # has N entries: decided from sizes, without reading the tensor (no host synchronisation).
        contiguous = rows.numel() == sh.shape[0]
        return cls(LMHead(_row_major(sh), _row_major(sw), sb, vocab), LMHead(_row_major(th), _row_major(tw), tb, vocab),
                   rows, contiguous, None if target_ids is None else target_ids.to(torch.int64), divergence == "forward_kl",
                   float(temperature), None if student_softcap is None else float(student_softcap),
                   None if teacher_softcap is None else float(teacher_softcap), divergence == "jsd", float(beta))

    @property
    def n_rows(self) -> int:
        return self.row_index.numel()

    @property
    def vocab(self) -> int:
        return self.student.vocab

    def rows(self, start: int, stop: int):
        return row_selector(self.row_index, start, stop, self.contiguous)

    def targets(self, start: int, stop: int) -> torch.Tensor | None:
        if self.target_ids is None:
            return None
        return self.target_ids[self.rows(start, stop)]

    def bias(self, head: LMHead, columns: slice | None = None) -> torch.Tensor | None:
        b = head.used_bias
        return b if (b is None or columns is None) else b[columns]

    @property
    def epilogue(self) -> dict:
        """The keyword arguments every KL epilogue call shares (the statistics kernel's, for the JSD too)."""
        return {"forward_kl": self.forward_kl, "temperature": self.temperature,
                "student_softcap": self.student_softcap, "teacher_softcap": self.teacher_softcap}

    @property
    def jsd_epilogue(self) -> dict:
        """The keyword arguments of the JSD kernels."""
        return {"beta": self.beta, "temperature": self.temperature, "student_softcap": self.student_softcap,
                "teacher_softcap": self.teacher_softcap}

    def hard_targets(self, start: int, stop: int, columns: slice | None = None) -> torch.Tensor:
        """``[stop - start]`` int32 target columns of the chunk's rows relative to ``columns.start`` (the
        gradient kernels' onehot); raises without ``target_ids``."""
        if self.target_ids is None:
            raise ValueError("the hard-label term needs target_ids")
        y = self.targets(start, stop)
        return (y if columns is None or columns.start == 0 else y - columns.start).to(torch.int32)


def row_stats(p: KLProblem, xs: torch.Tensor, xt: torch.Tensor) -> KLRowStats:
    """The row statistics of whole-vocabulary blocks ``xs``, ``xt`` ``[C, V]`` float32: the KL statistics
    kernel, then for the JSD the second read of the blocks (``D`` and ``centre = c`` replaced)."""
    stats = kl_row_stats(xs, xt, p.bias(p.student), p.bias(p.teacher), **p.epilogue)
    if not p.jsd:
        return stats
    part = jsd_partials(xs, xt, p.bias(p.student), p.bias(p.teacher), stats.lse_s, stats.lse_t, **p.jsd_epilogue)
    return jsd_row_stats(stats, part, beta=p.beta)


def logit_grad(p: KLProblem, xs: torch.Tensor, xt: torch.Tensor, stats: KLRowStats, scale: torch.Tensor,
               out: torch.Tensor, columns: slice | None = None, hard: tuple | None = None) -> torch.Tensor:
    """``out [C, Vc]`` <- ``d(logits)`` of the block (vocabulary ``columns``, default all): ``scale`` ``[C]``
    float32 (``dL/dD / tau``) times ``dD/dz``, plus the hard-label term ``hard = (target [C] int32 relative to
    the block, hard_scale [C] float32)`` or None, times the student cap's slope (the divergence's kernel)."""
    sb, tb = p.bias(p.student, columns), p.bias(p.teacher, columns)
    if p.jsd:
        return jsd_logit_grad(xs, xt, sb, tb, stats, scale, out, hard=hard, **p.jsd_epilogue)
    return kl_logit_grad(xs, xt, sb, tb, stats, scale, out, hard=hard, **p.epilogue)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _SliceBlocks:
    """Reusable ``[rows, width]`` float32 logit blocks of both models for the low-memory mode, whose passes run
    over ``rows x vocabulary-slice`` blocks (the backward with the slices outermost) rather than the core loop's
    whole-vocabulary row chunks (gradient blocks: the sliced GradAccumulator)."""

    def __init__(self, rows: int, cols: int, device):
        self.xs = torch.empty(rows, cols, dtype=torch.float32, device=device)
        self.xt = torch.empty(rows, cols, dtype=torch.float32, device=device)

    def logits(self, p: KLProblem, start: int, stop: int, columns: slice):
        """``(student hidden rows, xs, xt)`` of rows ``[start, stop)`` and the vocabulary ``columns``."""
        rows = p.rows(start, stop)
        hs, ht = gather_rows(p.student.hidden, rows), gather_rows(p.teacher.hidden, rows)
        ws, wt = p.student.used_weight[columns], p.teacher.used_weight[columns]
        n, width = stop - start, ws.shape[0]
        return hs, logits_into(_view(self.xs, n, width), hs, ws), logits_into(_view(self.xt, n, width), ht, wt)


def device_blocks(p: KLProblem, chunks: list[tuple[int, int]]) -> DeviceBlocks:
    """Both models' reusable float32 whole-vocabulary logit blocks for ``chunks`` (the core loop's; the student's
    rows of a gradient pass come through the gradient sink, gathered straight into its d(weight) fold buffer)."""
    return DeviceBlocks((p.student, p.teacher), p.row_index, p.contiguous, longest_chunk(chunks))


def _view(buffer: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """A contiguous ``[n, width]`` view at the start of a reusable buffer."""
    return buffer.view(-1)[:n * width].view(n, width)


def _sampled_logprobs(p: KLProblem, start: int, stop: int, xs, xt, stats: KLRowStats):
    """``(log p_s(y), log p_t(y))`` of the chunk's rows from the whole-vocabulary blocks."""
    y = p.targets(start, stop)
    col = y[:, None]
    zs, zt = xs.gather(1, col).squeeze(1), xt.gather(1, col).squeeze(1)
    if p.student.bias is not None:
        zs = zs + p.student.bias[y].float()
    if p.teacher.bias is not None:
        zt = zt + p.teacher.bias[y].float()
    zs, zt = apply_softcap(zs, p.student_softcap), apply_softcap(zt, p.teacher_softcap)
    return zs / p.temperature - stats.lse_s, zt / p.temperature - stats.lse_t


def _slices(vocab: int, rows: int, budget: int) -> list[slice]:
    width = max(budget // max(rows * 10, 1), 1)
    if width > SLICE_MULTIPLE:
        width -= width % SLICE_MULTIPLE
    width = min(width, vocab)
    return [slice(v, min(v + width, vocab)) for v in range(0, vocab, width)]


# ------------------------------------------------------------------------------------------ two passes
def divergence_forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                       row_index, target_ids, *, divergence: str, temperature: float, chunk_size: int | None = None,
                       memory: str = "fast", student_softcap: float | None = None,
                       teacher_softcap: float | None = None, beta: float = 0.5):
    """Per-token divergence and softmax statistics of the rows ``row_index`` (no gradient work).

    Args: ``student_hidden [N, Hs]``, ``student_weight [Vs, Hs]``, ``student_bias [Vs]`` or None,
    ``teacher_hidden [N, Ht]``, ``teacher_weight [Vt >= Vs, Ht]`` (first Vs rows used), ``teacher_bias`` or
    None; ``row_index [Na]`` int64 strictly ascending (distinct rows); ``target_ids [N]`` int64 or None;
    ``chunk_size``: rows per chunk (default from the memory budget); ``memory``: ``"fast"`` or ``"low"``;
    ``student_softcap`` / ``teacher_softcap``: ``cap tanh(x / cap)`` of that model's raw logits before ``1/tau``, or
    None;
    ``beta``: the JSD's weight (``divergence="jsd"``, ``0 < beta < 1``).
    Returns ``(D, lse_student, lse_teacher, logp_student(y), logp_teacher(y), frame)``: ``[Na]`` float32
    each (the sampled log-probs None without targets), ``frame [3, Na]`` for :func:`divergence_backward`
    (``max_s, max_t, centre``; for the JSD ``centre = c = KL(p_s || M)``).
    """
    p = KLProblem.build(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, target_ids, divergence, temperature, student_softcap=student_softcap,
                        teacher_softcap=teacher_softcap, beta=beta)
    out = ForwardResult(p.n_rows, student_hidden.device, target_ids is not None)
    if memory == "low":
        _forward_low_memory(p, out, chunk_size)
    else:
        chunks = even_chunks(p.n_rows, chunk_rows(p.n_rows, p.vocab, 8, budget=FAST_CHUNK_BYTES,
                                                  chunk_size=chunk_size))

        def epilogue(c):
            xs, xt = c.logits
            stats = row_stats(p, xs, xt)
            sampled = _sampled_logprobs(p, c.start, c.stop, xs, xt, stats) if target_ids is not None else None
            out.store(c.start, c.stop, stats, sampled)

        run_chunks(chunks, device_blocks(p, chunks), epilogue)
    return out.D, out.lse_s, out.lse_t, out.lp_s, out.lp_t, out.frame


def _forward_low_memory(p: KLProblem, out: ForwardResult, chunk_size: int | None) -> None:
    """Rows x vocabulary-slice blocks: per row block the statistics' partials of every slice, merged; for the
    JSD a second sweep over the slices (the logit products recomputed) for ``D`` and ``c``."""
    rows = chunk_size or LOW_MEMORY_ROWS
    slices = _slices(p.vocab, min(rows, max(p.n_rows, 1)), LOW_MEMORY_CHUNK_BYTES)
    width = slices[0].stop - slices[0].start if slices else 1
    blocks = _SliceBlocks(min(rows, max(p.n_rows, 1)), width, p.student.hidden.device)
    for start, stop in even_chunks(p.n_rows, rows):
        parts = []
        for cols in slices:
            _, xs, xt = blocks.logits(p, start, stop, cols)
            parts.append(kl_partials(xs, xt, p.bias(p.student, cols), p.bias(p.teacher, cols), **p.epilogue))
        stats = merge_kl_partials(torch.cat(parts, dim=2), forward_kl=p.forward_kl)
        if p.jsd:
            stats = _jsd_stats_sliced(p, blocks, start, stop, slices, stats)
        sampled = _sampled_logprobs_gathered(p, start, stop, stats) if out.lp_s is not None else None
        out.store(start, stop, stats, sampled)


def _jsd_stats_sliced(p: KLProblem, blocks: _SliceBlocks, start: int, stop: int, slices: list[slice],
                      stats: KLRowStats) -> KLRowStats:
    """The JSD's ``D`` and ``c`` of rows ``[start, stop)`` from a second sweep over the vocabulary slices
    (each slice's logit products recomputed: ``2 C V (Hs + Ht)`` FLOPs), given the merged statistics."""
    parts = []
    for cols in slices:
        _, xs, xt = blocks.logits(p, start, stop, cols)
        parts.append(jsd_partials(xs, xt, p.bias(p.student, cols), p.bias(p.teacher, cols), stats.lse_s,
                                  stats.lse_t, **p.jsd_epilogue))
    return jsd_row_stats(stats, torch.cat(parts, dim=2), beta=p.beta)


def _sampled_logprobs_gathered(p: KLProblem, start: int, stop: int, stats: KLRowStats):
    """Sampled log-probs from one gathered dot product per row and model (no whole-vocabulary block)."""
    rows, y = p.rows(start, stop), p.targets(start, stop)
    out = []
    for head, lse, cap in ((p.student, stats.lse_s, p.student_softcap), (p.teacher, stats.lse_t, p.teacher_softcap)):
        h = gather_rows(head.hidden, rows).float()
        z = (h * head.weight.index_select(0, y).float()).sum(1)
        if head.bias is not None:
            z = z + head.bias[y].float()
        out.append(apply_softcap(z, cap) / p.temperature - lse)
    return tuple(out)


def divergence_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, lse_student, lse_teacher, token_divergence, grad_divergence, *, divergence: str,
                        temperature: float, need_hidden: bool = True, need_weight: bool = True,
                        need_bias: bool = True, frame: torch.Tensor | None = None, chunk_size: int | None = None,
                        memory: str = "fast", student_softcap: float | None = None,
                        teacher_softcap: float | None = None, beta: float = 0.5,
                        target_ids: torch.Tensor | None = None, grad_target_logprob: torch.Tensor | None = None):
    """Gradients of ``sum_i grad_divergence[i] * D[i] + sum_i grad_target_logprob[i] * logp_s(y_i)`` w.r.t.
    the student's hidden, weight and bias.

    ``frame`` is :func:`divergence_forward`'s last output (recomputed from the logits when None);
    ``grad_divergence [Na]`` (None: no divergence term); ``beta``: as in :func:`divergence_forward`;
    ``target_ids [N]`` int64 (indexed like the hidden rows) and ``grad_target_logprob [Na]`` (per distilled
    row) or None: the sampled log-prob term, ``grad_target_logprob (onehot(y) - p_s) / tau`` folded into the
    same ``d(logits)`` kernel (no extra pass).
    Returns ``(d_hidden [N, Hs], d_weight [Vs, Hs], d_bias [Vs])`` in the inputs' dtypes (None where not
    needed); rows outside ``row_index`` get zero gradient.
    """
    with_hard = grad_target_logprob is not None
    if with_hard and target_ids is None:
        raise ValueError("divergence_backward: grad_target_logprob needs target_ids")
    p = KLProblem.build(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                        row_index, target_ids if with_hard else None, divergence, temperature,
                        student_softcap=student_softcap, teacher_softcap=teacher_softcap, beta=beta)
    low = memory == "low"
    rows = (chunk_size or LOW_MEMORY_ROWS) if low else \
        chunk_rows(p.n_rows, p.vocab, 8 + 2 * student_hidden.element_size(), budget=FAST_CHUNK_BYTES,
                   chunk_size=chunk_size)
    rows = min(rows, max(p.n_rows, 1))
    slices = _slices(p.vocab, rows, LOW_MEMORY_CHUNK_BYTES) if low else None
    if low:
        acc = GradAccumulator(p.student, p.row_index, p.contiguous, need_hidden=need_hidden,
                              need_weight=need_weight, need_bias=need_bias, block_rows=rows,
                              block_cols=slices[0].stop - slices[0].start, sliced=True)
    else:
        grads = DeviceGrads(p.student, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                            need_bias=need_bias, block_rows=rows)
        acc = grads.acc
    if not acc.active or p.n_rows == 0:
        return acc.finish()
    scale = torch.zeros(p.n_rows, dtype=torch.float32, device=student_hidden.device) if grad_divergence is None \
        else grad_divergence.to(torch.float32) / p.temperature
    hard_scale = -grad_target_logprob.to(torch.float32) / p.temperature if with_hard else None
    saved = None
    if frame is not None:
        saved = ForwardResult.__new__(ForwardResult)
        saved.D, saved.lse_s, saved.lse_t, saved.frame = token_divergence, lse_student, lse_teacher, frame
    if low:
        _backward_low_memory(p, acc, scale, hard_scale, saved, rows, slices)
        return acc.finish()
    chunks = even_chunks(p.n_rows, rows)

    def epilogue(c):
        xs, xt = c.logits
        stats = saved.stats(c.start, c.stop) if saved is not None else row_stats(p, xs, xt)
        hard = (p.hard_targets(c.start, c.stop), hard_scale[c.start:c.stop]) if with_hard else None
        return logit_grad(p, xs, xt, stats, scale[c.start:c.stop], c.grad_block(), hard=hard)

    run_chunks(chunks, device_blocks(p, chunks), epilogue, grads)
    return grads.finish()


def _backward_low_memory(p: KLProblem, acc: GradAccumulator, scale, hard_scale, saved, rows: int,
                         slices: list[slice]) -> None:
    """The vocabulary-sliced backward: slices outermost (one slice's float32 d(weight) accumulator), row
    blocks inside; ``hard_scale [Na]`` float32 or None (the hard-label term's per-row factor)."""
    if saved is None:  # the statistics first (one more pass), then the vocabulary-sliced gradient
        fwd = ForwardResult(p.n_rows, p.student.hidden.device, False)
        _forward_low_memory(p, fwd, rows)
        saved = fwd
    blocks = _SliceBlocks(rows, slices[0].stop - slices[0].start, p.student.hidden.device)
    for cols in slices:
        acc.begin_slice(cols)
        for start, stop in even_chunks(p.n_rows, rows):
            hs, xs, xt = blocks.logits(p, start, stop, cols)
            hard = (p.hard_targets(start, stop, cols), hard_scale[start:stop]) if hard_scale is not None else None
            grad = logit_grad(p, xs, xt, saved.stats(start, stop), scale[start:stop],
                              acc.grad_block(stop - start, cols.stop - cols.start), columns=cols, hard=hard)
            acc.add(grad, start, stop, hs, columns=cols)
        acc.end_slice()


# ------------------------------------------------------------------------------------------- one pass
@dataclass
class SinglePassResult:
    """What :func:`single_pass_loss` returns: the loss (0-D float32, the hard-label term included), per-row
    D (the soft divergence only) / sampled log-probs
    (``[Na]`` float32, the latter None without targets) and the student's gradients for an upstream
    gradient of 1 (None where not needed)."""

    loss: torch.Tensor
    D: torch.Tensor
    lp_s: torch.Tensor | None
    lp_t: torch.Tensor | None
    grads: tuple


def single_pass_loss(p: KLProblem, chunks: list[tuple[int, int]],
                     chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                     coef: float, normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                     sampled_signal: bool = False, hard_loss_weight: float = 0.0) -> SinglePassResult:
    """``L = coef * sum_i w_i D_i / normalizer + lambda * sum_i (-logp_s(y_i)) / normalizer`` and its student
    gradients in one pass over ``chunks``.

    ``chunk_weights(start, stop, D, signal)`` returns the ``[stop - start]`` weights of a chunk's rows
    (``signal`` = the sampled-token gap ``|logp_s(y) - logp_t(y)|`` if ``sampled_signal``, else ``D``).  A
    function with a ``kernel_plan`` (:func:`sod_kernels.steps.plan.with_kernel_plan`: what
    :func:`sod_kernels.steps.finish.single_pass_plan` makes) is not called: the row-finish kernel forms the
    weights from its plan; any other callable is called per chunk (a few more tensor operations per chunk).
    ``hard_loss_weight = lambda >= 0`` (needs the problem's ``target_ids``): the hard-label term, unweighted
    and not times ``coef``; its gradient ``lambda / normalizer * (p_s - onehot(y)) / tau`` is added by the same
    ``d(logits)`` kernel (no extra pass).

    Launches per chunk (contiguous rows): the two logit products, the statistics kernel, for the JSD its partial
    sums kernel (which merges the statistics itself), the row-finish kernel (:func:`kl_row_finish`: statistics
    merge, sampled log-probs, weights, the loss partial into a per-chunk slot, the rows' gradient scale, every
    per-row output written in place), the ``d(logits)`` kernel, the ``d(hidden)`` product, and per fold of
    :class:`GradAccumulator` the ``d(weight)`` product (and the ``d(bias)`` product): ``6 + (1 or 2) / g`` for a
    KL with ``g`` chunks per fold (2 at 512-row chunks), one more for the JSD; rows that are not contiguous add
    one gather per model.  No host synchronisation: the
    chunk bounds and the steps' ordinals are Python ints of the plan; the loss is the slots' sum after the loop.
    """
    hard_weight = float(hard_loss_weight)
    if hard_weight and p.target_ids is None:
        raise ValueError("hard_loss_weight > 0 needs target_ids")
    if sampled_signal and p.target_ids is None:
        raise ValueError("the sampled signal needs target_ids")
    device = p.student.hidden.device
    out = ForwardResult(p.n_rows, device, p.target_ids is not None)
    longest = longest_chunk(chunks)
    grads = DeviceGrads(p.student, p.row_index, p.contiguous, need_hidden=need_hidden, need_weight=need_weight,
                        need_bias=need_bias, block_rows=longest)
    grad_scale = coef / (normalizer * p.temperature)
    weights = ChunkWeightPlan(chunk_weights, grad_scale, longest, device)
    f32 = torch.float32
    slots = torch.zeros(2, max(len(chunks), 1), dtype=torch.float64, device=device)  # sum w D, sum -lp_s per chunk
    scale = torch.empty(longest, dtype=f32, device=device)
    targets = None
    if p.target_ids is not None:  # the distilled rows' targets, int32, once per call
        targets = (p.target_ids if p.contiguous else p.target_ids[p.row_index]).to(torch.int32)
    hard_scale = torch.full((longest,), hard_weight / (normalizer * p.temperature), dtype=f32, device=device) \
        if hard_weight and grads.active else None
    sb, tb = p.bias(p.student), p.bias(p.teacher)

    def epilogue(c):
        start, stop, n, i = c.start, c.stop, c.size, c.index
        xs, xt = c.logits
        part = kl_partials(xs, xt, sb, tb, **p.epilogue)
        rows_out = out.views(start)
        jsd_part = None
        if p.jsd:
            jsd_part = jsd_partials(xs, xt, sb, tb, rows_out.lse_s[:n], rows_out.lse_t[:n],
                                    merge_stats=(part, rows_out.frame[0, :n], rows_out.frame[1, :n]), **p.jsd_epilogue)
        kl_row_finish(part, jsd_part, xs, xt, sb, tb, None if targets is None else targets[start:stop], rows_out,
                      weights.args(start, stop), scale[:n], slots[:, i], jsd=p.jsd, beta=p.beta,
                      sampled_signal=sampled_signal and weights.mode == WEIGHTS_STEPS, hard=bool(hard_weight),
                      **p.epilogue)
        if not weights.in_kernel:
            weights.apply_callable(out, start, stop, sampled_signal, scale, slots[0, i])
        if not grads.active:
            return None
        hard = (targets[start:stop], hard_scale[:n]) if hard_weight else None
        return logit_grad(p, xs, xt, out.stats(start, stop), scale[:n], c.grad_block(), hard=hard)

    run_chunks(chunks, device_blocks(p, chunks), epilogue, grads)
    totals = slots.sum(1)
    loss = (totals[0] * (coef / normalizer) + totals[1] * (hard_weight / normalizer)).to(f32)
    return SinglePassResult(loss, out.D, out.lp_s, out.lp_t, grads.finish())
