"""The chunk plan of the CPU single passes (the dense and the sparse ``cpu_backend``): chunks of whole
vocabulary rows sized by a byte budget, grown up to a larger budget to hold a whole step when the step
weights are formed inside the pass (:class:`sod_kernels.steps.plan.InPassStepWeights`)."""

from __future__ import annotations

import torch

from ..core.chunks import chunks_at_boundaries, even_chunks
from ..core.cpu_pass import cpu_chunk_rows
from .plan import InPassStepWeights


def cpu_single_pass_plan(step_rows: torch.Tensor, row_index: torch.Tensor, given: torch.Tensor | None,
                         step_divergence: str, epsilon: float, delta: float, chunk_size: int | None, *,
                         row_bytes: int, budget: int, max_budget: int):
    """``(chunks, chunk_weights)`` of a CPU single pass, or None when a step is longer than the largest chunk
    (``chunk_size`` rows if given, else ``max_budget`` bytes of blocks): then the two-pass path runs.

    ``step_rows [B, T]`` int64 step ids, ``row_index [Na]`` the distilled rows, ``given [B, T]`` token weights
    or None; chunks hold ``chunk_size`` rows, else ``budget`` bytes of blocks at ``row_bytes`` bytes per row
    (:func:`sod_kernels.core.cpu_pass.cpu_chunk_rows`).  ``chunk_weights(start, stop, D, signal)`` returns the
    rows' weights ``[stop - start]``.
    """
    n = row_index.numel()
    rows = int(chunk_size) if chunk_size is not None else cpu_chunk_rows(n, row_bytes, budget)
    if given is not None:
        w = given.reshape(-1)[row_index]
        return even_chunks(n, rows), lambda a, b, D, signal: w[a:b]
    if step_divergence == "none":
        return even_chunks(n, rows), lambda a, b, D, signal: torch.ones_like(D)
    steps = InPassStepWeights(step_rows, row_index, epsilon=epsilon, delta=delta)
    chunks = steps.chunks(rows, n)
    if chunks is None and chunk_size is None:
        bounds = steps.starts + [n]
        step_max = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        if step_max <= cpu_chunk_rows(n, row_bytes, max_budget):
            chunks = chunks_at_boundaries(steps.starts, n, max(step_max, rows))
    if chunks is None:
        return None
    return chunks, lambda a, b, D, signal: steps.chunk_weights(a, b, signal)
