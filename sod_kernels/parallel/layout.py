"""Process-group plumbing of the vocabulary-parallel functions (:mod:`sod_kernels.vocab_parallel`).

- :func:`resolve_group`: the ``process_group`` argument -> (group, rank in it, its size).
- :func:`exchange_descriptors`: the one small collective every call starts with.  Each rank sends a
  float64 vector: an error flag (its own input validation failed), its vocabulary shard (``vocab_start``
  and row counts) and everything that must agree across ranks (token counts, shapes, dtypes, options, a
  checksum of the distilled positions and target ids).  Every rank receives every vector and reaches the
  same verdict, so a bad input on one rank raises on all ranks instead of leaving the others waiting in a
  collective.  The shards must tile ``[0, V)`` (any rank order); ``V`` is the sum of the shard sizes.
- :func:`gather_stats`: all-gather of a ``[P, Na]`` per-token statistics block -> ``[P, Na, world]`` in rank
  order (deterministic: every rank merges the same values in the same order, bitwise identically).
- :func:`all_reduce_hidden_grad`: the column-parallel layer's hidden-state gradient, summed over ranks (only
  the distilled rows travel; 16-bit gradients are summed in float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ERROR, _START, _ROWS, _TEACHER_ROWS = 0, 1, 2, 3  # leading slots of a descriptor; agreed fields follow


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank's vocabulary rows sit: ids ``[vocab_start, vocab_stop)`` of the full ``vocab``.

    ``group`` is the process group (None: the default group), ``rank`` this process's rank in it, ``world``
    its size; ``starts`` / ``sizes`` the shard of every rank (in rank order)."""

    group: object
    rank: int
    world: int
    vocab_start: int
    vocab_stop: int
    vocab: int
    starts: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def shard(self) -> int:
        return self.vocab_stop - self.vocab_start


def check_process_group(process_group) -> None:
    """TypeError unless ``process_group`` is None (the default group) or a ``torch.distributed`` group (needs no
    initialized process group: the ``nn.Module`` forms check their option when they are built)."""
    if process_group is None:
        return
    if dist.is_available() and (process_group == dist.GroupMember.NON_GROUP_MEMBER or
                                isinstance(process_group, dist.ProcessGroup)):
        return
    raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None (the default group), got "
                    f"{type(process_group).__name__}")


def resolve_group(process_group) -> tuple[object, int, int]:
    """``(group, rank, world)`` of ``process_group`` (None: the default group); clear errors when
    torch.distributed is not initialized or this process is not a member of the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("the vocabulary-parallel functions need torch.distributed initialized "
                           "(torch.distributed.init_process_group) on every rank of process_group")
    check_process_group(process_group)
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group: every rank that holds a vocabulary "
                         "shard must call with a group it belongs to (the group that shards the lm_head)")
    return process_group, rank, dist.get_world_size(process_group)


def dtype_code(dtype: torch.dtype) -> float:
    return float(DTYPE_CODES.index(dtype)) if dtype in DTYPE_CODES else -1.0


def choice_code(value: str, choices: tuple[str, ...]) -> float:
    return float(choices.index(value)) if value in choices else -1.0


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def exchange_descriptors(group, rank: int, world: int, device: torch.device, *, vocab_start: int | None,
                         rows: int, teacher_rows: int | None, fields: tuple[str, ...],
                         agreed: dict[str, float], error: BaseException | None, what: str) -> ShardLayout:
    """All-gather each rank's descriptor and check it; returns this rank's :class:`ShardLayout`.

    Args:
        vocab_start: this rank's first vocabulary id, or None for "shards in rank order" (the start is the
            sum of the lower ranks' sizes).
        rows: this rank's student (or only) weight rows; teacher_rows: its teacher weight rows or None.
        fields: the names of the values every rank must pass identically (the same tuple on every rank);
        agreed: name -> value (float) for those names; a name not filled in (validation failed first) sends 0.
        error: this rank's input-validation error, or None.  Re-raised here after the exchange; other ranks
            raise a ValueError naming this rank.
        what: the calling function's name, for messages.
    Raises ValueError (on every rank alike) when fields disagree or the shards do not tile ``[0, V)``.
    """
    head = [1.0 if error is not None else 0.0, -1.0 if vocab_start is None else float(vocab_start), float(rows),
            -1.0 if teacher_rows is None else float(teacher_rows)]
    unknown = set(agreed) - set(fields)
    if unknown:
        raise RuntimeError(f"{what}: descriptor fields {sorted(unknown)} are not declared")
    names = list(fields)
    mine = torch.tensor(head + [float(agreed.get(k, 0.0)) for k in names], dtype=torch.float64, device=device)
    if world > 1:
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine, group=group)
        table = torch.stack(parts).tolist()
    else:
        table = [mine.tolist()]
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(table) if row[_ERROR] != 0]
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} of process_group rejected their inputs (see the error raised "
                         "there); every rank must pass valid inputs")
    for i, name in enumerate(names):
        values = [row[len(head) + i] for row in table]
        if not all(_same(v, values[0]) for v in values):
            raise ValueError(f"{what}: every rank of process_group must pass the same {name} (the same tokens, "
                             f"shapes and options; only the vocabulary shards differ), got {values} by rank")
    return _layout(group, rank, world, table, what)


def _layout(group, rank: int, world: int, table: list[list[float]], what: str) -> ShardLayout:
    sizes = [int(row[_ROWS]) for row in table]
    given = [row[_START] >= 0 for row in table]
    if any(given) and not all(given):
        raise ValueError(f"{what}: vocab_start must be given on every rank or on none (None: shards in rank order), "
                         f"got it on ranks {[r for r, g in enumerate(given) if g]} only")
    starts = [int(row[_START]) for row in table] if all(given) else [sum(sizes[:r]) for r in range(world)]
    order = sorted(range(world), key=lambda r: (starts[r], r))
    expected = 0
    for r in order:
        if starts[r] != expected:
            kind = "overlap" if starts[r] < expected else "leave a gap"
            shards = ", ".join(f"rank {q}: [{starts[q]}, {starts[q] + sizes[q]})" for q in range(world))
            raise ValueError(f"{what}: the vocabulary shards must tile [0, V) with contiguous, disjoint ranges; they "
                             f"{kind} at id {min(starts[r], expected)} ({shards})")
        expected += sizes[r]
    vocab = expected  # the sum of the shard sizes
    if table[0][_TEACHER_ROWS] >= 0:
        last = order[-1]
        for r in range(world):
            t = int(table[r][_TEACHER_ROWS])
            if (r != last and t != sizes[r]) or (r == last and t < sizes[r]):
                need = f"at least {sizes[r]} (the last shard may carry padding rows)" if r == last else str(sizes[r])
                raise ValueError(f"{what}: teacher_weight on rank {r} has {t} rows; it must hold the same vocabulary "
                                 f"ids as that rank's student_weight, i.e. {need} rows")
    return ShardLayout(group, rank, world, starts[rank], starts[rank] + sizes[rank], vocab, tuple(starts), tuple(sizes))


def gather_stats(layout: ShardLayout, stats: torch.Tensor) -> torch.Tensor:
    """``[P, Na]`` per-token statistics of every rank -> ``[P, Na, world]`` in rank order."""
    stats = stats.contiguous()
    if layout.world == 1 or stats.shape[-1] == 0:  # no token: every rank agrees (checked), nothing to send
        return stats.unsqueeze(-1)
    parts = [torch.empty_like(stats) for _ in range(layout.world)]
    dist.all_gather(parts, stats, group=layout.group)
    return torch.stack(parts, dim=-1)


def all_reduce_hidden_grad(layout: ShardLayout, d_hidden: torch.Tensor, row_index: torch.Tensor) -> torch.Tensor:
    """Sum of every rank's partial ``d_hidden [N, H]`` (rows outside ``row_index`` are zero on every rank and
    are not sent); 16-bit gradients are summed in float32 and rounded once."""
    if layout.world == 1:
        return d_hidden
    every_row = row_index.numel() == d_hidden.shape[0]
    rows = d_hidden if every_row else d_hidden.index_select(0, row_index)
    wide = torch.float64 if d_hidden.dtype == torch.float64 else torch.float32
    buf = rows.to(wide, copy=True).contiguous()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=layout.group)
    if every_row:
        return buf.to(d_hidden.dtype)
    return torch.zeros_like(d_hidden).index_copy_(0, row_index, buf.to(d_hidden.dtype))
