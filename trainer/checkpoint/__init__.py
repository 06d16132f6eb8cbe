"""Checkpoint files of a training run, and the checks that keep one run's files from mixing with another's.

- :func:`save_checkpoint` writes ``checkpoint.pt`` through a temporary file that is fsynced and read back
  before it replaces anything; the checkpoint it replaces is kept as ``checkpoint.prev.pt``, so a kill or
  a bad write at any moment leaves at least one readable checkpoint.
- :func:`load_latest_checkpoint` reads the newest readable checkpoint (``checkpoint.pt``, else
  ``checkpoint.prev.pt``); an unreadable file is reported by name, never as a bare unpickling traceback.
- Each checkpoint records the run's configuration and a :func:`run_fingerprint` (digests of the data,
  the tokenizer and the teacher); :func:`resume_differences` lists what a resume would change.
- :func:`check_output_dir` is the command line's guard: ``--resume`` needs a checkpoint, and a fresh start
  refuses a folder that already holds a run unless ``--overwrite`` is given.
- :func:`remove_stale_temporaries` deletes ``.NAME.tmp-PID`` files whose writing process is gone.

A data-parallel run (``torchrun``) writes its checkpoints as ``torch.distributed.checkpoint`` folders
(``checkpoint.dcp``, ``checkpoint.prev.dcp``; :mod:`trainer.checkpoint.dcp`); the folder guards here know
both kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch

from ..config import SAVED_CONFIG_NAME, TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"
DCP_NAME = "checkpoint.dcp"  # a data-parallel run's checkpoint folder
DCP_PREVIOUS_NAME = "checkpoint.prev.dcp"
CORRUPT_SUFFIX = ".corrupt"
METRICS_NAME = "metrics.jsonl"
STEPS_NAME = "steps.jsonl"
CONFIG_NAME = SAVED_CONFIG_NAME  # the settings of the run, written when it starts (``--resume`` reuses them)
REQUIRED_KEYS = ("step", "model", "optimizer", "rng", "config")
# Fields that may change on resume: they steer where and how the run is driven (length, logging, threads,
# tool-call plumbing), not what a given update computes.
RESUMABLE_FIELDS = frozenset({
    "output_dir", "resume", "overwrite", "allow_config_change", "updates", "checkpoint_every", "log_every",
    "log_format", "threads", "device", "tool_workers", "tool_timeout_s", "sandbox_allow_missing", "eval_prompts"})
TEMPORARY_MARKER = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or was written by a run with different settings."""


def checkpoint_paths(output: str | Path) -> list[Path]:
    """The checkpoint files of ``output``, newest first: ``checkpoint.pt``, ``checkpoint.prev.pt``."""
    output = Path(output)
    return [output / CHECKPOINT_NAME, output / PREVIOUS_NAME]


def dcp_paths(output: str | Path) -> list[Path]:
    """The data-parallel checkpoint folders of ``output``, newest first: ``checkpoint.dcp``,
    ``checkpoint.prev.dcp``."""
    output = Path(output)
    return [output / DCP_NAME, output / DCP_PREVIOUS_NAME]


def any_checkpoint_paths(output: str | Path) -> list[Path]:
    """Every checkpoint path of ``output``, single-process files and data-parallel folders."""
    return checkpoint_paths(output) + dcp_paths(output)


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``: loading runs no pickled code).

    Raises:
        CheckpointError: naming ``path``, if it is missing, empty, truncated, not a checkpoint, or lacks one
            of the keys ``step``, ``model``, ``optimizer``, ``rng``, ``config``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} ({size} bytes) is unreadable, truncated or not a "
                              f"checkpoint: {type(error).__name__}: {reason}") from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(payload).__name__}, not a checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks {missing}; it was not written by this trainer")
    return payload


def save_checkpoint(payload: dict, output: str | Path) -> Path:
    """Write ``payload`` as ``output/checkpoint.pt``, keeping the one it replaces as ``checkpoint.prev.pt``.

    The payload goes to ``.checkpoint.pt.tmp-PID``, is fsynced and read back (structure and ``step``);
    only then is the current checkpoint moved to ``checkpoint.prev.pt`` and the new one moved into place.
    An exception (or Ctrl-C) during the write removes the temporary file and leaves both checkpoints as
    they were.  Returns the checkpoint path.
    """
    output = Path(output)
    path = output / CHECKPOINT_NAME
    tmp = output / f".{CHECKPOINT_NAME}{TEMPORARY_MARKER}{os.getpid()}"
    rotated = False
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        written = read_checkpoint(tmp, mmap=True)
        if written["step"] != payload["step"]:
            raise CheckpointError(f"checkpoint {str(tmp)!r} read back step {written['step']}, wrote "
                                  f"{payload['step']}")
        del written
        rotated = path.exists()
        if rotated:
            os.replace(path, output / PREVIOUS_NAME)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if rotated and not path.exists():  # interrupted between the two renames: put the current one back
            os.replace(output / PREVIOUS_NAME, path)
        raise
    _fsync_dir(output)
    return path


def load_latest_checkpoint(output: str | Path) -> tuple[Path, dict, list[tuple[Path, str]]]:
    """The newest readable checkpoint of ``output``.

    Returns ``(path, payload, skipped)`` where ``skipped`` holds ``(path, reason)`` for each newer checkpoint
    file that exists but could not be read.  Raises :class:`CheckpointError` (naming every file tried) if
    none is readable.
    """
    skipped = []
    for path in checkpoint_paths(output):
        if not path.exists():
            continue
        try:
            return path, read_checkpoint(path), skipped
        except CheckpointError as error:
            skipped.append((path, str(error)))
    if not skipped:
        raise CheckpointError(f"no checkpoint in {str(output)!r} (neither {CHECKPOINT_NAME} nor {PREVIOUS_NAME})")
    raise CheckpointError(f"no readable checkpoint in {str(output)!r}: " + "; ".join(r for _, r in skipped))


def set_aside(path: Path) -> Path:
    """Rename an unreadable checkpoint to ``NAME.corrupt`` (replacing an older one) so it is never rotated
    into ``checkpoint.prev.pt`` over a good checkpoint; returns the new path."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    if target.is_dir():
        remove_path(target)
    os.replace(path, target)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: str | Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files (and data-parallel checkpoint folders) in ``output`` whose process
    ``PID`` is gone (or is this process).

    A run killed while writing a checkpoint or rewriting a log leaves such a file (a checkpoint's is as
    large as the model and optimizer).  Files of a live process are left alone.  Returns the removed paths.
    """
    output = Path(output)
    removed = []
    if not output.is_dir():
        return removed
    for path in sorted(output.glob(f".*{TEMPORARY_MARKER}*")):
        suffix = path.name.rsplit(TEMPORARY_MARKER, 1)[1]
        if not suffix.isdigit() or not (path.is_file() or path.is_dir()):
            continue
        pid = int(suffix)
        if pid != os.getpid() and _pid_alive(pid):
            continue
        remove_path(path)
        removed.append(path)
    return removed


def run_files(output: str | Path) -> list[Path]:
    """The files that make ``output`` hold a run: checkpoints (files or data-parallel folders) and non-empty
    metrics / step logs."""
    output = Path(output)
    found = [path for path in any_checkpoint_paths(output) if path.exists()]
    found += [output / name for name in (METRICS_NAME, STEPS_NAME)
              if (output / name).is_file() and (output / name).stat().st_size > 0]
    return found


def clear_run(output: str | Path) -> None:
    """Remove a previous run's checkpoints and logs from ``output`` (a fresh start)."""
    output = Path(output)
    for path in any_checkpoint_paths(output) + [output / METRICS_NAME, output / STEPS_NAME]:
        remove_path(path)


def check_output_dir(config: TrainConfig) -> None:
    """The command line's guard, run before anything is created or loaded.

    ``resume``: ``output_dir`` must hold a checkpoint.  Fresh start: ``output_dir`` must not hold a run
    (:func:`run_files`) unless ``overwrite``.  Raises ``ValueError`` saying what to do instead.
    """
    output = Path(config.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir {str(output)!r} exists and is not a folder")
    if config.resume:
        if not any(path.exists() for path in any_checkpoint_paths(output)):
            raise ValueError(f"--resume: there is no checkpoint in {str(output)!r} ({CHECKPOINT_NAME} not found); "
                             f"start without --resume")
    elif not config.overwrite:
        found = run_files(output)
        if found:
            raise ValueError(f"output_dir {str(output)!r} already holds a run ({', '.join(p.name for p in found)}); "
                             f"pass --resume to continue it, --overwrite to replace it, or choose another "
                             f"--output-dir")


def _digest(chunks: Sequence[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(len(chunk).to_bytes(8, "little"))
        hasher.update(chunk)
    return hasher.hexdigest()[:16]


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names, dtypes, shapes and bytes (any dtype, bfloat16 included)."""
    chunks = []
    for name, tensor in state.items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        chunks += [f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode(), flat.view(torch.uint8).numpy().tobytes()]
    return _digest(chunks)


def run_fingerprint(problems, tokenizer, teacher, samples: int = 32) -> dict[str, str]:
    """Digests of what a run learns from besides its config values.

    data: every record of a local dataset (its content, whatever the file name) or the first ``samples``
    training and held-out problems of the built-in generator (catches a changed generator); tokenizer: the
    vocabulary and chat template; teacher: the teacher's weights.  Pure: consumes no random numbers.
    """
    records = getattr(problems, "records", None)
    if records is None:
        chosen = [problems.train(i) for i in range(samples)] + [problems.held_out(i) for i in range(samples // 4)]
        split = b""
    else:
        chosen = records
        split = json.dumps([problems.train_ids, problems.held_out_ids]).encode()
    data = _digest([json.dumps(_problem_record(p)).encode() for p in chosen] + [split])
    vocab = sorted(tokenizer.get_vocab().items())
    tokens = _digest([json.dumps(vocab).encode(), str(getattr(tokenizer, "chat_template", "")).encode()])
    return {"data": data, "tokenizer": tokens, "teacher": tensor_digest(teacher.state_dict())}


def _problem_record(problem) -> list:
    """What a problem contributes to the data digest: question and answer, and its chat messages and answer
    type where a dataset row gives them (so plain rows digest as they always have)."""
    record = [problem.question, problem.answer]
    if getattr(problem, "messages", ()):
        record.append([list(message) for message in problem.messages])
    if getattr(problem, "answer_type", "auto") != "auto":
        record.append(problem.answer_type)
    return record


def resume_differences(saved_config: dict, config: TrainConfig, saved_fingerprint: dict | None,
                       fingerprint: dict[str, str]) -> list[str]:
    """What continuing a checkpoint under ``config`` would change: one ``name: old -> new`` per config field
    outside :data:`RESUMABLE_FIELDS`, and ``<part> digest: old -> new`` per differing fingerprint part.
    Fields missing from an older checkpoint count as their default."""
    defaults = TrainConfig().to_dict()
    current = config.to_dict()
    changes = []
    for name in sorted(set(current) - RESUMABLE_FIELDS):
        old = saved_config.get(name, defaults.get(name))
        if old != current[name]:
            changes.append(f"{name}: {old!r} -> {current[name]!r}")
    if saved_fingerprint is None:
        changes.append("data/tokenizer/teacher digests: not recorded in the checkpoint -> "
                       + ", ".join(f"{k} {v}" for k, v in fingerprint.items()))
    else:
        for part in sorted(fingerprint):
            if saved_fingerprint.get(part) != fingerprint[part]:
                changes.append(f"{part} digest: {saved_fingerprint.get(part)} -> {fingerprint[part]}")
    return changes


def describe_mismatch(path: Path, changes: list[str]) -> str:
    """The error of a refused resume."""
    return (f"refusing to resume {str(path)!r}: it was written by a run with different settings "
            f"({'; '.join(changes)}). Resume with the checkpoint's settings (the old values above), start a new run "
            f"in another --output-dir, or pass --allow-config-change to continue these weights under the new "
            f"settings")

