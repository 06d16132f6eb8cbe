"""Resuming across checkpoint kinds: a single process's ``checkpoint.pt`` under ``torchrun`` (sharded onto the
ranks) and a data-parallel ``checkpoint.dcp`` in a single process (gathered into it).

Both go through torch's state-dict API (``torch.distributed.checkpoint.state_dict``), whose ``get_state_dict``
/ ``set_state_dict`` speak one format for a plain and an FSDP2-sharded student alike: parameter names as
keys, the optimizer state keyed by parameter name.  When a folder holds both kinds (a run that changed kind
and has saved since), :func:`resume_kind` picks the one with more finished updates.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import CheckpointError, checkpoint_paths, dcp_paths, load_latest_checkpoint
from .dcp import load_latest_meta, rng_name


def _latest_step(load) -> int:
    try:
        return int(load()[1]["step"])
    except CheckpointError:
        return -1


def resume_kind(output: str | Path, distributed: bool) -> str:
    """``"single"`` or ``"dcp"``: the kind of checkpoint a resume in ``output`` reads.

    The kind this run writes (``"dcp"`` under torchrun) when only it exists, or when both kinds exist and it
    holds at least as many finished updates; the other kind when only that exists or it is newer.
    """
    own, other = ("dcp", "single") if distributed else ("single", "dcp")
    present = {"single": any(p.exists() for p in checkpoint_paths(output)),
               "dcp": any(p.exists() for p in dcp_paths(output))}
    if not present[other]:
        return own
    if not present[own]:
        return other
    steps = {"single": _latest_step(lambda: load_latest_checkpoint(output)),
             "dcp": _latest_step(lambda: load_latest_meta(output))}
    return own if steps[own] >= steps[other] else other


def shard_single_checkpoint(payload: dict, student, optimizer, replica: torch.nn.Module) -> None:
    """Load a single-process checkpoint's student and AdamW state into the FSDP2-sharded ``student`` and its
    ``optimizer`` (a collective: every rank calls it with the same ``payload``).

    ``replica``: a plain module of the student's architecture (the trainer's rollout copy); the full state goes
    into it and a throwaway AdamW over it, whose name-keyed state dicts ``set_state_dict`` then shards.
    Raises :class:`CheckpointError` if the state does not fit.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    try:
        replica.load_state_dict(payload["model"])
        shadow = torch.optim.AdamW(replica.parameters())
        shadow.load_state_dict(payload["optimizer"])
        model_state, optimizer_state = get_state_dict(replica, shadow)
        set_state_dict(student, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"the single-process checkpoint does not fit this student/optimizer: {error}") \
            from error


def gather_dcp_checkpoint(path: str | Path, student, optimizer) -> dict:
    """Load a data-parallel checkpoint folder's student and AdamW state into the plain ``student`` and its
    ``optimizer`` in one process (no process group); returns rank 0's RNG states.  Raises
    :class:`CheckpointError` if the state does not fit."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    try:
        model_state, optimizer_state = get_state_dict(student, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
        set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this student/optimizer: {error}") from error
    return torch.load(path / rng_name(0), map_location="cpu", weights_only=True)
