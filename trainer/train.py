"""The on-policy SOD training loop: rollouts, teacher scoring, the fused loss, metrics and checkpoints.

One update = roll out ``prompts_per_step x rollouts_per_prompt`` trajectories with the current student,
score them with the teacher (final hidden states only), and take one optimizer step on

- ``kl``: ``fused_sod_loss`` (vocabulary-wide step-weighted reverse KL), or
- ``pg``: ``fused_sod_policy_loss`` on ``sod_policy_inputs`` advantages (GRPO + SOD-weighted teacher reward),
  with the teacher's sampled-token log-probs from ``fused_token_logprobs``.

Batches larger than ``micro_batch_size`` are split; the loss of each micro-batch is a sum divided by the
number of distilled tokens of the whole batch, so accumulation equals one big batch exactly.

Alignment: the hidden state at position t predicts token t+1, so the model reads ``ids[:, :-1]``'s
positions and the targets, mask and rollout log-probs are ``[:, 1:]``.

Checkpoints (``checkpoint.pt``, see :mod:`trainer.checkpoint`) are written atomically, read back before they
replace the previous one (kept as ``checkpoint.prev.pt``) and hold the student, the optimizer, the Python /
NumPy / torch RNG states, the number of finished updates, the config and a digest of the data, tokenizer and
teacher; a resume under different settings is refused unless ``allow_config_change``.  ``metrics.jsonl`` and
``steps.jsonl`` are cut back to the checkpoint's update on resume, so a run killed at any moment resumes with
no update lost or repeated.  A fresh start removes the folder's previous checkpoints and logs.

Data parallel (``torchrun``, :mod:`trainer.distributed`): each rank rolls out its share of the update batch
with a replica of the student, the student is trained sharded with FSDP2 (the losses run inside
``sod_kernels.fsdp.fsdp_forward``), each loss is divided by the distilled tokens of all ranks together and
the gradients are summed, metrics and step logs are gathered, rank 0 writes the logs, and checkpoints are
``torch.distributed.checkpoint`` folders (:mod:`trainer.checkpoint.dcp`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

import sod_kernels
from sod_kernels.fsdp import fsdp_forward

from . import checkpoint as ckpt
from .checkpoint import CHECKPOINT_NAME, CONFIG_NAME, DCP_NAME, METRICS_NAME, STEPS_NAME, CheckpointError
from .config import TrainConfig
from .distributed import DistContext
from .models import (describe_logit_processing, hidden_states, ignored_generation_settings, load_model,
                     load_tokenizer, output_head)
from .placement import capture_device_rng, resolve_device, restore_device_rng
from .rollout import (ChatFormat, HFTurnGenerator, RolloutSettings, ToolExecutor, Trajectory, describe_sampling,
                      run_rollouts)
from .task import FaultInjector, Problem, ProblemSource, load_reward_function

# Fault-injection key of held-out evaluations (training updates use their update index).
EVAL_FAULT_KEY = 2**31 - 1
POLICY_FUNCTIONS = ("fused_sod_policy_loss", "fused_token_logprobs", "sod_policy_inputs")


def policy_functions():
    """The three ``sod_kernels`` functions the ``pg`` objective needs, or a clear error if missing."""
    missing = [name for name in POLICY_FUNCTIONS if not hasattr(sod_kernels, name)]
    if missing:
        raise ValueError(f"objective='pg' needs sod_kernels.{', sod_kernels.'.join(missing)}, which this "
                         f"sod_kernels version does not export; use objective='kl'")
    return tuple(getattr(sod_kernels, name) for name in POLICY_FUNCTIONS)


@dataclass
class Batch:
    """Right-padded tensors of a list of trajectories (already shifted for next-token prediction).

    input_ids / attention_mask: ``[B, T]`` (the model input); target_ids, response_mask, old_logprobs:
    ``[B, T-1]`` aligned with hidden states ``[:, :-1]``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    response_mask: torch.Tensor
    old_logprobs: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """The same batch on ``device`` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def collate(trajectories: Sequence[Trajectory], pad_id: int, width: int | None = None) -> Batch:
    """Pad trajectories on the right to ``width`` (default: the longest) and shift targets by one."""
    T = width or max(len(t.token_ids) for t in trajectories)
    B = len(trajectories)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    logp = torch.zeros((B, T), dtype=torch.float32)
    for i, traj in enumerate(trajectories):
        n = len(traj.token_ids)
        ids[i, :n] = torch.tensor(traj.token_ids, dtype=torch.long)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(traj.response_mask, dtype=torch.long)
        logp[i, :n] = torch.tensor(traj.sample_logprobs, dtype=torch.float32)
    return Batch(input_ids=ids, attention_mask=attention, target_ids=ids[:, 1:], response_mask=mask[:, 1:],
                 old_logprobs=logp[:, 1:])


def model_hidden(model, batch: Batch) -> torch.Tensor:
    """Hidden states that predict ``batch.target_ids``: ``[B, T-1, H]``."""
    return hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1]


def capture_rng(device: torch.device | None = None) -> dict:
    """Python, NumPy and torch RNG states, as types a ``weights_only`` load accepts (NumPy's key array as
    an int64 tensor), and the generator of a GPU ``device`` (see :mod:`trainer.placement`)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            **(capture_device_rng(device) if device is not None else {})}


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device is not None:
        restore_device_rng(state, device)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSONL log keeping the records ``keep`` accepts (drops a torn last line too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def step_records(update: int, trajectories: Sequence[Trajectory], step_divergence: torch.Tensor,
                 step_weights: torch.Tensor, offset: int = 0) -> list[dict]:
    """Per-sample step logs: d_k, w_k, tokens per step, faults, reward."""
    records = []
    for i, traj in enumerate(trajectories):
        k = len(traj.steps)
        records.append({"update": update, "sample": offset + i, "group": traj.group, "reward": traj.reward,
                        "d": [round(float(x), 6) for x in step_divergence[i, :k]],
                        "w": [round(float(x), 6) for x in step_weights[i, :k]],
                        "tokens": [end - start for start, end in traj.steps],
                        "fault_after_step": traj.fault_after_step})
    return records


class SODTrainer:
    """Owns the student, teacher, optimizer and logs of one run (see the module docstring)."""

    def __init__(self, config: TrainConfig, student, teacher, tokenizer, executor: ToolExecutor,
                 problems: ProblemSource | None = None, log: Callable[[str], None] = print,
                 dist: DistContext | None = None):
        self.config = config.validate()
        self.dist = dist
        if dist is not None:
            from . import distributed

            distributed.check_batch_split(self.config, dist.world_size)
        # The GPU (or the CPU) this process computes on: under torchrun GPU LOCAL_RANK (trainer.placement).
        self.device = resolve_device(self.config.device, None if dist is None else dist.local_rank)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.executor = executor
        self.problems = problems or ProblemSource(config.seed, config.dataset, reward_fn=config.reward_fn)
        self.log = log
        self.chat = ChatFormat(tokenizer, system_prompt=config.system_prompt,
                               use_tools_schema=config.tools_schema)
        self.settings = RolloutSettings(max_turns=config.max_turns, max_new_tokens=config.max_new_tokens,
                                        max_total_tokens=config.max_total_tokens, tool_workers=config.tool_workers,
                                        reward_fn=load_reward_function(config.reward_fn) if config.reward_fn else None)
        self.faults = FaultInjector(config.tool_fault_rate, config.seed)
        if teacher.get_output_embeddings().weight.shape[0] < student.get_output_embeddings().weight.shape[0]:
            raise ValueError("the teacher's vocabulary is smaller than the student's; they must share a tokenizer "
                             "(a padded teacher vocabulary is allowed)")
        # The model that samples rollouts: the student itself, or under torchrun a plain replica of the sharded
        # student (generation runs a different number of forward passes on each rank, which sharded
        # parameters, gathered by collectives, cannot do).
        self.policy = student
        if dist is not None:
            from torch.distributed.device_mesh import init_device_mesh

            from .distributed import shard_student

            self.policy = copy.deepcopy(student).requires_grad_(False)
            shard_student(student, init_device_mesh(self.device.type, (dist.world_size,)))
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.step = 0
        self.saved_step = 0  # finished updates held by the newest checkpoint on disk
        self.output = Path(config.output_dir)
        self._fingerprint = None
        if config.objective == "pg":
            policy_functions()
        if self.is_main:
            for line in self.report():
                log(line)

    def report(self) -> list[str]:
        """What this run trains on, as lines for its start: the problems and how they are scored, each model's
        logit processing, and the sampling settings (with any of a model folder's generation settings that
        the rollouts do not apply)."""
        lines = [self.problems.describe()]
        for role, model in (("student", self.policy), ("teacher", self.teacher)):
            lines.append(f"{role} logit processing: {describe_logit_processing(output_head(model))}")
        lines.append(describe_sampling(self.config.temperature))
        ignored = ignored_generation_settings(self.policy)
        if ignored:
            settings = ", ".join(f"{key}={value!r}" for key, value in ignored.items())
            lines.append(f"not applied from the student's generation_config: {settings} (rollouts sample from "
                         f"the distribution above, whose log-probs the losses use)")
        return lines

    # ----------------------------------------------------------------------------------------------
    # rollouts
    def generator(self, model, temperature: float) -> HFTurnGenerator:
        """A batched sampler for ``model`` with this run's stop tokens."""
        return HFTurnGenerator(model, self.tokenizer.pad_token_id, self.chat.stop_ids, temperature)

    def sample_indices(self) -> range:
        """The global indices of the trajectories this process rolls out in each update: all
        ``prompts_per_step x rollouts_per_prompt``, or under torchrun this rank's contiguous share."""
        batch = self.config.prompts_per_step * self.config.rollouts_per_prompt
        if self.dist is None:
            return range(batch)
        from .distributed import rank_range

        return rank_range(batch, self.dist.rank, self.dist.world_size)

    def rollout_model(self):
        """The plain (unsharded) student with the current weights, for sampling and evaluation; under torchrun
        the replica is refreshed from the sharded student first (a collective: every rank must call it)."""
        if self.dist is not None:
            from .distributed import sync_weights

            sync_weights(self.policy, self.student)
        return self.policy

    def rollout(self, update: int) -> list[Trajectory]:
        """This process's trajectories of update ``update``: trajectory ``j`` of the batch answers prompt
        ``update * prompts_per_step + j // rollouts_per_prompt``; problems and faults are a pure function of
        the update and ``j``, and so is the sampling with ``rollout_rng='per_trajectory'``."""
        c = self.config
        indices = self.sample_indices()
        chosen = {}
        problems, groups = [], []
        for j in indices:
            group = j // c.rollouts_per_prompt
            if group not in chosen:
                chosen[group] = self.problems.train(update * c.prompts_per_step + group)
            problems.append(chosen[group])
            groups.append(group)
        keys = (c.seed, update) if c.rollout_rng == "per_trajectory" else None
        return run_rollouts(problems, groups, self.generator(self.rollout_model(), c.temperature), self.chat,
                            self.executor, self.settings, faults=self.faults, fault_keys=(update,),
                            indices=list(indices), sampling_keys=keys)

    def micro_batches(self, trajectories: Sequence[Trajectory]) -> list[tuple[int, list[Trajectory]]]:
        """``(offset, trajectories)`` chunks of at most ``micro_batch_size``."""
        n = self.config.micro_batch_size
        return [(i, list(trajectories[i:i + n])) for i in range(0, len(trajectories), n)]

    # ----------------------------------------------------------------------------------------------
    # the update
    def _kl_update(self, trajectories, total_tokens: int):
        c = self.config
        pad = self.tokenizer.pad_token_id
        head_t = output_head(self.teacher)  # in the teacher's own dtype (--teacher-dtype): the losses mix them
        first = self.sample_indices().start
        loss_total, kl_sum, logs = 0.0, 0.0, []

        def student_loss(model, batch, teacher_h):
            # A forward pass of the (sharded) student: its parameters are full tensors in here.
            head_s = output_head(model)
            student_h = head_s.fold(model_hidden(model, batch))
            stats = sod_kernels.fused_sod_loss(
                student_h, head_s.weight, teacher_h, head_t.weight, batch.response_mask,
                target_ids=batch.target_ids, divergence=c.divergence, step_divergence=c.step_divergence,
                epsilon=c.epsilon, delta=c.delta, temperature=c.temperature, coef=c.coef, reduction="sum",
                return_stats=True, student_softcap=head_s.softcap, teacher_softcap=head_t.softcap)
            return stats.loss, stats.token_divergence.detach(), stats.step_divergence, stats.step_weights

        for offset, chunk in self.micro_batches(trajectories):
            batch = collate(chunk, pad).to(self.device)
            with torch.no_grad():
                teacher_h = head_t.fold(model_hidden(self.teacher, batch))
            summed, token_divergence, step_divergence, step_weights = fsdp_forward(
                self.student, student_loss, batch, teacher_h)
            loss = summed / total_tokens
            loss.backward()
            loss_total += float(loss.detach())
            kl_sum += float((token_divergence * batch.response_mask).sum())
            logs += step_records(self.step, chunk, step_divergence.detach().cpu(), step_weights.detach().cpu(),
                                 first + offset)
        return loss_total, kl_sum / total_tokens, logs, {}

    def _pg_update(self, trajectories, total_tokens: int):
        c = self.config
        policy_loss, token_logprobs, policy_inputs = policy_functions()
        pad = self.tokenizer.pad_token_id
        vocab = output_head(self.student).weight.shape[0]
        head_t = output_head(self.teacher)
        weight_t = head_t.weight[:vocab]  # the teacher's own dtype
        full = collate(trajectories, pad).to(self.device)
        teacher_logp = torch.zeros_like(full.old_logprobs)
        chunks = self.micro_batches(trajectories)
        teacher_hidden = []
        for offset, chunk in chunks:
            batch = collate(chunk, pad).to(self.device)
            with torch.no_grad():
                teacher_h = head_t.fold(model_hidden(self.teacher, batch))
                logp = token_logprobs(teacher_h, weight_t, batch.target_ids, temperature=c.temperature,
                                      softcap=head_t.softcap)
            teacher_hidden.append(teacher_h)
            teacher_logp[offset:offset + len(chunk), :logp.shape[1]] = logp * batch.response_mask
        rewards = torch.tensor([t.reward for t in trajectories], dtype=torch.float32, device=self.device)
        groups = torch.tensor([t.group for t in trajectories], dtype=torch.long, device=self.device)
        inputs = policy_inputs(rewards, groups, full.old_logprobs, teacher_logp, full.response_mask, coef=c.coef,
                               epsilon=c.epsilon, delta=c.delta)
        if c.step_divergence == "none":
            # Plain OPD: the teacher reward enters unweighted (every step weight 1).
            reward_term = (teacher_logp - full.old_logprobs) * full.response_mask
            advantages = inputs.grpo_advantages[:, None] * full.response_mask + c.coef * reward_term
            step_weights = (inputs.step_weights > 0).to(inputs.step_weights.dtype)
        else:
            advantages = inputs.advantages
            step_weights = inputs.step_weights
        loss_total, kl_sum, extra = 0.0, 0.0, {"clip_frac": 0.0, "approx_kl": 0.0}

        def student_loss(model, batch, batch_advantages, teacher_h):
            # A forward pass of the (sharded) student: its parameters are full tensors in here.
            head_s = output_head(model)
            student_h = head_s.fold(model_hidden(model, batch))
            stats = policy_loss(student_h, head_s.weight, batch.target_ids, batch.old_logprobs, batch_advantages,
                                batch.response_mask, clip_low=c.clip_low, clip_high=c.clip_high,
                                dual_clip=c.dual_clip, temperature=c.temperature, reduction="sum",
                                return_stats=True, student_softcap=head_s.softcap)
            with torch.no_grad():
                kl = sod_kernels.fused_sod_loss(student_h.detach(), head_s.weight.detach(), teacher_h, weight_t,
                                                batch.response_mask, step_divergence="none",
                                                temperature=c.temperature, reduction="sum",
                                                student_softcap=head_s.softcap, teacher_softcap=head_t.softcap)
            clipped = stats.clip_frac_low + stats.clip_frac_high + stats.clip_frac_dual
            return stats.loss, clipped.detach(), stats.approx_kl.detach(), kl

        for (offset, chunk), teacher_h in zip(chunks, teacher_hidden):
            batch = collate(chunk, pad).to(self.device)
            width = batch.target_ids.shape[1]
            rows = slice(offset, offset + len(chunk))
            summed, clipped, approx_kl, kl = fsdp_forward(self.student, student_loss, batch,
                                                         advantages[rows, :width].contiguous(), teacher_h)
            loss = summed / total_tokens
            loss.backward()
            loss_total += float(loss.detach())
            share = float(batch.response_mask.sum()) / total_tokens
            extra["clip_frac"] += share * float(clipped)
            extra["approx_kl"] += share * float(approx_kl)
            kl_sum += float(kl)
        logs = step_records(self.step, trajectories, inputs.step_divergence.cpu(), step_weights.cpu(),
                            self.sample_indices().start)
        return loss_total, kl_sum / total_tokens, logs, extra

    def learning_rate(self, update: int) -> float:
        """The learning rate of update ``update`` (linear warm-up, then constant; a pure function of it)."""
        warmup = self.config.warmup_updates
        return self.config.lr * (min(1.0, (update + 1) / warmup) if warmup > 0 else 1.0)

    def update(self, trajectories: Sequence[Trajectory]) -> tuple[dict, list[dict]]:
        """One optimizer step on ``trajectories``; returns (metrics, per-sample step logs).

        Under torchrun, ``trajectories`` are this rank's share; the metrics and step logs returned are those
        of the whole batch (the same on every rank)."""
        c = self.config
        total_tokens = sum(sum(t.response_mask[1:]) for t in trajectories)
        if self.dist is not None:
            from .distributed import all_reduce_sum

            total_tokens = all_reduce_sum(total_tokens)
        total_tokens = max(total_tokens, 1)
        self.student.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        if c.objective == "kl":
            loss, kl, logs, extra = self._kl_update(trajectories, total_tokens)
        else:
            loss, kl, logs, extra = self._pg_update(trajectories, total_tokens)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        rewards = [t.reward for t in trajectories]
        faults = sum(len(t.fault_after_step) for t in trajectories)
        if self.dist is not None:
            from .distributed import all_gather_objects

            parts = all_gather_objects({"loss": loss, "kl": kl, "extra": extra, "logs": logs, "rewards": rewards,
                                        "faults": faults})
            loss, kl = sum(p["loss"] for p in parts), sum(p["kl"] for p in parts)
            extra = {key: sum(p["extra"][key] for p in parts) for key in extra}
            logs = [record for p in parts for record in p["logs"]]
            rewards = [r for p in parts for r in p["rewards"]]
            faults = sum(p["faults"] for p in parts)
        steps = [len(r["d"]) for r in logs]
        first = [r["d"][0] for r in logs if r["d"]]
        last_w = [r["w"][-1] for r in logs if r["w"]]
        metrics = {"loss": loss, "kl": kl, "mean_steps": float(np.mean(steps)) if steps else 0.0,
                   "max_steps": max(steps) if steps else 0, "mean_d1": float(np.mean(first)) if first else 0.0,
                   "mean_last_weight": float(np.mean(last_w)) if last_w else 0.0,
                   "reward": float(np.mean(rewards)), "grad_norm": grad_norm, "faults": faults,
                   "distilled_tokens": total_tokens, "lr": self.learning_rate(self.step), **extra}
        return metrics, logs

    def _clip_gradients(self) -> float:
        """Clip the gradients to ``grad_clip`` (if > 0); returns the norm before clipping.  Under torchrun the
        gradients are sharded ``DTensor``s and the norm is that of the whole gradient (all ranks)."""
        c = self.config
        params = [p for p in self.student.parameters() if p.grad is not None]
        if self.dist is None:
            if c.grad_clip > 0:
                return float(torch.nn.utils.clip_grad_norm_(params, c.grad_clip))
            return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
        from torch.distributed.tensor import DTensor

        if c.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    def checkpoint_path(self) -> Path:
        """``output_dir/checkpoint.pt`` (under torchrun the folder ``output_dir/checkpoint.dcp``)."""
        return self.output / (CHECKPOINT_NAME if self.dist is None else DCP_NAME)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the logs (a single process, or rank 0)."""
        return self.dist is None or self.dist.is_main

    def fingerprint(self) -> dict[str, str]:
        """Digests of this run's data, tokenizer and teacher (:func:`trainer.checkpoint.run_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = ckpt.run_fingerprint(self.problems, self.tokenizer, self.teacher)
        return self._fingerprint

    def save_checkpoint(self) -> None:
        """Write model, optimizer, RNG states, the number of finished updates, the config and the
        fingerprint; the checkpoint it replaces is kept as ``checkpoint.prev.pt`` (under torchrun: the
        folders ``checkpoint.dcp`` / ``checkpoint.prev.dcp``, every rank's RNG states)."""
        if self.dist is not None:
            from .checkpoint.dcp import save_dcp

            meta = {"step": self.step, "config": self.config.to_dict(), "fingerprint": self.fingerprint()}
            save_dcp(self.dist, self.student, self.optimizer, meta, capture_rng(self.device), self.output)
            self.saved_step = self.step
            return
        payload = {"step": self.step, "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                   "rng": capture_rng(self.device), "config": self.config.to_dict(), "fingerprint": self.fingerprint()}
        ckpt.save_checkpoint(payload, self.output)
        self.saved_step = self.step

    def load_checkpoint(self) -> None:
        """Restore from the newest readable checkpoint and cut the logs back to its step.

        The checkpoint may be of the other kind (:mod:`trainer.checkpoint.convert`): a single process's
        ``checkpoint.pt`` under torchrun is sharded onto the ranks, a ``checkpoint.dcp`` is gathered into a
        single process, and a ``checkpoint.dcp`` of another number of ranks is resharded.
        Raises :class:`trainer.checkpoint.CheckpointError` (a ``ValueError``) naming the files if none is
        readable, or listing the differing settings if the checkpoint's run had other settings and
        ``allow_config_change`` is off.  Nothing in the folder changes when it raises.
        """
        from .checkpoint.convert import resume_kind
        from .checkpoint.dcp import load_latest_meta

        kind = resume_kind(self.output, distributed=self.dist is not None)
        if kind == "single":
            path, payload, skipped = ckpt.load_latest_checkpoint(self.output)
        else:
            path, payload, skipped = load_latest_meta(self.output)
        changes = ckpt.resume_differences(payload["config"], self.config, payload.get("fingerprint"),
                                          self.fingerprint())
        if changes and not self.config.allow_config_change:
            raise CheckpointError(ckpt.describe_mismatch(path, changes))
        note = ""
        if self.dist is None and kind == "single":
            try:
                self.student.load_state_dict(payload["model"])
                self.optimizer.load_state_dict(payload["optimizer"])
            except (RuntimeError, ValueError, KeyError) as error:
                raise CheckpointError(f"checkpoint {str(path)!r} does not fit this student/optimizer: "
                                      f"{error}") from error
            rng = payload["rng"]
        elif self.dist is None:
            from .checkpoint.convert import gather_dcp_checkpoint

            rng = gather_dcp_checkpoint(path, self.student, self.optimizer)
            note = f" (written by {payload['world_size']} ranks, gathered into one process)"
        else:
            from .distributed import barrier

            if kind == "single":
                from .checkpoint.convert import shard_single_checkpoint

                shard_single_checkpoint(payload, self.student, self.optimizer, self.policy)
                rng = payload["rng"]
                note = f" (written by a single process, sharded onto {self.dist.world_size} ranks)"
            else:
                from .checkpoint.dcp import load_dcp

                saved_world = int(payload["world_size"])
                rng = load_dcp(self.dist, path, self.student, self.optimizer, saved_world)
                if saved_world != self.dist.world_size:
                    note = f" (written by {saved_world} ranks, resharded onto {self.dist.world_size})"
            barrier()  # every rank has read its checkpoint before rank 0 renames or rewrites anything
        restore_rng(rng, self.device)
        self.step = self.saved_step = int(payload["step"])
        if self.is_main:
            for bad, reason in skipped:
                self.log(f"skipped {reason}; moved it to {ckpt.set_aside(bad).name}")
            if changes:
                self.log("allow_config_change: continuing with changed settings: " + "; ".join(changes))
            for name in (METRICS_NAME, STEPS_NAME):
                truncate_jsonl(self.output / name, lambda record: record.get("update", -1) < self.step)
            self.log(f"resumed from {path} at update {self.step}{note}")

    # ----------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Seed or resume, then record the config.

        ``resume``: restore the newest readable checkpoint (nothing is created if there is none).  Otherwise
        a fresh start: seed everything and remove the folder's previous checkpoints and logs (the command
        line refuses that without ``overwrite``, see :func:`trainer.checkpoint.check_output_dir`).  Either
        way, temporary files left by a killed process are removed.
        """
        if self.config.resume and not any(p.exists() for p in ckpt.any_checkpoint_paths(self.output)):
            raise CheckpointError(f"resume=True but there is no checkpoint in {str(self.output)!r} "
                                  f"({self.checkpoint_path().name} not found); start without --resume")
        if self.is_main:
            for path in ckpt.remove_stale_temporaries(self.output):
                self.log(f"removed {path.name}, left by an interrupted write")
        if self.config.resume:
            self.load_checkpoint()
        else:
            seed_everything(self.config.seed)
            if self.is_main:
                self.output.mkdir(parents=True, exist_ok=True)
                ckpt.clear_run(self.output)
        if self.is_main:
            (self.output / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        if self.dist is not None:
            from .distributed import barrier

            barrier()

    def train_step(self) -> dict:
        """Roll out, update, log; returns the update's metrics."""
        start = time.perf_counter()
        trajectories = self.rollout(self.step)
        rollout_s = time.perf_counter() - start
        metrics, logs = self.update(trajectories)
        elapsed = time.perf_counter() - start
        tokens = sum(len(t.token_ids) for t in trajectories)
        if self.dist is not None:  # the whole batch's tokens; the timings are this rank's
            from .distributed import all_reduce_sum

            tokens = all_reduce_sum(tokens)
        metrics = {"update": self.step, **metrics, "tokens_per_s": tokens / max(elapsed, 1e-9),
                   "rollout_s": rollout_s, "update_s": elapsed - rollout_s}
        if self.is_main:
            with open(self.output / STEPS_NAME, "a") as handle:
                handle.writelines(json.dumps(record) + "\n" for record in logs)
            with open(self.output / METRICS_NAME, "a") as handle:
                handle.write(json.dumps(metrics) + "\n")
        self.step += 1
        if self.step % self.config.checkpoint_every == 0 or self.step == self.config.updates:
            self.save_checkpoint()
        return metrics

    def train(self, progress: Callable[[dict], None] | None = None) -> list[dict]:
        """Run the remaining updates; ``progress`` is called with each update's metrics."""
        self.prepare()
        history = []
        while self.step < self.config.updates:
            metrics = self.train_step()
            history.append(metrics)
            if progress is not None:
                progress(metrics)
        return history


def format_metrics(metrics: dict) -> str:
    """One line of the most useful metrics."""
    keys = ("update", "loss", "kl", "reward", "mean_steps", "mean_d1", "mean_last_weight", "tokens_per_s")
    parts = []
    for key in keys:
        value = metrics.get(key)
        if value is None:
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


@dataclass
class EvalResult:
    """Held-out evaluation of a policy: accuracy, student-teacher KL and per-trajectory step statistics."""

    accuracy: float
    kl: float
    trajectories: list[Trajectory]
    step_divergence: list[list[float]]
    step_weights: list[list[float]]


def evaluate(policy, teacher, tokenizer, chat: ChatFormat, executor: ToolExecutor, problems: Sequence[Problem],
             settings: RolloutSettings, *, temperature: float = 0.0, faults: FaultInjector | None = None,
             micro_batch_size: int = 32, loss_temperature: float = 1.0, epsilon: float = 1e-6,
             delta: float = 0.2, step_divergence: str = "kl") -> EvalResult:
    """Roll out ``policy`` on ``problems`` (greedy by default) and score the rollouts with the teacher.

    KL is the token mean of the reverse KL(policy || teacher) over the policy's generated tokens.  Uses a
    forked RNG so evaluation never changes a training run's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        generator = HFTurnGenerator(policy, tokenizer.pad_token_id, chat.stop_ids, temperature)
        trajectories = run_rollouts(problems, list(range(len(problems))), generator, chat, executor, settings,
                                    faults=faults, fault_keys=(EVAL_FAULT_KEY,))
    head_p, head_t = output_head(policy), output_head(teacher)
    kl_sum, tokens, divergences, weights = 0.0, 0, [], []
    signal = "kl" if step_divergence == "none" else step_divergence
    with torch.no_grad():
        for i in range(0, len(trajectories), micro_batch_size):
            chunk = trajectories[i:i + micro_batch_size]
            batch = collate(chunk, tokenizer.pad_token_id).to(head_p.weight.device)
            stats = sod_kernels.fused_sod_loss(
                head_p.fold(model_hidden(policy, batch)), head_p.weight, head_t.fold(model_hidden(teacher, batch)),
                head_t.weight, batch.response_mask, target_ids=batch.target_ids, step_divergence=signal,
                epsilon=epsilon, delta=delta, temperature=loss_temperature, reduction="sum", return_stats=True,
                student_softcap=head_p.softcap, teacher_softcap=head_t.softcap)
            kl_sum += float((stats.token_divergence * batch.response_mask).sum())
            tokens += int(batch.response_mask.sum())
            step_divergence, step_weights = stats.step_divergence.cpu(), stats.step_weights.cpu()
            for row, traj in enumerate(chunk):
                k = len(traj.steps)
                divergences.append([float(x) for x in step_divergence[row, :k]])
                weights.append([float(x) for x in step_weights[row, :k]])
    accuracy = float(np.mean([t.reward for t in trajectories])) if trajectories else math.nan
    return EvalResult(accuracy=accuracy, kl=kl_sum / max(tokens, 1), trajectories=trajectories,
                      step_divergence=divergences, step_weights=weights)


def build_trainer(config: TrainConfig, executor: ToolExecutor, log: Callable[[str], None] = print,
                  dist: DistContext | None = None) -> SODTrainer:
    """Load tokenizer and models named by ``config`` (presets or local folders) and build the trainer
    (data-parallel under torchrun when ``dist`` is given; the process group must be initialised)."""
    config.validate()
    torch.set_num_threads(config.threads)
    if config.device == "cpu" and torch.cuda.is_available() and (dist is None or dist.is_main):
        log("training on the CPU although a GPU is visible; --device cuda trains on it")
    problems = ProblemSource(config.seed, config.dataset, reward_fn=config.reward_fn)  # refused before any model
    tokenizer = load_tokenizer(config.student)
    student = load_model(config.student, tokenizer, seed=config.seed)
    teacher = load_model(config.teacher, tokenizer, seed=config.seed + 1, dtype=getattr(torch, config.teacher_dtype))
    if config.student_init:
        init = Path(config.student_init)
        if init.is_dir():
            student = load_model(str(init), tokenizer, seed=config.seed)
        elif init.is_file():
            student.load_state_dict(torch.load(init, map_location="cpu", weights_only=False)["model"])
        else:
            raise ValueError(f"student_init must be a model folder or checkpoint file, got {config.student_init!r}")
    return SODTrainer(config, student, teacher, tokenizer, executor, problems=problems, log=log, dist=dist)
