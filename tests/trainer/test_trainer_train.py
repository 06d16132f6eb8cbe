"""The update loop: kl / pg objectives, SOD vs plain-OPD weights, accumulation, checkpoints and resume."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainer.test_trainer_rollout import ArithmeticTool, ReplayGenerator
from trainer.config import TrainConfig, add_config_arguments, config_from_args
from trainer.models import build_preset
from trainer.rollout import ChatFormat
from trainer.sft import solution_turns
from trainer.task import ProblemSource
from trainer.tokenizer import build_task_tokenizer
from trainer.train import CHECKPOINT_NAME, METRICS_NAME, STEPS_NAME, SODTrainer

TIMING_KEYS = ("tokens_per_s", "rollout_s", "update_s")


def small_config(tmp_path, name: str, **overrides) -> TrainConfig:
    values = dict(updates=2, prompts_per_step=2, rollouts_per_prompt=2, micro_batch_size=4, max_turns=4,
                  max_new_tokens=10, max_total_tokens=300, lr=1e-2, seed=0, output_dir=str(tmp_path / name),
                  checkpoint_every=1, tool_workers=1)
    values.update(overrides)
    return TrainConfig(**values).validate()


def make_trainer(config: TrainConfig, replay: bool = False) -> SODTrainer:
    """A trainer with freshly seeded tiny models; ``replay`` plays the reference solutions (multi-step)."""
    tokenizer = build_task_tokenizer()
    student = build_preset("tiny-student", tokenizer, seed=config.seed)
    teacher = build_preset("tiny-teacher", tokenizer, seed=config.seed + 1)
    trainer_class = SODTrainer
    if replay:
        source = ProblemSource(config.seed)
        script = {}
        for i in range(config.updates * config.prompts_per_step):
            problem = source.train(i)
            script[problem.question] = solution_turns(problem)[0]

        class ReplayTrainer(SODTrainer):
            def generator(self, model, temperature):
                return ReplayGenerator(ChatFormat(tokenizer), script, model=model, temperature=temperature)

        trainer_class = ReplayTrainer
    return trainer_class(config, student, teacher, tokenizer, ArithmeticTool(), log=lambda message: None)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_two_updates_write_metrics_and_checkpoint_and_resume_bit_for_bit(tmp_path):
    straight = make_trainer(small_config(tmp_path, "straight"))
    straight.train()
    out = tmp_path / "straight"
    metrics = read_jsonl(out / METRICS_NAME)
    assert [m["update"] for m in metrics] == [0, 1]
    for key in ("loss", "kl", "mean_steps", "max_steps", "mean_d1", "mean_last_weight", "reward", "tokens_per_s"):
        assert all(key in m and m[key] == m[key] for m in metrics), key
    steps = read_jsonl(out / STEPS_NAME)
    assert len(steps) == 2 * 4 and all(len(s["d"]) == len(s["w"]) == len(s["tokens"]) >= 1 for s in steps)
    checkpoint = torch.load(out / CHECKPOINT_NAME, weights_only=False)
    assert checkpoint["step"] == 2 and {"model", "optimizer", "rng"} <= set(checkpoint)
    assert not list(out.glob(".*tmp*"))  # the atomic write left no temporary file

    first = make_trainer(small_config(tmp_path, "resumed", updates=1))
    first.train()
    # A crash after the metrics line of update 1 but before its checkpoint: the line must be dropped.
    with open(tmp_path / "resumed" / METRICS_NAME, "a") as handle:
        handle.write(json.dumps({"update": 1, "loss": 123.0}) + "\n")
    resumed = make_trainer(small_config(tmp_path, "resumed", updates=2, resume=True))
    resumed.train()
    assert resumed.step == 2
    resumed_metrics = read_jsonl(tmp_path / "resumed" / METRICS_NAME)
    assert [m["update"] for m in resumed_metrics] == [0, 1]
    assert without_timing(resumed_metrics) == without_timing(metrics)
    for (name, a), (_, b) in zip(straight.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="no checkpoint in .*nothing-here"):
        make_trainer(small_config(tmp_path, "nothing-here", resume=True)).train()
    assert not (tmp_path / "nothing-here").exists()  # a failed resume creates nothing


@pytest.mark.parametrize("objective", ["kl", "pg"])
def test_objectives_update_the_student_on_multi_step_rollouts(tmp_path, objective):
    trainer = make_trainer(small_config(tmp_path, objective, objective=objective, updates=1), replay=True)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    metrics = read_jsonl(tmp_path / objective / METRICS_NAME)[0]
    assert metrics["reward"] == 1.0  # the replayed reference solutions are right
    assert metrics["max_steps"] >= 3 and metrics["kl"] > 0 and metrics["loss"] == metrics["loss"]
    changed = [k for k, v in trainer.student.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    for record in read_jsonl(tmp_path / objective / STEPS_NAME):
        assert record["w"][0] == 1.0 and all(0 < w <= 1.2 + 1e-6 for w in record["w"])
        assert len(record["d"]) == len(record["tokens"])
    # Teacher untouched.
    assert all(p.grad is None for p in trainer.teacher.parameters())


@pytest.mark.parametrize("objective", ["kl", "pg"])
def test_step_divergence_none_gives_unit_weights(tmp_path, objective):
    weights = {}
    for mode in ("none", "kl"):
        trainer = make_trainer(small_config(tmp_path, f"{objective}-{mode}", objective=objective, updates=1,
                                            step_divergence=mode), replay=True)
        trainer.train()
        weights[mode] = [w for r in read_jsonl(tmp_path / f"{objective}-{mode}" / STEPS_NAME) for w in r["w"]]
    assert weights["none"] and all(w == 1.0 for w in weights["none"])
    assert any(abs(w - 1.0) > 1e-3 for w in weights["kl"])  # SOD weighting does act on the same rollouts


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    gradients = []
    for micro in (4, 1):
        trainer = make_trainer(small_config(tmp_path, f"micro{micro}", micro_batch_size=micro, updates=1,
                                            grad_clip=0.0), replay=True)
        # Plain SGD with lr 1: the parameter change is exactly minus the accumulated gradient.
        trainer.optimizer = torch.optim.SGD(trainer.student.parameters(), lr=1.0)
        start = torch.cat([p.detach().flatten() for p in trainer.student.parameters()])
        trainer.train()
        gradients.append(start - torch.cat([p.detach().flatten() for p in trainer.student.parameters()]))
    assert gradients[0].abs().max() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)


def test_config_from_file_and_flags(tmp_path):
    import argparse

    path = tmp_path / "run.yaml"
    path.write_text("objective: pg\nupdates: 7\nstep_divergence: none\nsandbox_allow_missing: [privilege_drop]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--config", str(path), "--updates", "9", "--resume",
                                                 "--output-dir", str(tmp_path / "no-run-here")]))
    assert (config.objective, config.updates, config.step_divergence, config.resume) == ("pg", 9, "none", True)
    assert config.sandbox_allow_missing == ("privilege_drop",)
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps({"epsilon": 0.0}))
    with pytest.raises(ValueError, match="epsilon"):
        config_from_args(parser.parse_args(["--config", str(json_path)]))
    json_path.write_text(json.dumps({"no_such_field": 1}))
    with pytest.raises(ValueError, match="no_such_field"):
        config_from_args(parser.parse_args(["--config", str(json_path)]))
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="sft").validate()
