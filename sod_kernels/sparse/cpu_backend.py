"""The CPU single pass of ``fused_sparse_sod_loss`` (``memory="fast"``, the default on CPU tensors).

Whenever the step weights are known inside the pass (``token_weights``, ``step_divergence="none"``, or
``"kl"`` / ``"sampled"`` with row chunks cut at step boundaries; scalar reductions; a gradient wanted), the
loss and the student's gradients come from one pass over chunks of whole vocabulary rows.  Per chunk of
``C`` distilled tokens (``k`` teacher ids each):

1. one matrix product into a reused ``[C, V]`` block: ``x = h W^T`` (raw, float32 or float64);
2. ``O(C k)`` reads of the block: the student's temperature-scaled (capped) logits at the ids and at the
   sampled tokens, with the soft-cap's slope there (:func:`logits_at`); then ``-inf`` is written over the id
   columns, so that the block holds only the tail;
3. the tail epilogue (:func:`tail_stats`, compiled as :mod:`sod_kernels.core.cpu_epilogue` compiles its
   epilogues): ``z = (x + b) / tau`` (or the soft-capped form), the row maxima of the tail ``M`` (known
   before any exponential), ``e = exp(z - M)`` (0 at the ids) and its row sums ``S``, hence
   ``lse_tail = M + log S`` (``-inf`` for an empty tail, ``k = V``); in place ``x <- e * slope``;
4. :func:`sod_kernels.sparse.rows.coarse_grained_rows` (``O(C k)``, float64: ``D``, the per-cell gradient
   coefficients ``grad_ids``, ``grad_tail``, the cell probabilities, the sampled-token log-probs; reverse /
   forward KL or the generalized JSD), the chunk's weights (:func:`single_pass_plan`), the loss terms
   (float64 accumulation), and :func:`sod_kernels.sparse.rows.logit_coefficients` with the hard-label term;
5. ``d(logits)`` in place (:func:`logit_grad_in_place`): one row scaling of the block (``exp(z - lse_tail) =
   e / S``: the tail's coefficients, exactly 0 at the ids), then the ``k`` id values written over their
   columns and the hard term's ``-h`` added at each row's sampled column (``O(C k)``); two matrix products
   fold it: ``d(hidden)[rows] = d(logits) W`` and ``d(weight) += d(logits)^T h`` (``d(bias) += colsum``).

Cost: ``2 N V H + 4 N V H`` FLOPs (the two-pass path, ``memory="low"``, recomputes the logits:
``2 N V H`` more) and one exponential per (token, vocabulary) pair (the two-pass path: two; a soft-cap adds
its own per pass).  Memory: one
``[C, V]`` block (the eager epilogue makes a few more temporaries of that size) plus the ``[V, H]`` d(weight)
accumulator and ``O(N k)`` row terms: at ``V = 32000``, ``H = 256`` and 512-row float32 chunks about 100 MB.
Chunks hold :data:`CPU_CHUNK_BYTES` of block (a multiple of 32 rows); with step weights a chunk grows up to
:data:`CPU_MAX_CHUNK_BYTES` to hold a whole step (or up to ``chunk_size`` rows when given), and a longer step
falls back to the two-pass path.  Deterministic: fixed chunk order, fixed-order products and row-parallel
reductions; the id columns of a row are distinct, so their writes never collide.

Dtypes: float32 and float64 compute in their own dtype; bfloat16 / float16 inputs compute in float32 (the
weight converted once per call) and get gradients in their dtype.  The loss is float32, float64 for float64
inputs.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..core import cpu_epilogue
from ..core.chunks import LMHead
from ..core.cpu_pass import ComputeHead
from ..core.loop import CpuBlocks, CpuGrads, longest_chunk, run_chunks
from ..core.options import SinglePassResult
from ..core.rows import RowChunks, chunk_row_index
from ..core.tiles import MIN_LOGIT, compute_dtype
from ..steps.cpu_plan import cpu_single_pass_plan
from .rows import SinglePassTotals, coarse_grained_rows

CPU_CHUNK_BYTES = 64 << 20        # the [C, V] logit block of a chunk (512 rows at V = 32000, fp32)
CPU_MAX_CHUNK_BYTES = 256 << 20   # how far a chunk may grow to hold a whole step


# ------------------------------------------------------------------------------------------ chunk plan
def single_pass_plan(step_rows: torch.Tensor, row_index: torch.Tensor, given: torch.Tensor | None,
                     step_divergence: str, epsilon: float, delta: float, chunk_size: int | None, vocab: int,
                     elem: int):
    """``(chunks, chunk_weights)`` of the CPU single pass, or None when a step is longer than the largest chunk
    (``chunk_size`` rows if given, else :data:`CPU_MAX_CHUNK_BYTES` of block): then the two-pass path runs.
    The arguments of :func:`sod_kernels.steps.cpu_plan.cpu_single_pass_plan`, ``vocab`` and ``elem`` the hidden
    states' bytes per entry (the block holds at least 4)."""
    return cpu_single_pass_plan(step_rows, row_index, given, step_divergence, epsilon, delta, chunk_size,
                                row_bytes=vocab * max(elem, 4), budget=CPU_CHUNK_BYTES,
                                max_budget=CPU_MAX_CHUNK_BYTES)


# -------------------------------------------------------------------------------------------- epilogue
def tail_stats(x: torch.Tensor, b: torch.Tensor, inv_temp: torch.Tensor, cap: torch.Tensor, capped: bool):
    """Tail statistics of the raw block ``x [C, V]`` whose id columns hold ``-inf``: returns
    ``(M [C], S [C])``, the row maximum of the tail logits (``MIN_LOGIT`` for an empty tail) and
    ``S = sum_tail exp(z - M)`` (0 for an empty tail), and leaves ``x <- exp(z - M) * slope`` (0 at the ids;
    ``slope`` = the soft-cap's derivative, 1 without a cap).

    ``z = (x + b) * inv_temp`` or ``cap tanh((x + b) / cap) * inv_temp``; ``b [V]`` (zeros for no bias),
    ``inv_temp``, ``cap``: 0-d tensors of ``x``'s dtype.  A capped ``-inf`` would map to ``-cap / tau``, so
    the id columns are masked again after the cap.  Plain PyTorch: compiled by :func:`run_epilogue` into one
    row-parallel loop nest (the maximum, then the exponentials), or run eagerly.
    """
    if capped:
        z, slope = cpu_epilogue.capped_logits_slope(x, b, inv_temp, cap)
        z = torch.where(torch.isneginf(x), float("-inf"), z)
    else:
        z, slope = cpu_epilogue.capped_logits(x, b, inv_temp, cap, False), None
    m = z.amax(1, keepdim=True).clamp(min=MIN_LOGIT)
    e = torch.exp(z - m)
    total = e.sum(1)
    x.copy_(e if slope is None else e * slope)
    return m.squeeze(1), total


_lock = threading.Lock()
_compiled: dict[str, Callable] = {}
_broken: list[str] = []    # the first compilation error of this module's epilogue: eager from then on
EPILOGUES = {"tail_stats": tail_stats}


def run_epilogue(name: str, *args, rows: int):
    """Run this module's epilogue ``name`` compiled once per shape family (``torch.compile(dynamic=True)``, as
    :func:`sod_kernels.core.cpu_epilogue.run`) when :func:`sod_kernels.core.cpu_epilogue.compile_enabled` and
    the chunk has more than one row, else eagerly; a compilation failure warns once and runs eagerly for the
    rest of the process (``SOD_KERNELS_CPU_COMPILE=0`` skips the attempt)."""
    fn = EPILOGUES[name]
    if rows <= 1 or _broken or not cpu_epilogue.compile_enabled():
        with torch.no_grad():
            return fn(*args)
    try:
        with _lock:
            compiled = _compiled.get(name)
            if compiled is None:
                compiled = _compiled[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=cpu_epilogue.RECOMPILE_LIMIT):
            return compiled(*args)
    except Exception as exc:  # no compiler, unsupported platform...: eager for the rest of the process
        if not _broken:
            _broken.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"sod_kernels: compiling the sparse CPU epilogue failed ({type(exc).__name__}); running "
                          f"it eagerly from now on (set {cpu_epilogue.ENV_COMPILE}=0 to skip the attempt)",
                          RuntimeWarning, stacklevel=2)
        with torch.no_grad():
            return fn(*args)


# ------------------------------------------------------------------------------------------- problem
@dataclass
class SparseProblem(RowChunks):
    """One call's inputs as the chunk loop sees them (the fields of
    :class:`sod_kernels.sparse.triton_backend.SparseProblem` that the single pass reads): ``ids``, ``logprobs``,
    ``target_ids`` restricted to the distilled rows (``[Na, k]`` int64, ``[Na, k]``, ``[Na]`` int64 or None)."""

    head: LMHead
    row_index: torch.Tensor
    contiguous: bool
    ids: torch.Tensor
    logprobs: torch.Tensor
    target_ids: torch.Tensor | None
    divergence: str                  # "reverse_kl", "forward_kl" or "jsd"
    temperature: float
    softcap: float | None = None     # cap tanh(x / cap) of the student's raw logits, before 1/tau
    beta: float = 0.5                # the JSD's mixing weight (only for "jsd")

    @classmethod
    def build(cls, hidden, weight, bias, row_index, ids, logprobs, target_ids, divergence, temperature, *,
              softcap: float | None = None, memory: str = "fast", beta: float = 0.5) -> SparseProblem:
        """The signature of :meth:`sod_kernels.sparse.triton_backend.SparseProblem.build` (``memory`` unused)."""
        rows, contiguous = chunk_row_index(row_index, hidden.shape[0])
        return cls(LMHead(hidden, weight, bias, weight.shape[0]), rows, contiguous, ids.to(torch.int64).contiguous(),
                   logprobs.contiguous(), None if target_ids is None else target_ids.to(torch.int64),
                   divergence, float(temperature), None if softcap is None else float(softcap), float(beta))

    @property
    def vocab(self) -> int:
        return self.head.vocab


class _Head(ComputeHead):
    """The student's :class:`~sod_kernels.core.cpu_pass.ComputeHead` with the 0-d epilogue scalars in the
    compute dtype ``dt``."""

    def __init__(self, p: SparseProblem, dt: torch.dtype):
        super().__init__(p.head, dt)
        self.inv_temp = torch.tensor(1.0 / p.temperature, dtype=dt)
        self.cap = torch.tensor(p.softcap or 1.0, dtype=dt)
        self.capped = p.softcap is not None

    def logits_at(self, x: torch.Tensor, cols: torch.Tensor):
        """``(z [C, j], slope [C, j] or None)``: the temperature-scaled (capped) logits of the raw block
        ``x [C, V]`` at the columns ``cols [C, j]`` (int64 in ``[0, V)``) and the soft-cap's slope there."""
        raw = x.gather(1, cols)
        b = self.bias[cols]
        if self.capped:
            return cpu_epilogue.capped_logits_slope(raw, b, self.inv_temp, self.cap)
        return (raw + b) * self.inv_temp, None


# ----------------------------------------------------------------------------------------- the pass
def logit_grad_in_place(x: torch.Tensor, total: torch.Tensor, coefs, ids: torch.Tensor, slope_ids, y, slope_y):
    """``x <- d(logits)`` of a chunk from the block :func:`tail_stats` left (``e * slope``, 0 at the ids).

    Tail: ``coefs.tail * exp(z - lse_tail) * slope = (coefs.tail / S) * x`` (one row scaling; an empty tail,
    ``S = 0``, has coefficient 0).  Ids: ``coefs.ids * slope_ids`` written over their columns.  Hard term:
    ``coefs.target * slope_y`` added at each row's column ``y`` (on top of an id value there).  ``total [C]``
    the tail sums ``S``; ``ids [C, k]``, ``y [C]`` int64 (None without a hard term); slopes None without a cap.
    Costs one pass over the block and ``O(C k)`` writes (distinct columns per row: deterministic)."""
    dt = x.dtype
    tail = torch.where(total > 0, coefs.tail.to(dt) / total, torch.zeros_like(total))
    x.mul_(tail[:, None])
    values = coefs.ids.to(dt)
    x.scatter_(1, ids, values if slope_ids is None else values * slope_ids)
    if coefs.target is not None:
        add = coefs.target.to(dt)
        if slope_y is not None:
            add = add * slope_y
        col = y[:, None]
        x.scatter_(1, col, x.gather(1, col) + add[:, None])


def single_pass_loss(p: SparseProblem, chunks: list[tuple[int, int]],
                     chunk_weights: Callable[[int, int, torch.Tensor, torch.Tensor | None], torch.Tensor], *,
                     coef: float, normalizer: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                     sampled_signal: bool = False, hard_loss_weight: float = 0.0) -> SinglePassResult:
    """``L = coef * sum_i w_i D_i / normalizer`` (``+ hard_loss_weight * sum_i (-log p_s(y_i)) / normalizer``, the
    hard-label term, which needs ``p.target_ids``) and its student gradients in one pass over ``chunks`` of
    whole vocabulary rows: the contract of :func:`sod_kernels.sparse.triton_backend.single_pass_loss`, on CPU
    tensors (steps 1-5 of the module docstring)."""
    if hard_loss_weight and p.target_ids is None:
        raise ValueError("single_pass_loss: hard_loss_weight > 0 needs target_ids")
    dt = compute_dtype(p.head.hidden.dtype)
    s = _Head(p, dt)
    V = p.vocab
    with_targets = p.target_ids is not None
    totals = SinglePassTotals(p.n_rows, dt, None, with_targets=with_targets, coef=coef, normalizer=normalizer,
                              temperature=p.temperature, hard_loss_weight=hard_loss_weight,
                              sampled_signal=sampled_signal)
    grads = CpuGrads(p.n_rows, s, p.head, p.row_index, p.contiguous, need_hidden=need_hidden,
                     need_weight=need_weight, need_bias=need_bias)

    def epilogue(c):
        start, stop, x = c.start, c.stop, c.logits[0]
        ids = p.ids[start:stop]
        y = z_y = slope_y = None
        if with_targets:   # read before the ids are masked
            y = p.target_ids[start:stop].clamp(0, V - 1)
            z_y, slope_y = s.logits_at(x, y[:, None])
            z_y, slope_y = z_y.squeeze(1), None if slope_y is None else slope_y.squeeze(1)
        z_ids, slope_ids = s.logits_at(x, ids)
        x.scatter_(1, ids, float("-inf"))
        m, total = run_epilogue("tail_stats", x, s.bias, s.inv_temp, s.cap, s.capped, rows=c.size)
        t = coarse_grained_rows(z_ids, m + total.log(), p.logprobs[start:stop], divergence=p.divergence,
                                beta=p.beta, vocab=V, ids=ids, target_ids=y, z_target=z_y)
        coefs = totals.add(t, start, stop, chunk_weights, grads.active)
        if coefs is None:
            return None
        logit_grad_in_place(c.grad_block(), total, coefs, ids, slope_ids, y, slope_y)
        return x

    run_chunks(chunks, CpuBlocks((s,), p.row_index, p.contiguous, longest_chunk(chunks)), epilogue, grads)
    return SinglePassResult(totals.loss(dt), totals.D, totals.lp_s, totals.lp_t, grads.finish())
