"""Step weights inside the forward pass (docs/math.md for chunks that hold whole steps).

The distilled rows ``row_index`` are in row-major order, so each step is a contiguous run of them.  A
chunk made of whole steps knows its step means ``d_k`` as soon as its divergences are known, and
``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)`` needs only ``d_1`` of the same sequence, which an
earlier chunk (or this one) computed: the per-step means are kept in a ``[num_steps]`` float64 buffer
filled chunk by chunk, and ``d_1`` is gathered from it.  Everything is a gather or a cumulative sum in
a fixed order: deterministic and free of host synchronisation after the one that builds the plan.

:func:`with_kernel_plan` gives a single pass's weight function (the torch operations below, per chunk) a
:class:`KernelWeightPlan` too: the plan's tensors, which the Triton single pass's row-finish kernel reads to form
the same weights in its one launch per chunk (:func:`sod_kernels.dense.kernels.kl_row_finish`).
"""

from __future__ import annotations

import bisect

import torch

from ..core.chunks import chunks_at_boundaries


class InPassStepWeights:
    """Plan of the steps of the distilled rows and their weights, chunk by chunk.

    Args:
        step_rows: ``[B, T]`` int64 step ids (-1 outside steps).
        row_index: ``[Na]`` int64 flat positions (into ``B * T``) of the distilled rows, ascending.
        epsilon, delta: docs/math.md.
    The constructor makes one host synchronisation (the step starts, ``O(steps)`` integers).
    """

    def __init__(self, step_rows: torch.Tensor, row_index: torch.Tensor, *, epsilon: float, delta: float):
        T = step_rows.shape[1]
        ids = step_rows.reshape(-1)[row_index]
        batch_row = torch.div(row_index, max(T, 1), rounding_mode="floor")
        key = batch_row * (T + 1) + ids
        is_start = torch.ones_like(key, dtype=torch.bool)
        is_start[1:] = key[1:] != key[:-1]
        self.step_of_row = torch.cumsum(is_start, 0) - 1              # [Na] step ordinal of each row
        start_positions = torch.nonzero(is_start).squeeze(1)
        self.starts = start_positions.tolist()                         # the host synchronisation
        self.bounds = torch.cat([start_positions, start_positions.new_full((1,), row_index.numel())])
        self.num_steps = len(self.starts)
        step_k = ids[start_positions]                                  # [S] index of the step in its sequence
        ordinal = torch.arange(self.num_steps, device=row_index.device)
        self.first_step = ordinal - step_k                             # [S] ordinal of its sequence's step 1
        self.is_first = step_k == 0
        self.means = torch.zeros(self.num_steps, dtype=torch.float64, device=row_index.device)
        self.epsilon, self.delta = float(epsilon), float(delta)

    def first_step_of_chunk(self, start: int) -> int:
        """Ordinal of the first step of the chunk that starts at row ``start`` (a Python int: no sync)."""
        return _first_step(self.starts, start)

    def kernel_args(self) -> dict:
        """The whole-call tensors a kernel needs to form the weights of a chunk of whole steps itself:
        ``step_of_row [Na]``, ``bounds [S + 1]`` (step starts, then ``Na``), ``first_step [S]`` (ordinal of each
        step's sequence's first step), all int64, and the float64 ``means [S]`` buffer (each chunk writes its
        steps' means and reads the first steps' means of earlier chunks; a first step in the same chunk is
        recomputed in the same order, so both reads give the same bits)."""
        return {"step": self.step_of_row, "bounds": self.bounds, "first_step": self.first_step, "means": self.means}

    def chunks(self, max_rows: int, n_rows: int) -> list[tuple[int, int]] | None:
        """Chunks of whole steps with at most ``max_rows`` rows, or None if a step is longer."""
        return chunks_at_boundaries(self.starts, n_rows, max_rows)

    def chunk_weights(self, start: int, stop: int, signal: torch.Tensor) -> torch.Tensor:
        """Token weights ``[stop - start]`` float64 of a chunk of whole steps, from its per-token signal
        (D or the sampled-token gap), clamped at 0 as docs/math.md asks of a signal."""
        steps = self.step_of_row[start:stop]
        first, last = int(_first_step(self.starts, start)), int(_first_step(self.starts, stop))
        local = steps - first
        x = signal.detach().to(torch.float64).clamp(min=0)
        csum = torch.cat([x.new_zeros(1), torch.cumsum(x, 0)])
        bounds = self.bounds[first:last + 1] - start  # chunks end at a step start or at the last row
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        counts = (bounds[1:] - bounds[:-1]).to(torch.float64)
        self.means[first:last] = sums / counts
        d_k = self.means[first:last]
        d_1 = self.means[self.first_step[first:last]]
        w = torch.clamp((d_1 + self.epsilon) / (d_k + self.epsilon), max=1.0 + self.delta)
        w = torch.where(self.is_first[first:last], torch.ones_like(w), w)
        return w[local]


class KernelWeightPlan:
    """What a single pass's weight function computes, readable by a backend that forms the weights inside a kernel
    (no per-chunk tensor operation) instead of calling the function chunk by chunk.

    - ``mode``: ``"none"`` (every weight 1), ``"given"`` (``given [Na]`` float32, the precomputed token weights of
      the distilled rows) or ``"steps"`` (``steps``: the :class:`InPassStepWeights` of a plan whose chunks hold
      whole steps; its tensors are what :meth:`InPassStepWeights.kernel_args` lists).
    """

    def __init__(self, mode: str, *, given: torch.Tensor | None = None, steps: InPassStepWeights | None = None):
        if mode not in ("none", "given", "steps"):
            raise ValueError(f"unknown weight mode {mode!r}")
        self.mode, self.given, self.steps = mode, given, steps


def with_kernel_plan(fn, mode: str, *, given: torch.Tensor | None = None, steps: InPassStepWeights | None = None):
    """``fn`` (a weight function ``fn(start, stop, D, signal)``) with the attribute ``kernel_plan`` =
    :class:`KernelWeightPlan` ``(mode, given, steps)``, which the Triton single passes (dense and sparse) read to
    form the weights inside their kernels."""
    fn.kernel_plan = KernelWeightPlan(mode, given=given, steps=steps)
    return fn


def kernel_plan(fn) -> KernelWeightPlan | None:
    """The :class:`KernelWeightPlan` of a weight function made by :func:`with_kernel_plan`, else None."""
    plan = getattr(fn, "kernel_plan", None)
    return plan if isinstance(plan, KernelWeightPlan) else None


def _first_step(starts: list[int], position: int) -> int:
    """Ordinal of the first step that starts at or after ``position`` (``starts`` sorted)."""
    return bisect.bisect_left(starts, position)
