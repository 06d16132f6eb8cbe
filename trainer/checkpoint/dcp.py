"""Checkpoints of a data-parallel run: ``torch.distributed.checkpoint`` (DCP) folders.

A folder ``checkpoint.dcp`` holds

- the student and the optimizer state, sharded as FSDP2 holds them (``get_state_dict`` / ``set_state_dict``
  of ``torch.distributed.checkpoint.state_dict``; DCP's ``.metadata`` and one ``__R_0.distcp`` per rank);
- ``rng-R.pt``: rank R's Python / NumPy / torch RNG states;
- ``meta.pt``: the number of finished updates, the world size, the run's config and fingerprint (as the
  single-process ``checkpoint.pt``), written last by rank 0.

:func:`save_dcp` writes into ``.checkpoint.dcp.tmp-PID`` (rank 0's pid), reads ``meta.pt`` back, then moves
the current folder to ``checkpoint.prev.dcp`` and the new one into place, as the single-process checkpoint
does with its files.  A resume may run on another number of ranks: DCP reshards the student and the
optimizer state onto the new ranks, and rank r takes the RNG states of saved rank ``r mod N`` (a data-parallel
run samples with ``rollout_rng='per_trajectory'``, whose streams are a function of the seed, the update and
the trajectory, so no training randomness comes from those states); a single process resumes it too
(:mod:`trainer.checkpoint.convert`).  :func:`load_model_weights` reads the student's weights into a plain
model in a single process (for evaluation or export).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import DCP_NAME, DCP_PREVIOUS_NAME, TEMPORARY_MARKER, CheckpointError, _fsync_dir, dcp_paths, remove_path
from ..distributed import DistContext, all_gather_objects, barrier, broadcast_object

META_NAME = "meta.pt"
DCP_METADATA = ".metadata"
META_KEYS = ("step", "world_size", "config", "fingerprint")


def rng_name(rank: int) -> str:
    """The file of rank ``rank``'s RNG states inside a checkpoint folder."""
    return f"rng-{rank}.pt"


def _save_file(payload, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())


def read_meta(path: str | Path, world_size: int | None = None) -> dict:
    """``meta.pt`` of the checkpoint folder ``path``, checked for completeness.

    Raises :class:`CheckpointError` naming ``path`` if the folder, ``meta.pt`` (or one of its keys), DCP's
    ``.metadata`` or an ``rng-R.pt`` of one of its ranks is missing or unreadable, or if ``world_size`` is
    given and differs from the checkpoint's.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder")
    try:
        meta = torch.load(path / META_NAME, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated or foreign: torch raises several types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} has no readable {META_NAME}: {type(error).__name__}: "
                              f"{reason}") from error
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r}: {META_NAME} lacks {missing}; it was not written by "
                              f"this trainer")
    absent = [name for name in [DCP_METADATA] + [rng_name(r) for r in range(int(meta["world_size"]))]
              if not (path / name).is_file()]
    if absent:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {', '.join(absent)} missing")
    if world_size is not None and int(meta["world_size"]) != world_size:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written by {meta['world_size']} ranks and this run has {world_size}; "
            f"resume with torchrun --nproc-per-node={meta['world_size']} (a different number of ranks is not "
            f"supported: each rank's RNG state is its own)")
    return meta


def load_latest_meta(output: str | Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest complete checkpoint folder of ``output`` and its ``meta.pt``.

    Returns ``(path, meta, skipped)`` with ``(path, reason)`` for each newer folder that is incomplete or
    unreadable (``meta["world_size"]``: the ranks that wrote it, which need not be this run's).
    Raises :class:`CheckpointError` naming every folder tried if none is usable.
    """
    skipped = []
    for path in dcp_paths(output):
        if not path.exists():
            continue
        try:
            meta = read_meta(path)
        except CheckpointError as error:
            skipped.append((path, str(error)))
            continue
        return path, meta, skipped
    if not skipped:
        raise CheckpointError(f"no data-parallel checkpoint in {str(output)!r} (neither {DCP_NAME} nor "
                              f"{DCP_PREVIOUS_NAME})")
    raise CheckpointError(f"no readable checkpoint in {str(output)!r}: " + "; ".join(r for _, r in skipped))


def save_dcp(context: DistContext, student, optimizer, meta: dict, rng: dict, output: str | Path) -> Path:
    """Write a checkpoint folder (a collective: every rank calls it); returns ``output/checkpoint.dcp``.

    ``meta`` (rank 0's is written) needs the keys ``step``, ``config``, ``fingerprint``; ``world_size`` is
    added.  ``rng``: this rank's RNG states.  On any rank's failure the temporary folder is removed, the
    previous checkpoints stay as they were, and every rank raises :class:`CheckpointError`.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    output = Path(output)
    path = output / DCP_NAME
    tmp = Path(broadcast_object(str(output / f".{DCP_NAME}{TEMPORARY_MARKER}{os.getpid()}")))
    error = None
    try:
        model_state, optimizer_state = get_state_dict(student, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        _save_file(rng, tmp / rng_name(context.rank))
    except Exception as exc:  # reported to every rank below
        error = f"rank {context.rank}: {type(exc).__name__}: {exc}"
    errors = [e for e in all_gather_objects(error) if e]
    if context.is_main and not errors:
        errors = _publish(tmp, path, output, {**meta, "world_size": context.world_size})
    errors = broadcast_object(errors)
    if errors:
        if context.is_main:
            remove_path(tmp)
        barrier()
        raise CheckpointError(f"writing checkpoint {str(path)!r} failed: " + "; ".join(errors))
    return path


def _publish(tmp: Path, path: Path, output: Path, meta: dict) -> list[str]:
    """Rank 0: write ``meta.pt``, read the folder back, rotate it into place; returns errors (empty: done)."""
    previous = output / DCP_PREVIOUS_NAME
    rotated = False
    try:
        _save_file(meta, tmp / META_NAME)
        written = read_meta(tmp, meta["world_size"])
        if written["step"] != meta["step"]:
            raise CheckpointError(f"{str(tmp)!r} read back step {written['step']}, wrote {meta['step']}")
        _fsync_dir(tmp)
        if path.exists():
            remove_path(previous)
            os.replace(path, previous)
            rotated = True
        os.replace(tmp, path)
        _fsync_dir(output)
    except Exception as exc:  # noqa: BLE001 - every rank raises it
        if rotated and not path.exists():  # interrupted between the two renames: put the current one back
            os.replace(previous, path)
        return [f"rank 0: {type(exc).__name__}: {exc}"]
    return []


def load_dcp(context: DistContext, path: str | Path, student, optimizer, saved_world_size: int) -> dict:
    """Load the student and optimizer state of checkpoint folder ``path`` in place (a collective), resharded
    by DCP when ``saved_world_size`` (the ranks that wrote it) differs from this run's; returns the RNG states
    of saved rank ``rank mod saved_world_size``.  Raises :class:`CheckpointError` if the state does not fit
    the student / optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    try:
        model_state, optimizer_state = get_state_dict(student, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this student/optimizer: {error}") from error
    return torch.load(path / rng_name(context.rank % saved_world_size), map_location="cpu", weights_only=True)


def load_model_weights(path: str | Path, model: torch.nn.Module) -> dict:
    """Read the student's weights of checkpoint folder ``path`` into the plain ``model`` (same architecture)
    in a single process, without a process group; returns the checkpoint's ``meta.pt``."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(path)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return meta
