"""Where the trainer computes: the ``device`` setting, and training on a GPU (alone and under torchrun/NCCL).

On CPU: the setting's checks and errors (with CUDA reported present or absent), the batch move, resuming
under another device.  Where CUDA exists: one update's gradient on the GPU against the CPU's on the same
replayed trajectories (both objectives); the command line on the GPU, stopped and resumed; and under torchrun
with ``--device cuda`` (NCCL; as many ranks as GPUs, at most 2) against a single GPU process, with a resume.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tests.conftest import HAS_CUDA
from tests.trainer.test_trainer_distributed import (RTOL, assert_records_close, launch, multi_step_seed, ok, one_update,
                                            read_jsonl, run_args, without_timing)
from trainer.checkpoint import CHECKPOINT_NAME, DCP_NAME, METRICS_NAME, STEPS_NAME, resume_differences
from trainer.config import TrainConfig
from trainer.placement import check_device_spec, resolve_device
from trainer.train import Batch

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def fake_cuda(monkeypatch, count: int) -> None:
    """Make torch report ``count`` GPUs (0: none) without touching one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_device_setting_is_checked_and_resolved(monkeypatch):
    for spec in ("cpu", "cuda", "cuda:3", "auto"):
        assert check_device_spec(spec) == spec
        assert TrainConfig(device=spec).validate().device == spec
    for bad in ("gpu", "CUDA", "cuda:", "cuda:x", "cuda:0 ", "mps", ""):
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"):
            TrainConfig(device=bad).validate()

    fake_cuda(monkeypatch, 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"device='{spec}' but CUDA is not available.*--device cpu"):
            resolve_device(spec)

    fake_cuda(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:2': there are 2 visible GPUs \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:2")
    # torchrun: each rank takes GPU LOCAL_RANK.
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 2 has no GPU of its own \\(2 visible\\).*--nproc-per-node"):
        resolve_device("cuda", local_rank=2)
    with pytest.raises(ValueError, match="pass --device cuda, not 'cuda:1'"):
        resolve_device("cuda:1", local_rank=0)


def _exit_code(main, argv) -> int:
    """A command's exit status, whether it returns it or raises SystemExit (argparse's own errors)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def test_command_line_refuses_a_missing_gpu(tmp_path, monkeypatch, capsys):
    from trainer.__main__ import train_main

    fake_cuda(monkeypatch, 0)
    code = _exit_code(train_main, ["--device", "cuda", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "device='cuda' but CUDA is not available" in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line, no usage block
    assert not (tmp_path / "run").exists()  # refused before anything was created
    code = _exit_code(train_main, ["--device", "gpu", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'" in err, err


def test_batch_moves_and_device_may_change_on_resume():
    ids = torch.tensor([[5, 6, 7, 0]])
    batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=ids[:, 1:],
                  response_mask=torch.tensor([[0, 1, 0]]), old_logprobs=torch.tensor([[0.0, -0.5, 0.0]]))
    assert batch.to(torch.device("cpu")) is batch
    moved = batch.to("meta")
    assert all(getattr(moved, name).device.type == "meta" for name in Batch.__dataclass_fields__)
    assert moved.old_logprobs.dtype == torch.float32 and moved.target_ids.dtype == torch.long
    # Moving a run between the CPU and a GPU is not a change of what an update computes.
    saved = TrainConfig(device="cpu").to_dict()
    assert resume_differences(saved, TrainConfig(device="cuda"), None, {}) == \
        resume_differences(saved, TrainConfig(device="cpu"), None, {})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("objective", ["kl", "pg"])
def test_a_16_bit_teacher(objective):
    """--teacher-dtype bfloat16: the teacher's weights and forward pass in bfloat16 (the losses take it beside
    the float32 student); one update close to the float32 teacher's on the same replayed trajectories."""
    from tests.trainer.test_trainer_rollout import ArithmeticTool
    from trainer.train import build_trainer

    trainer = build_trainer(TrainConfig(teacher_dtype="bfloat16").validate(), ArithmeticTool(), log=lambda m: None)
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}
    seed = multi_step_seed()
    config = dict(objective=objective, prompts_per_step=2, rollouts_per_prompt=2, max_turns=4, max_new_tokens=10,
                  max_total_tokens=300, micro_batch_size=2, grad_clip=0.0, rollout_rng="per_trajectory",
                  seed=seed, tool_workers=1)
    grads, metrics, _ = one_update(TrainConfig(teacher_dtype="bfloat16", **config).validate(), None)
    want_grads, want_metrics, _ = one_update(TrainConfig(**config).validate(), None)
    what = f"{objective}, seed {seed}"
    assert all(g.dtype == torch.float32 for g in grads.values())
    # bfloat16 rounding of the teacher, not another computation (measured: gradients within 1e-2, the
    # student-teacher KL within 1.2e-3; the pg loss itself mixes signs, so it is not compared relatively).
    worst = max(rel(grads[name], want) for name, want in want_grads.items())
    assert 0 < worst <= 0.05, (what, worst)
    assert abs(metrics["kl"] - want_metrics["kl"]) <= 0.01 * want_metrics["kl"], what
    with pytest.raises(ValueError, match="teacher_dtype must be one of"):
        TrainConfig(teacher_dtype="int8").validate()


# ------------------------------------------------------------------------------------------------------
# On a GPU.
GPU_RTOL = 1e-3  # the GPU against the CPU: float32 on both (no TF32), summed in other orders


@needs_cuda
@pytest.mark.parametrize("objective", ["kl", "pg"])
def test_gpu_update_equals_the_cpu_update(objective):
    seed = multi_step_seed()
    config = dict(objective=objective, prompts_per_step=2, rollouts_per_prompt=2, max_turns=4, max_new_tokens=10,
                  max_total_tokens=300, micro_batch_size=2, grad_clip=0.0, rollout_rng="per_trajectory",
                  seed=seed, tool_workers=1)
    grads, metrics, logs = one_update(TrainConfig(device="cuda", **config).validate(), None)
    want_grads, want_metrics, want_logs = one_update(TrainConfig(device="cpu", **config).validate(), None)
    what = f"{objective}, seed {seed}"
    assert all(g.device.type == "cuda" for g in grads.values()), what
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        assert rel(grads[name], want) <= GPU_RTOL, (what, name, rel(grads[name], want))
    assert metrics["distilled_tokens"] == want_metrics["distilled_tokens"] and metrics["reward"] == \
        want_metrics["reward"], what
    for key in ("loss", "kl", "grad_norm"):
        assert abs(metrics[key] - want_metrics[key]) <= GPU_RTOL * abs(want_metrics[key]) + 1e-6, (what, key)
    assert [r["tokens"] for r in logs] == [r["tokens"] for r in want_logs], what


@needs_cuda
def test_gpu_command_line_trains_and_resumes(tmp_path):
    seed = random.randrange(1 << 16)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(launch(run_args(straight, seed, "--device", "cuda"), ranks=None))
    ok(launch(run_args(resumed, seed, "--device", "cuda", "--updates", "1"), ranks=None))
    out = ok(launch(run_args(resumed, seed, "--device", "cuda", "--resume"), ranks=None))
    assert f"resumed from {resumed / CHECKPOINT_NAME} at update 1" in out
    payload = torch.load(straight / CHECKPOINT_NAME, weights_only=True)
    assert payload["step"] == 3 and "cuda" in payload["rng"]  # the GPU's generator is saved too
    assert_records_close(without_timing(read_jsonl(resumed / METRICS_NAME)),
                         without_timing(read_jsonl(straight / METRICS_NAME)), f"seed {seed}")
    assert_records_close(read_jsonl(resumed / STEPS_NAME), read_jsonl(straight / STEPS_NAME), f"seed {seed}")


@needs_cuda
def test_gpu_torchrun_nccl_equals_one_gpu_process(tmp_path, monkeypatch):
    ranks = min(2, torch.cuda.device_count())
    seed = random.randrange(1 << 16)
    what = f"seed {seed}, {ranks} GPU rank(s)"
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")  # one node: bootstrap over the loopback interface
    one, two, resumed = tmp_path / "one", tmp_path / "ranks", tmp_path / "resumed"
    ok(launch(run_args(one, seed, "--device", "cuda"), ranks=None))
    ok(launch(run_args(two, seed, "--device", "cuda"), ranks=ranks))
    assert (two / DCP_NAME).is_dir()
    gap = assert_records_close(without_timing(read_jsonl(two / METRICS_NAME)),
                               without_timing(read_jsonl(one / METRICS_NAME)), what)
    assert_records_close(read_jsonl(two / STEPS_NAME), read_jsonl(one / STEPS_NAME), what)
    ok(launch(run_args(resumed, seed, "--device", "cuda", "--updates", "1"), ranks=ranks))
    out = ok(launch(run_args(resumed, seed, "--device", "cuda", "--resume"), ranks=ranks))
    assert f"resumed from {resumed / DCP_NAME} at update 1" in out
    assert_records_close(without_timing(read_jsonl(resumed / METRICS_NAME)),
                         without_timing(read_jsonl(two / METRICS_NAME)), what)
    print(f"{what}: largest relative metric gap to one GPU process {gap:.2e} (tolerance {RTOL})",
          json.dumps({"ranks": ranks, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}))
