"""Deterministic segmented prefix sums, the reduction behind the step means (docs/math.md).

A float ``scatter_add_`` / ``index_add_`` adds in an order that depends on thread scheduling on CUDA, and
``torch.cumsum`` on floating CUDA tensors is documented as nondeterministic too.  The scan here uses only
elementwise additions between shifted views, so the order of every addition is fixed by the shapes alone:
identical inputs give bitwise-identical sums on any device (and under ``torch.use_deterministic_algorithms``).
Each segment's sum only involves that segment's values, so a large earlier segment costs no precision
(no difference of two long prefix sums).

Work is O(R N): per level, ``log2(CHUNK)`` passes over the data split into chunks of ``CHUNK`` positions; the
chunks' last partial sums form the next level's input, ``CHUNK`` times shorter.  No host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 32


def _doubling_scan(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Segmented inclusive scan along the last dimension by doubling (Hillis-Steele); ``L`` small."""
    length = values.shape[-1]
    values = values.clone()
    shift = 1
    while shift < length:
        # The carry is a new tensor read before the in-place add: every pass reads the previous pass only.
        carry = values[..., :-shift].masked_fill(segments[..., shift:] != segments[..., :-shift], 0)
        values[..., shift:] += carry
        shift *= 2
    return values


def segmented_cumsum(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums of each row that restart wherever the segment id changes.

    Args:
        values: ``[R, N]`` floating.
        segments: ``[R, N]`` integer segment ids, non-decreasing along each row (so equal ids are contiguous).
    Returns:
        ``[R, N]`` of ``values.dtype``: entry ``(r, n)`` is the sum of ``values[r, m]`` over ``m <= n`` in the
        same segment as ``n``; at a segment's last position it is the segment's sum.
    """
    rows, length = values.shape
    if length <= CHUNK:
        return _doubling_scan(values, segments)
    chunks = -(-length // CHUNK)
    pad = chunks * CHUNK - length
    if pad:  # zeros in the last segment change no sum
        values = F.pad(values, (0, pad))
        segments = torch.cat([segments, segments[:, -1:].expand(rows, pad)], dim=1)
    seg = segments.reshape(rows, chunks, CHUNK)
    local = _doubling_scan(values.reshape(rows, chunks, CHUNK), seg)
    # Sum of each chunk's last segment up to the chunk's end, over all earlier chunks.
    tail_segments = seg[..., -1].contiguous()
    tails = segmented_cumsum(local[..., -1].contiguous(), tail_segments)
    # A chunk's leading positions continue the previous chunk's last segment when their ids match.
    carry = tails[:, :-1, None].expand(-1, -1, CHUNK).masked_fill(seg[:, 1:] != tail_segments[:, :-1, None], 0)
    local[:, 1:] += carry
    return local.reshape(rows, chunks * CHUNK)[:, :length]
