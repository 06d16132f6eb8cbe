"""The one chunked loop every loss runs: row chunks, whole-vocabulary logit blocks from matrix products, the
loss's epilogue, and the contraction of ``d(logits)`` into the student's gradients.

A loss on this core supplies only its *epilogue*, a function of one :class:`Chunk` that reads the chunk's
raw logit blocks (``x = h W^T``, one ``[C, V]`` block per model), computes whatever the loss needs
(statistics, per-row terms, weights, the loss partial), and returns the chunk's ``d(logits) [C, V]`` written
into :meth:`Chunk.grad_block` (or None: forward-only, or nothing to fold).  :func:`run_chunks` owns the
iteration and folds every returned block; which pair of (blocks, gradients) it runs with is the backend:

- the device path (Triton on a GPU, or its interpreter): :class:`DeviceBlocks` (float32 blocks from
  :func:`~sod_kernels.core.chunks.logits_into`, whatever the input dtype) and :class:`DeviceGrads`
  (:class:`~sod_kernels.core.chunks.GradAccumulator`: ``d(logits)`` in the input dtype in its own block,
  ``d(weight)`` folded over several chunks per product, no atomics); :class:`HiddenRows` instead of the blocks for
  a pass whose kernel multiplies its own logit tiles (the chunk's hidden rows, no product);
- the CPU path: :class:`CpuBlocks` (blocks in the compute dtype: float32, or float64 for float64 inputs) and
  :class:`CpuGrads` (``d(logits)`` written in place over the student's block, one fold per chunk);
- the PyTorch tile path (float64, devices without Triton, ``memory="low"`` on a CPU): :class:`TorchRows` (the
  chunk's rows in the compute dtype, no block: the epilogue sweeps vocabulary tiles with
  :func:`~sod_kernels.core.tiles.tile_logits`, ``R x BV`` at a time) and :class:`TileGrads` (each tile's
  ``d(logits)`` folded as it is formed, :meth:`Chunk.fold_tile`; the chunk's ``d(hidden)`` rows added at its end).

Per chunk the loop itself launches only the logit products (one per model) and, for a returned block, the
gradient products of the sink (``d(hidden)``, and per fold group ``d(weight)``); gathers of non-contiguous
rows happen per chunk (``gather="chunk"``: the student's rows straight into the d(weight) fold buffer) or
once per call before the loop (``gather="once"``: ``Na x H`` more memory, no per-chunk gathers).  Nothing
here synchronises with the host; the chunk bounds are Python ints.

Knows no loss: nothing in this module reads a divergence, a weight or a target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import cpu_products
from .chunks import GradAccumulator, LMHead, gather_rows, logits_into, row_selector
from .cpu_pass import ComputeHead, StudentGrads
from .tiles import fold_tile_grad, grads_like


class Chunk:
    """One row chunk as an epilogue sees it.

    index:  the chunk's position in the call's chunk list (for per-chunk slots).
    start, stop: the chunk's distilled rows ``[start, stop)`` (positions in ``row_index``).
    rows:   those rows in the hidden states: a slice when ``row_index`` is ``arange``, else int64 indices.
    hidden: per model, the chunk's hidden rows ``[C, H_m]`` (the student's first).
    logits: per model, the raw block ``x = h W^T`` ``[C, V]`` (float32 on the device path, the compute dtype on
            the CPU path; biases, temperature and soft-caps are the epilogue's).
    """

    __slots__ = ("index", "start", "stop", "rows", "hidden", "logits", "_sink")

    def __init__(self, index: int, start: int, stop: int, rows, hidden: tuple, logits: tuple, sink):
        self.index, self.start, self.stop, self.rows = index, start, stop, rows
        self.hidden, self.logits, self._sink = hidden, logits, sink

    @property
    def size(self) -> int:
        """``C``, the chunk's number of rows."""
        return self.stop - self.start

    def grad_block(self) -> torch.Tensor:
        """Where the epilogue writes the chunk's ``d(logits) [C, V]``: a block of the device sink (input dtype),
        or on the CPU path the student's logit block itself (overwritten in place)."""
        if self._sink is None:
            raise RuntimeError("this chunk loop runs without gradients (no grad_block)")
        return self._sink.block(self)

    def fold_tile(self, d_logits: torch.Tensor, columns: slice, weight_tile: torch.Tensor,
                  slope: torch.Tensor | None = None) -> None:
        """Fold one vocabulary tile's ``d(logits) [C, V']`` (the tile path, :class:`TileGrads`): times the
        soft-cap's ``slope`` (in place; None: none), into the chunk's ``d(hidden)`` rows, ``d(weight)[columns]``
        and ``d(bias)[columns]``; ``weight_tile [V', H]`` the student's weight rows of the tile."""
        if self._sink is None:
            raise RuntimeError("this chunk loop runs without gradients (no fold_tile)")
        self._sink.fold_tile(self, d_logits, columns, weight_tile, slope)


Epilogue = Callable[[Chunk], "torch.Tensor | None"]


def run_chunks(chunks: Sequence[tuple[int, int]], blocks, epilogue: Epilogue, grads=None) -> None:
    """The chunk loop: for each ``(start, stop)`` of ``chunks`` (in order) the logit blocks of ``blocks``
    (:class:`DeviceBlocks` or :class:`CpuBlocks`), then ``epilogue(chunk)``; a returned ``d(logits)`` block is
    folded into ``grads`` (:class:`DeviceGrads` or :class:`CpuGrads`; None for a forward-only loop).  The
    blocks' buffers are released at the end (the gradients are the sink's :meth:`finish`)."""
    sink = grads if (grads is not None and grads.active) else None
    per_chunk = sink is not None and hasattr(sink, "end_chunk")
    for index, (start, stop) in enumerate(chunks):
        chunk = blocks.chunk(index, start, stop, sink)
        if per_chunk:
            sink.begin_chunk(chunk)
        d_logits = epilogue(chunk)
        if d_logits is not None:
            if sink is None:
                raise RuntimeError("an epilogue returned d(logits) in a loop without gradients")
            sink.add(chunk, d_logits)
        if per_chunk:
            sink.end_chunk(chunk)
    blocks.release()


def longest_chunk(chunks: Sequence[tuple[int, int]]) -> int:
    """Rows of the longest chunk (at least 1): what the reusable blocks are sized for."""
    return max((b - a for a, b in chunks), default=1) or 1


# ------------------------------------------------------------------------------------------ device path
class DeviceBlocks:
    """Reusable float32 ``[rows, V]`` logit blocks for each of ``heads`` (the student's first), filled by one
    matrix product per model and chunk (:func:`~sod_kernels.core.chunks.logits_into`).

    ``gather="chunk"``: a chunk's rows are a slice of the hidden states when ``contiguous``, else gathered per
    chunk (the student's through :meth:`DeviceGrads.hidden_rows`, straight into the d(weight) fold buffer);
    ``gather="once"``: the distilled rows of every model are gathered once here (no per-chunk gathers).
    """

    def __init__(self, heads: Sequence[LMHead], row_index: torch.Tensor, contiguous: bool, rows: int, *,
                 gather: str = "chunk"):
        if gather not in ("chunk", "once"):
            raise ValueError(f"gather must be 'chunk' or 'once', got {gather!r}")
        self.heads, self.row_index, self.contiguous = tuple(heads), row_index, contiguous
        device = self.heads[0].hidden.device
        self._buffers = [torch.empty(rows * h.vocab, dtype=torch.float32, device=device) for h in self.heads]
        self._once = None
        if gather == "once":
            self._once = [h.hidden if contiguous else h.hidden.index_select(0, row_index) for h in self.heads]

    def active_hidden(self, model: int = 0) -> torch.Tensor:
        """The distilled rows' hidden states ``[Na, H]`` of one model, in ``row_index`` order (``gather="once"``)."""
        if self._once is None:
            raise RuntimeError("active_hidden needs gather='once'")
        return self._once[model]

    def chunk(self, index: int, start: int, stop: int, sink) -> Chunk:
        n = stop - start
        rows = row_selector(self.row_index, start, stop, self.contiguous)
        hidden, logits = [], []
        for m, (head, buf) in enumerate(zip(self.heads, self._buffers)):
            if self._once is not None:
                h = self._once[m][start:stop]
            elif m == 0 and sink is not None:
                h = sink.hidden_rows(rows, start, stop)
            else:
                h = gather_rows(head.hidden, rows)
            hidden.append(h)
            logits.append(logits_into(buf[: n * head.vocab].view(n, head.vocab), h, head.used_weight))
        return Chunk(index, start, stop, rows, tuple(hidden), tuple(logits), sink)

    def release(self) -> None:
        self._buffers = []


class HiddenRows:
    """Blocks for a device pass that forms its logits itself (a fused kernel multiplying tiles): per chunk each of
    ``heads``' hidden rows in the input dtype (the student's, first, through the gradient sink: gathered straight
    into its d(weight) fold buffer when the rows are not contiguous) and no logit product (``Chunk.logits`` is
    empty)."""

    def __init__(self, heads: Sequence[LMHead], row_index: torch.Tensor, contiguous: bool):
        self.heads, self.row_index, self.contiguous = tuple(heads), row_index, contiguous

    def chunk(self, index: int, start: int, stop: int, sink) -> Chunk:
        rows = row_selector(self.row_index, start, stop, self.contiguous)
        hidden = tuple(sink.hidden_rows(rows, start, stop) if (m == 0 and sink is not None)
                       else gather_rows(head.hidden, rows) for m, head in enumerate(self.heads))
        return Chunk(index, start, stop, rows, hidden, (), sink)

    def release(self) -> None:
        pass


class DeviceGrads:
    """The student's gradients on the device path: ``d(hidden)``, ``d(weight)`` by
    :class:`~sod_kernels.core.chunks.GradAccumulator`, and ``d(bias)`` by one of three schedules:

    - ``bias="fold"``: GradAccumulator's own (one ``d(logits)^T @ ones`` product per fold group);
    - ``bias="column_sum"``: a float32 accumulator added to by one column-sum launch per chunk
      (:func:`sod_kernels.core.kernels.column_sum_add`);
    - ``bias="epilogue"``: a float32 accumulator :attr:`d_bias` ``[Vw]`` that the loss's own kernels add to.

    With only ``d(bias)`` wanted (no hidden, no weight gradient) the sink owns a ``d(logits)`` block itself.
    """

    def __init__(self, head: LMHead, row_index: torch.Tensor, contiguous: bool, *, need_hidden: bool,
                 need_weight: bool, need_bias: bool, block_rows: int, bias: str = "fold"):
        if bias not in ("fold", "column_sum", "epilogue"):
            raise ValueError(f"bias must be 'fold', 'column_sum' or 'epilogue', got {bias!r}")
        self.head, self.bias_mode = head, bias
        own_bias = need_bias and head.bias is not None and bias != "fold"
        self.acc = GradAccumulator(head, row_index, contiguous, need_hidden=need_hidden, need_weight=need_weight,
                                   need_bias=need_bias and bias == "fold", block_rows=block_rows)
        self.d_bias = torch.zeros(head.bias.shape[0], dtype=torch.float32, device=head.bias.device) \
            if own_bias else None
        self._own = None
        if self.d_bias is not None and not self.acc.active:
            self._own = torch.empty(block_rows * head.vocab, dtype=head.hidden.dtype, device=head.hidden.device)

    @property
    def active(self) -> bool:
        """Whether any gradient is wanted."""
        return self.acc.active or self.d_bias is not None

    def hidden_rows(self, rows, start: int, stop: int) -> torch.Tensor:
        """The student's rows of a chunk (:meth:`GradAccumulator.hidden_rows` when it folds them)."""
        if self.acc.active:
            return self.acc.hidden_rows(rows, start, stop)
        return gather_rows(self.head.hidden, rows)

    def block(self, chunk: Chunk) -> torch.Tensor:
        """A contiguous ``[C, V]`` block (input dtype) for the chunk's ``d(logits)``."""
        if self._own is not None:
            n, v = chunk.size, self.head.vocab
            return self._own[: n * v].view(n, v)
        return self.acc.grad_block(chunk.size)

    def add(self, chunk: Chunk, d_logits: torch.Tensor) -> None:
        """Fold the chunk's block: ``d(bias)``'s column sums (``bias="column_sum"``), then the accumulator's
        ``d(hidden)`` product and the d(weight) fold's copy or product."""
        if self.bias_mode == "column_sum" and self.d_bias is not None:
            from .kernels import column_sum_add  # Triton, imported on the device path only
            column_sum_add(d_logits, self.d_bias[: self.head.vocab])
        if self.acc.active:
            self.acc.add(d_logits, chunk.start, chunk.stop, chunk.hidden[0])

    def finish(self) -> tuple:
        """``(d_hidden [N, H], d_weight [Vw, H], d_bias [Vw])`` in the inputs' dtypes (None where not needed)."""
        d_hidden, d_weight, d_bias = self.acc.finish()
        if self.d_bias is not None:
            d_bias = self.d_bias.to(self.head.bias.dtype)
        return d_hidden, d_weight, d_bias


# --------------------------------------------------------------------------------------------- CPU path
class KeptBlocks:
    """The logit blocks of a pass's last chunk, kept for a later pass over the same chunks (a backward after its
    forward): the rows ``[start, stop)`` and the pass's reusable buffers, whose first ``(stop - start) * V``
    entries hold the raw blocks ``x = h W^T`` per model.  See :class:`CpuBlocks`."""

    __slots__ = ("start", "stop", "buffers")

    def __init__(self, start: int, stop: int, buffers: list[torch.Tensor]):
        self.start, self.stop, self.buffers = start, stop, buffers

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class CpuBlocks:
    """Reusable ``[rows, V]`` blocks in the compute dtype for each of ``heads``
    (:class:`~sod_kernels.core.cpu_pass.ComputeHead`, the student's first): per chunk the rows' hidden states
    (gathered and converted to the compute dtype) and each model's product into its block
    (:func:`~sod_kernels.core.cpu_products.logits_into`: vocabulary tiles on the CPU pool).

    ``keep_last``: :meth:`release` keeps the last chunk's blocks as :attr:`kept` (a :class:`KeptBlocks`) instead
    of freeing the buffers (for a pass whose epilogue only reads the blocks).  ``reuse``: such blocks from an
    earlier pass over the same chunks; if the first chunk this object serves has their rows, its blocks are
    taken as they are (no product, :attr:`reused` set) and their buffers become this pass's (the caller runs
    that chunk first, as the kept blocks are overwritten by the next chunk)."""

    def __init__(self, heads: Sequence[ComputeHead], row_index: torch.Tensor, contiguous: bool, rows: int, *,
                 keep_last: bool = False, reuse: KeptBlocks | None = None):
        self.heads, self.row_index, self.contiguous = tuple(heads), row_index, contiguous
        sizes = [rows * h.weight.shape[0] for h in self.heads]
        if reuse is not None and not (
                len(reuse.buffers) == len(sizes)
                and all(b.numel() >= n and b.dtype == h.dt for b, n, h in zip(reuse.buffers, sizes, self.heads))):
            reuse = None
        self._reuse = reuse
        self._buffers = (list(reuse.buffers) if reuse is not None
                         else [torch.empty(n, dtype=h.dt) for n, h in zip(sizes, self.heads)])
        self._keep_last, self._last = keep_last, None
        self.kept: KeptBlocks | None = None
        self.reused = False

    def chunk(self, index: int, start: int, stop: int, sink) -> Chunk:
        n = stop - start
        rows = row_selector(self.row_index, start, stop, self.contiguous)
        hidden = tuple(h.rows(rows) for h in self.heads)
        logits = tuple(buf[: n * head.weight.shape[0]].view(n, -1) for head, buf in zip(self.heads, self._buffers))
        reuse, self._reuse = self._reuse, None          # only the first chunk may find its blocks intact
        if reuse is not None and (reuse.start, reuse.stop) == (start, stop):
            self.reused = True
        else:
            cpu_products.logits_into([(h_rows, head.weight, out)
                                      for h_rows, head, out in zip(hidden, self.heads, logits)])
        self._last = (start, stop)
        return Chunk(index, start, stop, rows, hidden, logits, sink)

    def release(self) -> None:
        if self._keep_last and self._last is not None:
            self.kept = KeptBlocks(*self._last, self._buffers)
        self._buffers = []


class CpuGrads:
    """The student's gradients on the CPU path (a :class:`~sod_kernels.core.cpu_pass.StudentGrads`): the
    epilogue writes ``d(logits)`` over the student's logit block; each chunk folds once (``d(hidden)`` rows,
    ``d(weight) += d(logits)^T h``, ``d(bias) += colsum``).  ``n`` distilled rows of ``source`` (the student's
    :class:`~sod_kernels.core.chunks.LMHead`), ``head`` its compute-dtype weights."""

    def __init__(self, n: int, head: ComputeHead, source: LMHead, row_index: torch.Tensor, contiguous: bool, *,
                 need_hidden: bool, need_weight: bool, need_bias: bool):
        self.grads = StudentGrads(n, head, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
        self.head, self.source, self.row_index, self.contiguous = head, source, row_index, contiguous

    @property
    def active(self) -> bool:
        return self.grads.active

    def block(self, chunk: Chunk) -> torch.Tensor:
        return chunk.logits[0]

    def add(self, chunk: Chunk, d_logits: torch.Tensor) -> None:
        self.grads.fold(d_logits, chunk.hidden[0], self.head.weight, chunk.start, chunk.stop)

    def finish(self) -> tuple:
        """``(d_hidden [N, H], d_weight [Vw, H], d_bias [Vw])`` in the student's dtypes (None where not needed)."""
        return self.grads.finish(self.source, self.row_index, self.contiguous)


# ----------------------------------------------------------------------------------------- tile path
class TorchRows:
    """The PyTorch tile path's chunks: per chunk each model's rows ``[C, H_m]`` in the compute dtype ``dt``
    (``hiddens``: the models' hidden states, the student's first), and no logit block (``Chunk.logits`` is
    empty): the epilogue forms ``R x BV`` tiles itself (:func:`~sod_kernels.core.tiles.tile_logits`), so memory
    stays at a tile whatever the vocabulary."""

    def __init__(self, hiddens: Sequence[torch.Tensor], row_index: torch.Tensor, contiguous: bool,
                 dt: torch.dtype):
        self.hiddens, self.row_index, self.contiguous, self.dt = tuple(hiddens), row_index, contiguous, dt

    def chunk(self, index: int, start: int, stop: int, sink) -> Chunk:
        rows = row_selector(self.row_index, start, stop, self.contiguous)
        hidden = tuple(gather_rows(h, rows).to(self.dt) for h in self.hiddens)
        return Chunk(index, start, stop, rows, hidden, (), sink)

    def release(self) -> None:
        pass


class TileGrads:
    """The student's gradients on the tile path, in the compute dtype ``dt``: ``d_hidden [N, H]`` (each chunk's
    ``[C, H]`` rows accumulated over its tiles, then written to its rows), ``d_weight [V, H]`` and ``d_bias [V]``
    (added to tile by tile); each None where not needed.  ``weight [V, H]`` is the student's weight in ``dt``;
    :meth:`finish` returns the gradients in the dtypes of ``like = (hidden, weight, bias)``."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dt: torch.dtype, *,
                 need_hidden: bool, need_weight: bool, need_bias: bool, like: tuple):
        device = weight.device
        self.d_hidden = torch.zeros(hidden.shape, dtype=dt, device=hidden.device) if need_hidden else None
        self.d_weight = torch.zeros(weight.shape, dtype=dt, device=device) if need_weight else None
        self.d_bias = torch.zeros(weight.shape[0], dtype=dt, device=device) if (need_bias and bias is not None) \
            else None
        self.weight, self.dt, self.width, self.like = weight, dt, weight.shape[1], like
        self._rows = None

    @property
    def active(self) -> bool:
        return self.d_hidden is not None or self.d_weight is not None or self.d_bias is not None

    def begin_chunk(self, chunk: Chunk) -> None:
        self._rows = torch.zeros(chunk.size, self.width, dtype=self.dt, device=self.d_hidden.device) \
            if self.d_hidden is not None else None

    def fold_tile(self, chunk: Chunk, d_logits: torch.Tensor, columns: slice, weight_tile: torch.Tensor,
                  slope: torch.Tensor | None) -> None:
        fold_tile_grad(d_logits, slope, chunk.hidden[0], weight_tile, columns, self._rows, self.d_weight,
                       self.d_bias)

    def add(self, chunk: Chunk, d_logits: torch.Tensor) -> None:
        """A whole-vocabulary ``d(logits) [C, V]`` returned by the epilogue: one tile of every column."""
        self.fold_tile(chunk, d_logits, slice(0, self.weight.shape[0]), self.weight, None)

    def end_chunk(self, chunk: Chunk) -> None:
        if self._rows is not None:
            if isinstance(chunk.rows, slice):
                self.d_hidden[chunk.rows] += self._rows
            else:
                self.d_hidden.index_add_(0, chunk.rows, self._rows)
        self._rows = None

    def finish(self) -> tuple:
        """``(d_hidden [N, H], d_weight [V, H], d_bias [V])`` in the dtypes of ``like`` (None where not needed)."""
        return grads_like((self.d_hidden, self.d_weight, self.d_bias), self.like)
