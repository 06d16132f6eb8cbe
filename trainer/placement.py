"""Where a run's tensors live: the ``device`` setting (``cpu``, ``cuda``, ``cuda:N``, ``auto``).

- ``cpu`` (the default): everything on the CPU; ``torch.set_num_threads(threads)``.
- ``cuda`` / ``cuda:N``: the student, the teacher, the rollouts' generation and every loss on that GPU (the
  fused losses then run their Triton kernels).  Tool calls, tokenization and the rollout bookkeeping stay on
  the CPU.  Under ``torchrun`` each rank takes GPU ``LOCAL_RANK`` (so the setting must be plain ``cuda``) and
  the ranks talk through NCCL for GPU tensors and gloo for the small CPU objects (metrics, step logs,
  checkpoint metadata): the process group is ``cpu:gloo,cuda:nccl``.
- ``auto``: ``cuda`` when a GPU is visible, else ``cpu``.

Sampling with ``rollout_rng='per_trajectory'`` draws its noise from per-trajectory generators on the device
that generates, so one process and N ranks sample the same trajectories on the same kind of device (up to
float rounding of the logits); the CPU and a GPU draw different numbers from the same seed.
"""

from __future__ import annotations

import re

import torch

DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d+|auto")


def check_device_spec(spec: str) -> str:
    """``spec`` if it is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; else ``ValueError`` naming ``device``."""
    if not isinstance(spec, str) or not DEVICE_PATTERN.fullmatch(spec):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {spec!r}")
    return spec


def resolve_device(spec: str, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` of the setting ``spec`` for this process (``local_rank``: torchrun's ``LOCAL_RANK``,
    None in a plain process).

    Raises ``ValueError`` naming ``device`` when a GPU is asked for and CUDA is not available, when the index is
    not a visible GPU, or when under torchrun the setting names an index (each rank takes GPU ``LOCAL_RANK``).
    """
    check_device_spec(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} but CUDA is not available to this torch {torch.__version__} "
                         f"(no GPU visible, or a CPU-only build); use --device cpu")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if spec != "cuda":
            raise ValueError(f"under torchrun each rank uses GPU LOCAL_RANK; pass --device cuda, not {spec!r} "
                             f"(choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= count:
            raise ValueError(f"device='cuda': LOCAL_RANK {local_rank} has no GPU of its own ({count} visible); "
                             f"start at most {count} processes per node (--nproc-per-node)")
        return torch.device("cuda", local_rank)
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= count:
        raise ValueError(f"device={spec!r}: there are {count} visible GPUs (cuda:0 .. cuda:{count - 1})")
    return torch.device("cuda", index)


def capture_device_rng(device: torch.device) -> dict:
    """The generator state of ``device`` (a GPU's, which ``rollout_rng='shared'`` sampling draws from), as a
    CPU tensor; empty for the CPU (its state is the torch one that :func:`trainer.train.capture_rng` keeps)."""
    if device.type != "cuda":
        return {}
    return {"cuda": torch.cuda.get_rng_state(device)}


def restore_device_rng(state: dict, device: torch.device) -> None:
    """Inverse of :func:`capture_device_rng`; a state saved on another kind of device is ignored (a run moved
    between CPU and GPU samples from another generator anyway)."""
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
