"""The chunked core every GPU loss shares: row chunks, fp32 logit blocks from matrix products, and the
atomic-free contraction of ``d(logits)`` into the student's gradients.

A loss on this core is a loop over *row chunks* (``C`` distilled tokens against the whole vocabulary):

1. ``logits_into``: ``x = h[rows] @ W[:V].T`` for each model, one matrix product per model (cuBLAS on a GPU)
   with float32 output, whatever the input dtype.  Biases and ``1 / temperature`` are applied by the
   epilogue kernels when they read the block, so the block is the raw product.
2. the loss's *epilogue* (one Triton kernel for the per-row softmax statistics, a few O(C) tensor ops for
   the loss and its per-row upstream scale, one Triton kernel writing ``d(logits)`` in the input dtype);
3. ``GradAccumulator.add``: ``d(hidden)[rows] = d(logits) @ W`` (written once per row: every row lies in
   exactly one chunk) and ``d(weight) += d(logits).T @ h[rows]``, ``d(bias) += colsum(d(logits))``,
   accumulated in float32 across chunks by matrix products (each d(weight) product folds at least 1024 rows,
   two 512-row chunks by default, with d(bias) folded by the same schedule as one ``d(logits)^T @ ones``
   product; the fold reads contiguous hidden rows in place and gathered ones from where the logit product's
   gather put them: see :class:`GradAccumulator`).  No atomics: the chunks run in a fixed order
   and each product accumulates in a fixed order, so results are bitwise reproducible on one GPU.

Cost per chunk (student width ``Hs``, teacher ``Ht``, vocabulary ``V``): the logit products
``2 C V (Hs + Ht)`` FLOPs, the contraction ``4 C V Hs``; bytes: the float32 blocks are written once by the
products and read twice by the epilogue (statistics, then ``d(logits)``), ``d(logits)`` (2 bytes per
entry for 16-bit inputs) is written once and read by the two products, and the float32 ``d(weight)``
accumulator (``4 V Hs`` bytes) is read and written once per chunk.  The last term is why chunks should
not be small: with ``C`` rows the accumulation moves ``8 V Hs`` bytes for ``2 C V Hs`` FLOPs, i.e.
``C / 4`` FLOP per byte, compute bound on an H100/H200 (~200-300 FLOP/B) from ``C`` of about 1024.  Measured
on an H200 at the headline size with one product per 512-row chunk: 15.1 ms against 7.2 ms for a single
K = 16384 product; folding two chunks per product halves that traffic.

Memory: per chunk ``C x V`` float32 per model plus two ``C x V`` blocks of ``d(logits)``, the float32
``d(weight)`` accumulator, and O(N) statistics; never ``N x V``.  :func:`chunk_rows` sizes ``C`` from a
byte budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .runtime import triton_interpreter_enabled

# Bytes the fast path's per-chunk blocks may take by default.  At V = 152k the KL loss's blocks (two float32
# logit blocks and one 16-bit gradient block, 10 bytes per entry) give 512-row chunks: with the d(weight) fold
# buffer (1024 rows of 16-bit d(logits), 0.3 GB) and the float32 d(weight) accumulator of a 152k x 1024 head
# (0.6 GB), about 1.5 GiB beyond the inputs.
FAST_CHUNK_BYTES = 768 << 20
# The low-memory path keeps its blocks (and the d(weight) slice accumulators) near this size.
LOW_MEMORY_CHUNK_BYTES = 96 << 20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 8192
ROW_MULTIPLE = 32         # chunk sizes are multiples of this when they exceed it ...
LARGE_ROW_MULTIPLE = 128  # ... and multiples of this above it (whole tensor-core tiles; 256-token steps pair up)
# Rows of d(logits) folded into d(weight) by one matrix product (each product reads and writes the whole float32
# accumulator, 4 V H bytes twice): at least this many, from whole chunks.  SOD_KERNELS_FOLD_ROWS overrides it
# (1 .. MAX_FOLD_ROWS); more rows, fewer accumulator passes, one more 16-bit C x V block per extra chunk.
DEFAULT_FOLD_ROWS = 1024
MAX_FOLD_ROWS = 4096
# How the fast path's d(weight) fold runs (SOD_KERNELS_FOLD_IMPL, see fold_impl()): "addmm" (the default),
# "triton" (sod_kernels.core.fold_kernels) or "transposed" (a [H, V] accumulator).
FOLD_IMPLS = ("addmm", "triton", "transposed")
DEFAULT_FOLD_IMPL = "addmm"
# d(bias) of folded blocks as one product ``d(logits)^T @ ones`` per fold (one launch) instead of a column sum and an
# add (two launches).
BIAS_BY_PRODUCT = True


@dataclass(frozen=True)
class LMHead:
    """One model's side of the problem: ``hidden [N, H]`` (rows are tokens), ``weight [Vw, H]`` of which
    the first ``vocab`` rows are used (a padded vocabulary is never copied), optional ``bias [Vw]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    vocab: int

    @property
    def used_weight(self) -> torch.Tensor:
        return self.weight[: self.vocab]

    @property
    def used_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[: self.vocab]


def chunk_rows(n_rows: int, vocab: int, bytes_per_entry: int, *, budget: int = FAST_CHUNK_BYTES,
               chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as ``budget`` bytes of ``C x V`` blocks allow
    (``bytes_per_entry`` = bytes per (row, column) across all of a chunk's blocks), a multiple of 32 rows
    when above 32, between ``MIN_CHUNK_ROWS`` and ``MAX_CHUNK_ROWS``, and never more than ``n_rows``."""
    if chunk_size is not None:
        rows = int(chunk_size)
    else:
        rows = budget // max(vocab * bytes_per_entry, 1)
        rows = min(max(rows, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS)
        if rows > LARGE_ROW_MULTIPLE:
            rows -= rows % LARGE_ROW_MULTIPLE
        elif rows > ROW_MULTIPLE:
            rows -= rows % ROW_MULTIPLE
    return max(min(rows, max(n_rows, 1)), 1)


def fold_rows() -> int:
    """Rows of d(logits) per d(weight) product: ``SOD_KERNELS_FOLD_ROWS`` if set (an integer in
    ``[1, MAX_FOLD_ROWS]``), else ``DEFAULT_FOLD_ROWS``."""
    raw = os.environ.get("SOD_KERNELS_FOLD_ROWS", "").strip()
    if not raw:
        return DEFAULT_FOLD_ROWS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_FOLD_ROWS:
        raise ValueError(f"SOD_KERNELS_FOLD_ROWS must be an integer in [1, {MAX_FOLD_ROWS}], got {raw!r}")
    return value


def fold_impl() -> str:
    """How the fast path folds ``d(logits)`` into the float32 d(weight) accumulator: ``SOD_KERNELS_FOLD_IMPL`` if
    set (one of :data:`FOLD_IMPLS`), else ``DEFAULT_FOLD_IMPL``.

    - ``"addmm"``: ``acc[V, H] += d(logits)^T @ h`` by ``addmm`` (cuBLAS on a GPU), the default;
    - ``"triton"``: the same product by :func:`sod_kernels.core.fold_kernels.fold_into`, a Triton GEMM that loads
      each accumulator tile before its K loop (the accumulator traffic overlaps the products).  CUDA tensors, and
      CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, how the tests run it); plain CPU tensors
      fall back to ``"addmm"``;
    - ``"transposed"``: the accumulator kept as ``[H, V]`` and folded by ``acc_T += h^T @ d(logits)``, transposed
      once by :meth:`GradAccumulator.finish`.
    Read once per :class:`GradAccumulator`; only its whole-vocabulary (not ``sliced``) d(weight) fold depends on it.
    """
    raw = os.environ.get("SOD_KERNELS_FOLD_IMPL", "").strip()
    if not raw:
        return DEFAULT_FOLD_IMPL
    if raw not in FOLD_IMPLS:
        raise ValueError(f"SOD_KERNELS_FOLD_IMPL must be one of {', '.join(map(repr, FOLD_IMPLS))}, got {raw!r}")
    return raw


def fold_group(block_rows: int, rows: int | None = None) -> int:
    """Chunks of ``block_rows`` rows per d(weight) product: enough whole chunks for ``rows`` (default
    :func:`fold_rows`) rows, at least one."""
    rows = fold_rows() if rows is None else rows
    return max(1, -(-rows // max(block_rows, 1)))


def even_chunks(n_rows: int, rows: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_rows)`` in chunks of at most ``rows`` rows."""
    return [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]


def chunks_at_boundaries(boundaries: list[int], n_rows: int, rows: int) -> list[tuple[int, int]] | None:
    """Chunks of at most ``rows`` rows that only end at the given segment starts (and ``n_rows``).

    ``boundaries`` are the sorted start positions of the segments (steps) in ``range(n_rows)``; a chunk is a
    run of whole segments.  Returns None when one segment alone is longer than ``rows``.
    """
    ends = boundaries[1:] + [n_rows]
    chunks, start = [], 0
    for seg_start, seg_end in zip(boundaries, ends):
        if seg_end - seg_start > rows:
            return None
        if seg_end - start > rows:
            chunks.append((start, seg_start))
            start = seg_start
    if n_rows > start:
        chunks.append((start, n_rows))
    return chunks


# ------------------------------------------------------------------------------------ matrix products
def _gpu_mixed_products(device: torch.device) -> bool:
    """Whether 16-bit x 16-bit -> float32 products (``out_dtype``) run on this device (CUDA, torch >= 2.8)."""
    return device.type == "cuda" and hasattr(torch.ops.aten.mm, "dtype")


def logits_into(out: torch.Tensor, hidden_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out[:] = hidden_rows @ weight.T`` in float32 (``out`` is ``[C, V]`` float32, contiguous).

    16-bit inputs multiply on tensor cores with float32 accumulation and float32 output (no rounding of
    the logits to 16 bits); float32 inputs multiply in float32 (TF32 only if the caller enabled it).  On a
    CPU (the Triton interpreter's tests) 16-bit inputs are cast to float32 first.
    """
    if hidden_rows.dtype == torch.float32:
        return torch.mm(hidden_rows, weight.T, out=out)
    if _gpu_mixed_products(out.device):
        return torch.mm(hidden_rows, weight.T, out_dtype=torch.float32, out=out)
    return torch.mm(hidden_rows.float(), weight.float().T, out=out)


def _accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 and ``a``, ``b`` in the input dtype (float32 accumulation)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _gpu_mixed_products(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class GradAccumulator:
    """The student's gradients, accumulated block by block from ``d(logits)`` without atomics.

    Rows are addressed by their position ``[start, stop)`` in the distilled-row order ``row_index``.  The
    caller writes each block's ``d(logits)`` into :meth:`grad_block` and then calls :meth:`add`.

    - Whole-vocabulary blocks (the fast path): each row's d(hidden) is one matrix product with float32
      accumulation, written once in the input dtype.  d(weight) is a float32 accumulator; since every
      accumulation reads and writes all ``4 V H`` of its bytes, the ``d(logits)`` blocks of several chunks
      (:func:`fold_group`: at least :func:`fold_rows` rows, 1024 by default) are kept side by side in one buffer
      and folded by a single product with ``K = group x C`` (at 512-row chunks half the accumulator traffic of
      one product per chunk, for one more ``C x V`` gradient block of memory).
    - Vocabulary slices (``sliced=True``, the low-memory path): d(hidden) is a float32 accumulator; d(weight)
      is written slice by slice (:meth:`begin_slice` / :meth:`end_slice`) from a float32 accumulator of one
      slice, so no ``V x H`` float32 buffer exists.
    While folding, no hidden row is copied for the fold: rows that are a view of ``hidden`` (contiguous rows) are
    read in place by the fold's product, and rows gathered by :meth:`hidden_rows` land in the fold buffer already
    (the gather the logit product needs anyway); only other callers' gathered rows are copied once.  d(bias) is a
    float32 accumulator, added to once per fold (``BIAS_BY_PRODUCT``: one ``d(logits)^T @ ones`` product) when
    folding, else once per block.  Per block this leaves the d(hidden) product; per fold the d(weight) product and
    the d(bias) product.  The d(weight) product of the whole-vocabulary path runs as :func:`fold_impl` says (read
    once, here): ``addmm``, the Triton fold kernel, or ``addmm`` into a transposed ``[H, V]`` accumulator.
    :meth:`finish` returns everything in the inputs' dtypes and shapes:
    ``d_hidden [N, H]`` (zero on rows outside ``row_index``), ``d_weight [Vw, H]``, ``d_bias [Vw]``.
    """

    GROUP = 2  # chunks per d(weight) product assumed by callers' memory estimates at the default fold

    def __init__(self, head: LMHead, row_index: torch.Tensor, contiguous: bool, *, need_hidden: bool,
                 need_weight: bool, need_bias: bool, block_rows: int = 1, block_cols: int | None = None,
                 sliced: bool = False):
        h, w = head.hidden, head.weight
        self.head, self.row_index, self.contiguous, self.sliced = head, row_index, contiguous, sliced
        n_active = row_index.numel()
        f32 = torch.float32
        self.d_hidden = torch.zeros(n_active, h.shape[1], dtype=f32 if sliced else h.dtype, device=h.device) \
            if need_hidden else None
        impl = fold_impl()
        if sliced or (impl == "triton" and w.device.type != "cuda" and not triton_interpreter_enabled()):
            impl = "addmm"  # the sliced path keeps its products; Triton needs CUDA tensors or the interpreter
        self._fold_impl = impl
        if need_weight:
            if sliced:
                self.d_weight = torch.empty(head.vocab, w.shape[1], dtype=w.dtype, device=w.device)
            elif impl == "transposed":  # [H, V], transposed once by finish()
                self.d_weight = torch.zeros(w.shape[1], head.vocab, dtype=f32, device=w.device)
            else:
                self.d_weight = torch.zeros(head.vocab, w.shape[1], dtype=f32, device=w.device)
        else:
            self.d_weight = None
        self._slice, self._slice_acc = None, None
        self.d_bias = torch.zeros(head.vocab, dtype=f32, device=w.device) \
            if (need_bias and head.bias is not None) else None
        # Chunks per d(weight) product: enough for fold_rows() rows, but never more than the call has, and a
        # fold buffer (rows x V in the input dtype) never larger than the float32 accumulator it feeds (4 V H).
        block = max(block_rows, 1)
        chunks_in_call = -(-n_active // block)
        by_memory = (4 * h.shape[1]) // (h.element_size() * block)
        group = max(1, min(fold_group(block), chunks_in_call, by_memory)) if (self.d_weight is not None and
                                                                              not sliced) else 1
        self._capacity = max(block_rows, 1) * group                # rows the gradient buffer holds
        self._grad = None                                           # allocated at the first block
        self._cols = block_cols if block_cols is not None else head.vocab
        self._pending = 0                                           # rows of d(logits) not yet in d(weight)
        self._folding = group > 1
        self._pending_hidden = None                                 # [capacity, H] gathered rows (made lazily)
        self._view_start = None  # pending hidden rows are hidden[_view_start : + _pending] (no copy), or None
        self._ones = None        # [capacity, 1] ones: d(bias) as one product per fold

    @property
    def active(self) -> bool:
        return self.d_hidden is not None or self.d_weight is not None or self.d_bias is not None

    def grad_block(self, n: int, width: int | None = None) -> torch.Tensor:
        """A contiguous ``[n, width]`` block (input dtype) for the next chunk's ``d(logits)``."""
        width = self._cols if width is None else width
        if self._grad is None:
            self._grad = torch.empty(self._capacity * self._cols, dtype=self.head.hidden.dtype,
                                     device=self.head.hidden.device)
        if not self._folding:
            return self._grad[: n * width].view(n, width)
        self._reserve(n)
        return self._grad[self._pending * width: (self._pending + n) * width].view(n, width)

    def _reserve(self, n: int) -> None:
        """Fold the pending blocks first if ``n`` more rows would not fit."""
        if self._pending + n > self._capacity:
            self._flush()

    def _pending_buffer(self) -> torch.Tensor:
        h = self.head.hidden
        if self._pending_hidden is None:
            self._pending_hidden = torch.empty(self._capacity, h.shape[1], dtype=h.dtype, device=h.device)
        return self._pending_hidden

    def hidden_rows(self, rows: torch.Tensor | slice, start: int, stop: int) -> torch.Tensor:
        """The student hidden rows ``[stop - start, H]`` of the next block (distilled rows ``[start, stop)``, selected
        by ``rows`` as :func:`row_selector` gives them), ready for :meth:`add`: a view for a slice; for an index
        tensor gathered straight into the d(weight) fold buffer when folding (so :meth:`add` copies nothing),
        else one gather.  Call it before :meth:`grad_block` of the same block."""
        h = self.head.hidden
        if isinstance(rows, slice):
            return h[rows]
        if self.d_weight is None or not self._folding:
            return h.index_select(0, rows)
        n = stop - start
        self._reserve(n)
        self._materialize_view()
        return torch.index_select(h, 0, rows, out=self._pending_buffer()[self._pending: self._pending + n])

    def _is_hidden_view(self, hidden_rows: torch.Tensor, start: int, stop: int) -> bool:
        """Whether ``hidden_rows`` is the view ``hidden[start:stop]`` (contiguous rows: no copy needed)."""
        h = self.head.hidden
        return (self.contiguous and hidden_rows.dtype == h.dtype and hidden_rows.dim() == 2 and
                hidden_rows.shape[0] == stop - start and hidden_rows.shape[1] == h.shape[1] and
                hidden_rows.stride() == h.stride() and stop > start and
                hidden_rows.data_ptr() == h.data_ptr() + start * h.stride(0) * h.element_size())

    def _materialize_view(self) -> None:
        """Copy pending rows that are still a view of ``hidden`` into the fold buffer (a block that is not the
        next contiguous view arrived)."""
        if self._view_start is not None:
            if self._pending:
                a = self._view_start
                self._pending_buffer()[: self._pending] = self.head.hidden[a: a + self._pending]
            self._view_start = None

    def _stage_hidden(self, hidden_rows: torch.Tensor, start: int, stop: int) -> None:
        """Record the hidden rows of a pending block: nothing to do for the next contiguous view of ``hidden``
        or for rows :meth:`hidden_rows` already gathered into place; else one copy."""
        n = stop - start
        if self._pending == 0 and self._is_hidden_view(hidden_rows, start, stop):
            self._view_start = start
        elif self._view_start is not None and start == self._view_start + self._pending and \
                self._is_hidden_view(hidden_rows, start, stop):
            pass
        else:
            self._materialize_view()
            slot = self._pending_buffer()[self._pending: self._pending + n]
            if not (hidden_rows.data_ptr() == slot.data_ptr() and hidden_rows.shape == slot.shape and
                    hidden_rows.stride() == slot.stride() and hidden_rows.dtype == slot.dtype):
                slot.copy_(hidden_rows)
        self._pending += n

    def add(self, d_logits: torch.Tensor, start: int, stop: int, hidden_rows: torch.Tensor,
            columns: slice | None = None) -> None:
        """Fold one block: ``d_logits [C, Vc]`` (from :meth:`grad_block`) of the distilled rows
        ``[start, stop)`` and the vocabulary columns ``columns`` (default: all ``vocab``; only with
        ``sliced``); ``hidden_rows [C, H]`` are those rows' hidden states."""
        if columns is not None and not self.sliced:
            raise ValueError("vocabulary-sliced blocks need a GradAccumulator made with sliced=True")
        cols = columns if columns is not None else slice(0, self.head.vocab)
        w = self.head.weight[cols]
        if self.d_hidden is not None:
            if self.sliced:
                _accumulate_product(self.d_hidden[start:stop], d_logits, w)
            else:
                torch.mm(d_logits, w, out=self.d_hidden[start:stop])
        if self.d_weight is not None:
            if self.sliced:
                if self._slice != cols:
                    raise ValueError("GradAccumulator.add: call begin_slice(columns) before adding a slice's blocks")
                _accumulate_product(self._slice_acc, d_logits.T, hidden_rows)
            elif self._folding:  # folded with the next chunks' blocks by _flush (d(bias) too)
                self._stage_hidden(hidden_rows, start, stop)
                return
            else:
                self._fold_weight(d_logits, hidden_rows)
        if self.d_bias is not None:
            self.d_bias[cols] += d_logits.sum(0, dtype=torch.float32)

    def _flush(self) -> None:
        """``d(weight) += [pending d(logits)]^T [pending hidden rows]`` in one product."""
        if self._pending:
            n = self._pending
            grad = self._grad[: n * self._cols].view(n, self._cols)
            if self._view_start is not None:
                hidden = self.head.hidden[self._view_start: self._view_start + n]
            else:
                hidden = self._pending_buffer()[:n]
            self._fold_weight(grad, hidden)
            if self.d_bias is not None:
                self._fold_bias(grad)
            self._pending, self._view_start = 0, None

    def _fold_weight(self, grad: torch.Tensor, hidden: torch.Tensor) -> None:
        """``d(weight) += grad^T @ hidden`` (``grad [K, V]``, ``hidden [K, H]``, float32 accumulation) the
        :func:`fold_impl` way."""
        if self._fold_impl == "triton":
            from .fold_kernels import fold_into  # Triton only on this path

            fold_into(self.d_weight, grad, hidden)
        elif self._fold_impl == "transposed":
            _accumulate_product(self.d_weight, hidden.T, grad)  # [H, V] += [H, K] @ [K, V]
        else:
            _accumulate_product(self.d_weight, grad.T, hidden)

    def _fold_bias(self, grad: torch.Tensor) -> None:
        """``d(bias) += colsum(grad)`` for the pending rows: one product ``grad^T @ ones`` (float32 accumulation,
        a fixed order) with ``BIAS_BY_PRODUCT``, else a column sum and an add (two launches)."""
        if not BIAS_BY_PRODUCT:
            self.d_bias += grad.sum(0, dtype=torch.float32)
            return
        n = grad.shape[0]
        if self._ones is None:
            self._ones = torch.ones(self._capacity, 1, dtype=grad.dtype, device=grad.device)
        _accumulate_product(self.d_bias.view(-1, 1), grad.T, self._ones[:n])

    def begin_slice(self, columns: slice) -> None:
        """Start the blocks of one vocabulary slice (sliced mode): a float32 d(weight) accumulator for it."""
        self._slice = columns
        if self.d_weight is not None:
            self._slice_acc = torch.zeros(columns.stop - columns.start, self.d_weight.shape[1], dtype=torch.float32,
                                          device=self.d_weight.device)

    def end_slice(self) -> None:
        """Write the slice's d(weight) rows in the input dtype."""
        if self.d_weight is not None:
            self.d_weight[self._slice] = self._slice_acc.to(self.d_weight.dtype)
        self._slice, self._slice_acc = None, None

    def finish(self):
        """``(d_hidden [N, H], d_weight [Vw, H], d_bias [Vw])`` in the inputs' dtypes (None where not needed)."""
        if self.d_weight is not None and not self.sliced:
            self._flush()
        self._grad = self._pending_hidden = self._ones = None
        h, w, b = self.head.hidden, self.head.weight, self.head.bias
        d_hidden = d_weight = d_bias = None
        if self.d_hidden is not None:
            d_active = self.d_hidden.to(h.dtype)
            if self.contiguous and d_active.shape[0] == h.shape[0]:
                d_hidden = d_active
            else:
                d_hidden = torch.zeros_like(h).index_copy_(0, self.row_index, d_active)
        if self.d_weight is not None:
            if self._fold_impl == "transposed":  # [H, V] -> [V, H]: one transposing copy (with the cast)
                d_weight = _pad_rows(self.d_weight.T.to(w.dtype, memory_format=torch.contiguous_format), w.shape[0])
            else:
                d_weight = _pad_rows(self.d_weight.to(w.dtype), w.shape[0])
        if self.d_bias is not None:
            d_bias = _pad_rows(self.d_bias.to(b.dtype), b.shape[0])
        self.d_hidden = self.d_weight = self.d_bias = None
        return d_hidden, d_weight, d_bias


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (the padded part of a vocabulary gets zero gradient)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0],) + tuple(x.shape[1:]))])


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """``hidden[rows]`` (a view for a slice, a gathered copy for an index tensor)."""
    return hidden[rows] if isinstance(rows, slice) else hidden.index_select(0, rows)


def row_selector(row_index: torch.Tensor, start: int, stop: int, contiguous: bool):
    """The rows of chunk ``[start, stop)``: a slice when ``row_index`` is ``arange`` (``contiguous``)."""
    return slice(start, stop) if contiguous else row_index[start:stop]


def row_plan(hidden: torch.Tensor, weight: torch.Tensor, row_index: torch.Tensor, dtypes: tuple[torch.dtype, ...]):
    """``(hidden, weight, rows, contiguous)`` of a Triton path: ``hidden`` and ``weight`` with unit column stride,
    ``rows`` int64 contiguous, and whether they are ``arange(N)`` (chunks are then slices, no gathers).  Raises
    TypeError for a hidden dtype outside ``dtypes``."""
    if hidden.dtype not in dtypes:
        raise TypeError(f"the Triton backend supports float32, bfloat16 and float16 hidden states, got "
                        f"{hidden.dtype}; use backend='torch' for float64")
    rows = row_index.to(torch.int64).contiguous()
    n = rows.numel()
    contiguous = n == hidden.shape[0] and (n == 0 or bool(rows[-1] == n - 1))
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return hidden, weight, rows, contiguous
