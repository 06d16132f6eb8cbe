"""Data-parallel training under ``torchrun``: the process group, the batch split, the sharded student.

``torchrun --standalone --nproc-per-node=N -m trainer train ...`` starts N processes (ranks) with the
variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; :func:`env_context` reads them (None in a plain
process, which then runs exactly as without this module).  On CPU (``--device cpu``) the ranks talk through
gloo; with ``--device cuda`` each rank takes GPU ``LOCAL_RANK`` and the process group is
``cpu:gloo,cuda:nccl``: NCCL for GPU tensors (FSDP's all-gathers and reduce-scatters, the gradient norm),
gloo for the small CPU objects (metrics, step logs, checkpoint metadata).

- Batch split: the ``prompts_per_step x rollouts_per_prompt`` trajectories of an update are numbered
  ``0 .. B-1`` (trajectory ``j`` answers prompt ``j // rollouts_per_prompt``) and rank r takes the contiguous
  range :func:`rank_range` of ``B / N`` of them.  ``B`` must divide by ``N``; the ``pg`` objective also needs
  whole GRPO groups on a rank (its advantages normalise within a group), so ``prompts_per_step`` must divide
  by ``N`` there.  Anything else is refused by :func:`check_batch_split`.
- The student is sharded with FSDP2 (:func:`shard_student`: each decoder layer is a unit, the root holds
  the embeddings, the final norm and the head); the teacher is replicated and frozen.  Rollouts use a
  replicated copy of the student whose weights :func:`sync_weights` refreshes before each update.
- Gradients are summed over the ranks (:func:`shard_student` sets FSDP's divide factor to 1): each rank's
  loss is a sum divided by the distilled tokens of the whole batch, all ranks together, so the summed
  gradient is the single-process one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DistContext:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs and checkpoints' shared files and prints."""
        return self.rank == 0


def env_context(environ: Mapping[str, str] | None = None) -> DistContext | None:
    """The context from torchrun's variables, or None when ``WORLD_SIZE`` is not set (a plain process).

    Raises ``ValueError`` naming the variable if some of ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` are set and
    others not, one is not an integer, or ``RANK`` is outside ``[0, WORLD_SIZE)``.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in ENV_VARS if name in environ]
    if not present:
        return None
    missing = [name for name in ENV_VARS if name not in environ]
    if missing:
        raise ValueError(f"torchrun sets {', '.join(ENV_VARS)}; found {', '.join(present)} but not "
                         f"{', '.join(missing)} (start data-parallel runs with torchrun)")
    values = {}
    for name in ENV_VARS:
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {environ[name]!r}") from None
    if values["WORLD_SIZE"] < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {values['WORLD_SIZE']}")
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(f"environment variable RANK must lie in [0, WORLD_SIZE={values['WORLD_SIZE']}), "
                         f"got {values['RANK']}")
    return DistContext(rank=values["RANK"], world_size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])


def check_batch_split(config, world_size: int) -> None:
    """Refuse settings whose update batch cannot be split evenly over ``world_size`` ranks.

    Raises ``ValueError`` naming ``prompts_per_step`` / ``rollouts_per_prompt`` (or ``rollout_rng``) when
    ``prompts_per_step x rollouts_per_prompt`` does not divide by ``world_size``; for ``objective='pg'`` when
    ``prompts_per_step`` does not; and when more than one rank would sample from the shared torch RNG
    (``rollout_rng='shared'``), whose draws depend on how the batch is split.
    """
    batch = config.prompts_per_step * config.rollouts_per_prompt
    if batch % world_size:
        raise ValueError(f"the update batch prompts_per_step x rollouts_per_prompt = {config.prompts_per_step} x "
                         f"{config.rollouts_per_prompt} = {batch} trajectories does not divide evenly over "
                         f"{world_size} ranks; choose prompts_per_step / rollouts_per_prompt so that it does")
    if config.objective == "pg" and config.prompts_per_step % world_size:
        raise ValueError(f"objective='pg' normalises rewards within a prompt's group, so each rank needs whole "
                         f"groups: prompts_per_step ({config.prompts_per_step}) must divide by the {world_size} ranks")
    if world_size > 1 and config.rollout_rng != "per_trajectory":
        raise ValueError(f"rollout_rng={config.rollout_rng!r} samples a batch from one shared RNG stream, so "
                         f"splitting it over {world_size} ranks would change the rollouts; pass --rollout-rng "
                         f"per_trajectory (each trajectory its own stream; use it in a single process too to "
                         f"compare)")


def rank_range(batch: int, rank: int, world_size: int) -> range:
    """The global trajectory indices of ``rank``'s share of a batch of ``batch`` (contiguous, in order)."""
    if batch % world_size:
        raise ValueError(f"batch ({batch}) must divide by world_size ({world_size})")
    share = batch // world_size
    return range(rank * share, (rank + 1) * share)


def init_process_group(context: DistContext, device: torch.device | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join torchrun's rendezvous (``MASTER_ADDR`` / ``MASTER_PORT``): gloo for a CPU ``device`` (or None), and
    ``cpu:gloo,cuda:nccl`` bound to a GPU ``device`` (made the current GPU first)."""
    # torch._dynamo (imported by FSDP and the optimizers) keeps references to the process groups that exist
    # when it is imported, so a group created before that import outlives destroy_process_group, its gloo
    # threads run into interpreter shutdown and the process can abort at exit.  Import it first.
    import torch._dynamo  # noqa: F401
    import torch.distributed as dist

    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    if dist.get_world_size() != context.world_size or dist.get_rank() != context.rank:
        raise RuntimeError(f"process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment "
                           f"says {context.rank} of {context.world_size}")


def shutdown(clean: bool) -> None:
    """Leave the process group.  ``clean`` (every rank got here): a barrier first, so no rank tears its
    connections down while another still uses them; after an error, no barrier (a failed rank must not wait
    for ranks that are stuck elsewhere)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def shard_student(student: torch.nn.Module, mesh) -> None:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, the possibly tied head),
    with gradients summed rather than averaged over the ranks (divide factor 1, a SUM reduce-scatter)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from .models import decoder_body

    layers = getattr(decoder_body(student), "layers", None)
    for layer in layers if layers is not None else ():
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    for module in student.modules():
        if isinstance(module, FSDPModule):
            # A plain SUM reduce-scatter: gloo has no pre-multiplied sum, and a factor of 1 needs no scaling.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def sync_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy the full value of every parameter and buffer of the sharded ``source`` into its plain replica
    ``target`` (same architecture; a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    params, buffers = (list(target.parameters()), list(source.parameters())), (list(target.buffers()),
                                                                              list(source.buffers()))
    if len(params[0]) != len(params[1]) or len(buffers[0]) != len(buffers[1]):
        raise ValueError("target and source must have the same parameters and buffers")
    for dst, src in list(zip(*params)) + list(zip(*buffers)):
        dst.copy_(src.full_tensor() if isinstance(src, DTensor) else src)


def all_gather_objects(value) -> list:
    """``value`` of every rank, in rank order (a collective)."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(value: int) -> int:
    """The sum over the ranks of an integer (a collective)."""
    import torch.distributed as dist

    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(tensor)
    return int(tensor)


def broadcast_object(value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank (a collective)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    dist.barrier()
