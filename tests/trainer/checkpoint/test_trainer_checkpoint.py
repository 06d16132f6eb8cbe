"""Checkpoint safety: a resume must match the run that wrote the checkpoint, unreadable checkpoints fall back
to the previous one (named), a failed write never replaces a good checkpoint, killed writes are cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.trainer.test_trainer_train import make_trainer, read_jsonl, small_config, without_timing
from trainer import checkpoint as ckpt
from trainer.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError
from trainer.models import build_preset
from trainer.task import ProblemSource
from trainer.tokenizer import build_task_tokenizer
from trainer.train import METRICS_NAME, SODTrainer


def run(tmp_path, name, messages=None, **overrides):
    """Train a tiny run (2 updates, a checkpoint after each unless overridden); returns the trainer."""
    trainer = make_trainer(small_config(tmp_path, name, **overrides))
    if messages is not None:
        trainer.log = messages.append
    trainer.train()
    return trainer


def states_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.student.state_dict().values(), b.student.state_dict().values()))


@pytest.mark.parametrize("change", [{"seed": 1}, {"lr": 3e-3}, {"objective": "pg"}, {"step_divergence": "none"}])
def test_resume_under_other_settings_is_refused_naming_the_fields(tmp_path, change):
    run(tmp_path, "a", updates=1)
    before = (tmp_path / "a" / CHECKPOINT_NAME).read_bytes()
    config_before = (tmp_path / "a" / "config.json").read_text()
    with pytest.raises(CheckpointError) as info:
        make_trainer(small_config(tmp_path, "a", updates=2, resume=True, **change)).train()
    (field, value), = change.items()
    assert f"{field}: " in str(info.value) and repr(value) in str(info.value)
    assert "--allow-config-change" in str(info.value) and CHECKPOINT_NAME in str(info.value)
    # Nothing in the folder changed.
    assert (tmp_path / "a" / CHECKPOINT_NAME).read_bytes() == before
    assert (tmp_path / "a" / "config.json").read_text() == config_before
    assert [m["update"] for m in read_jsonl(tmp_path / "a" / METRICS_NAME)] == [0]


def test_allow_config_change_continues_and_says_what_changed(tmp_path):
    run(tmp_path, "a", updates=1)
    messages = []
    trainer = run(tmp_path, "a", messages, updates=2, resume=True, lr=3e-3, allow_config_change=True)
    assert trainer.step == 2 and any("lr: 0.01 -> 0.003" in m for m in messages)
    saved = torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)
    assert saved["config"]["lr"] == 3e-3  # the new settings are recorded from now on


def test_operational_settings_may_change_on_resume(tmp_path):
    """More updates, other logging / threads / checkpoint cadence: the same run, so the resume is allowed."""
    run(tmp_path, "a", updates=1)
    trainer = run(tmp_path, "a", updates=2, resume=True, log_every=5, checkpoint_every=3, tool_workers=2,
                  log_format="json")
    assert trainer.step == 2


def test_resume_with_another_teacher_is_refused_by_its_digest(tmp_path):
    run(tmp_path, "a", updates=1)
    config = small_config(tmp_path, "a", updates=2, resume=True)
    trainer = make_trainer(config)
    other = build_preset("tiny-teacher", trainer.tokenizer, seed=123)  # same name, other weights
    trainer = SODTrainer(config, trainer.student, other, trainer.tokenizer, trainer.executor, log=lambda m: None)
    with pytest.raises(CheckpointError, match="teacher digest"):
        trainer.train()


def test_data_digest_follows_the_dataset_content_not_its_name(tmp_path):
    path = tmp_path / "data.jsonl"
    tokenizer = build_task_tokenizer()
    teacher = build_preset("tiny-teacher", tokenizer, seed=1)

    def fingerprint(rows):
        path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
        return ckpt.run_fingerprint(ProblemSource(0, str(path)), tokenizer, teacher)

    rows = [(f"What is {i} + {i}?", str(2 * i)) for i in range(12)]
    first = fingerprint(rows)
    assert fingerprint(rows) == first
    changed = fingerprint(rows[:-1] + [("What is 11 + 11?", "23")])
    assert changed["data"] != first["data"] and changed["teacher"] == first["teacher"]
    assert ckpt.run_fingerprint(ProblemSource(0), tokenizer, teacher)["data"] != first["data"]
    assert ckpt.run_fingerprint(ProblemSource(1), tokenizer, teacher)["data"] != \
        ckpt.run_fingerprint(ProblemSource(0), tokenizer, teacher)["data"]


def test_fresh_start_removes_the_previous_runs_checkpoints(tmp_path):
    """A fresh start must not leave an old checkpoint that a later resume would continue."""
    run(tmp_path, "a", updates=2)
    assert (tmp_path / "a" / CHECKPOINT_NAME).exists() and (tmp_path / "a" / PREVIOUS_NAME).exists()
    fresh = make_trainer(small_config(tmp_path, "a", updates=5, checkpoint_every=5, seed=3))
    fresh.prepare()
    assert ckpt.run_files(tmp_path / "a") == []
    with pytest.raises(CheckpointError, match="no checkpoint"):
        make_trainer(small_config(tmp_path, "a", updates=5, checkpoint_every=5, seed=3, resume=True)).prepare()


def test_the_same_folder_trains_twice_in_a_row(tmp_path):
    """What the demo does on every run: a fresh library start into its own folder replaces the last run."""
    first = run(tmp_path, "demo-like")
    second = run(tmp_path, "demo-like")
    assert states_equal(first, second)
    assert [m["update"] for m in read_jsonl(tmp_path / "demo-like" / METRICS_NAME)] == [0, 1]


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    straight = run(tmp_path, "straight")
    run(tmp_path, "a")  # checkpoint.pt at update 2, checkpoint.prev.pt at update 1
    path = tmp_path / "a" / CHECKPOINT_NAME
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2],
                      "random": os.urandom(4096)}[damage])
    with pytest.raises(CheckpointError, match=CHECKPOINT_NAME):
        ckpt.read_checkpoint(path)
    messages = []
    resumed = run(tmp_path, "a", messages, resume=True)
    assert any(f"resumed from {tmp_path / 'a' / PREVIOUS_NAME} at update 1" in m for m in messages)
    assert any("skipped" in m and CHECKPOINT_NAME in m for m in messages)
    assert states_equal(straight, resumed)  # update 2 was redone exactly
    assert without_timing(read_jsonl(tmp_path / "a" / METRICS_NAME)) == \
        without_timing(read_jsonl(tmp_path / "straight" / METRICS_NAME))
    assert (tmp_path / "a" / (CHECKPOINT_NAME + ".corrupt")).exists()
    assert torch.load(path, weights_only=True)["step"] == 2


def test_no_readable_checkpoint_is_one_error_naming_every_file(tmp_path):
    run(tmp_path, "a")
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        (tmp_path / "a" / name).write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError) as info:
        make_trainer(small_config(tmp_path, "a", resume=True)).train()
    assert CHECKPOINT_NAME in str(info.value) and PREVIOUS_NAME in str(info.value)


def test_a_failed_write_keeps_both_checkpoints(tmp_path, monkeypatch):
    trainer = run(tmp_path, "a")
    folder = tmp_path / "a"
    before = {name: (folder / name).read_bytes() for name in (CHECKPOINT_NAME, PREVIOUS_NAME)}

    def torn_save(payload, handle):  # a write that stops half-way (disk full, kill during the write)
        handle.write(b"PK\x03\x04" + b"\0" * 64)

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(CheckpointError, match="unreadable"):
        trainer.save_checkpoint()
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not list(folder.glob(".*tmp*"))
    assert trainer.saved_step == 2


def test_ctrl_c_between_the_renames_puts_the_current_checkpoint_back(tmp_path, monkeypatch):
    trainer = run(tmp_path, "a")
    current = (tmp_path / "a" / CHECKPOINT_NAME).read_bytes()
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new file is about to take checkpoint.pt's place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (tmp_path / "a" / CHECKPOINT_NAME).read_bytes() == current
    assert not list((tmp_path / "a").glob(".*tmp*"))


def test_save_keeps_the_replaced_checkpoint_as_previous(tmp_path):
    run(tmp_path, "a", updates=3)
    assert torch.load(tmp_path / "a" / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    assert torch.load(tmp_path / "a" / PREVIOUS_NAME, weights_only=True)["step"] == 2


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    run(tmp_path, "a", updates=1)
    folder = tmp_path / "a"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [folder / f".{CHECKPOINT_NAME}.tmp-{dead.pid}", folder / f".{METRICS_NAME}.tmp-{dead.pid}"]
        busy = folder / f".{CHECKPOINT_NAME}.tmp-{live.pid}"
        for path in stale + [busy]:
            path.write_bytes(b"\0" * 1000)
        messages = []
        run(tmp_path, "a", messages, updates=2, resume=True)
        assert not any(path.exists() for path in stale) and busy.exists()
        assert sum("interrupted write" in m for m in messages) == 2
    finally:
        live.kill()
        live.wait()
