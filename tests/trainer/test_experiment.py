"""The controlled tool-fault experiment: fault placement, retries, per-position statistics, and a tiny run."""

from __future__ import annotations

import json
import math

import pytest

import trainer.demo

from tests.trainer.test_trainer_rollout import ArithmeticTool, ReplayGenerator
from trainer.experiment import (POSITIONS, parse_experiment_args, position_means, position_of, retried,
                                rollout_summary, run_experiment)
from trainer.rollout import ChatFormat, RolloutSettings, Trajectory, run_rollouts
from trainer.sft import solution_turns
from trainer.task import ERROR_OBSERVATION, FaultInjector, Problem, ProblemSource
from trainer.tokenizer import build_task_tokenizer


def test_fault_at_a_known_step_only_touches_that_step():
    faults = FaultInjector(1.0, seed=3, kind="error", at_step=2)
    assert faults.maybe_corrupt("17\n", 0, 5, 0) == ("17\n", False)  # turn 0 = step 1
    assert faults.maybe_corrupt("17\n", 0, 5, 1) == (ERROR_OBSERVATION, True)  # turn 1 = step 2
    assert faults.maybe_corrupt("17\n", 0, 5, 2) == ("17\n", False)
    assert faults.faults_seen == 1
    # The draw for the chosen step is the one an unrestricted injector makes for the same keys.
    anywhere, only_first = FaultInjector(0.5, seed=9), FaultInjector(0.5, seed=9, at_step=1)
    for sample in range(200):
        assert anywhere.maybe_corrupt("40\n", 7, sample, 0) == only_first.maybe_corrupt("40\n", 7, sample, 0)
    assert 50 < only_first.faults_seen < 150
    shifted, faulted = FaultInjector(1.0, seed=1, kind="shift").maybe_corrupt("40\n", 0, 0, 0)
    assert faulted and shifted != "40\n" and shifted.strip().lstrip("-").isdigit()


@pytest.mark.parametrize("kwargs, message", [(dict(kind="garbled"), "kind"), (dict(at_step=0), "at_step"),
                                             (dict(at_step=1.0), "at_step"), (dict(at_step=True), "at_step")])
def test_fault_injector_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FaultInjector(0.5, seed=0, **kwargs)
    with pytest.raises(ValueError, match="last key"):
        FaultInjector(1.0, seed=0, at_step=1).maybe_corrupt("1\n")


def test_rollout_with_a_failed_first_call_shows_the_error_then_correct_outputs():
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    source = ProblemSource(0)
    problems = [p for p in (source.train(i) for i in range(40)) if len(p.solution_code) >= 2][:3]
    script = {}
    for problem in problems:
        turns, _ = solution_turns(problem)
        script[problem.question] = [turns[0], *turns]  # retry the failed call, then the reference solution
    tool = ArithmeticTool()
    out = run_rollouts(problems, list(range(len(problems))), ReplayGenerator(chat, script), chat, tool,
                       RolloutSettings(max_turns=6, max_new_tokens=40, max_total_tokens=600),
                       faults=FaultInjector(1.0, seed=0, kind="error", at_step=1), fault_keys=(0,))
    for traj, problem in zip(out, problems):
        assert traj.fault_after_step == [1]
        assert traj.observations[0] == ERROR_OBSERVATION
        assert traj.observations[1:] == list(problem.tool_outputs)
        assert retried(traj) and traj.reward == 1.0
    summary = rollout_summary(out)
    assert summary == {"faulted": 3, "retry_rate": 1.0, "faulted_reward": 1.0, "clean_reward": None}


def _trajectory(texts, faults):
    return Trajectory(group=0, problem=Problem("q", "1"), token_ids=[], response_mask=[], sample_logprobs=[],
                      prompt_length=0, assistant_texts=texts, fault_after_step=faults)


def test_retried_compares_the_code_of_the_turn_after_the_fault():
    call = "<tool_call>print(3+4)</tool_call>"
    assert retried(_trajectory([call, call, "Answer: 7"], [1]))
    assert not retried(_trajectory([call, "<tool_call>print(3+5)</tool_call>"], [1]))
    assert not retried(_trajectory([call, "Answer: 9"], [1]))
    assert not retried(_trajectory([call, call], []))  # no fault: nothing to retry
    assert not retried(_trajectory([call], [1]))


def test_position_means_split_by_fault_and_position():
    assert [position_of(k) for k in (1, 2, 3, 4)] == ["before", "right after", "later", "later"]
    divergences = [[0.2, 2.0, 0.4], [0.1, 0.3], [0.5]]
    weights = [[1.0, 0.1, 0.5], [1.0, 0.33], [1.0]]
    table = position_means(divergences, weights, [True, False, False])
    assert table["faulted"]["before"] == pytest.approx({"d": 0.2, "w": 1.0, "steps": 1})
    assert table["faulted"]["right after"] == pytest.approx({"d": 2.0, "w": 0.1, "steps": 1})
    assert table["faulted"]["later"] == pytest.approx({"d": 0.4, "w": 0.5, "steps": 1})
    assert table["clean"]["before"] == pytest.approx({"d": 0.3, "w": 1.0, "steps": 2})
    assert table["clean"]["right after"] == pytest.approx({"d": 0.3, "w": 0.33, "steps": 1})
    assert "later" not in table["clean"]


@pytest.mark.parametrize("argv, message", [(["--seeds", "a"], "--seeds"), (["--updates", "0"], "--updates"),
                                           (["--train-fault-rate", "2"], "--train-fault-rate")])
def test_experiment_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_experiment_args(argv)
    assert message in capsys.readouterr().err


def test_tiny_experiment_runs_both_objectives_per_seed_and_summarizes(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.demo, "SFT_POOL", 40)
    out = tmp_path / "experiment"
    summary = run_experiment(["--output-dir", str(out), "--seeds", "0,1", "--teacher-sft-steps", "2",
                              "--student-sft-steps", "2", "--updates", "2", "--prompts-per-step", "2",
                              "--eval-problems", "3"], executor=ArithmeticTool())
    saved = json.loads((out / "experiment.json").read_text())
    assert saved["seeds"].keys() == {"0", "1"} and (out / "experiment.png").stat().st_size > 10_000
    assert saved["machine"]["cpu"] and saved["machine"]["torch"]
    for seed, record in saved["seeds"].items():
        for stage in ("before", "opd", "sod"):
            for kind in ("clean", "faulted"):
                assert 0.0 <= record[stage][kind]["accuracy"] <= 1.0
        assert len(record["opd"]["train_rollouts"]) == len(record["sod"]["train_rollouts"]) == 2
        logged = [json.loads(line) for line in (out / f"opd-s{seed}" / "steps.jsonl").read_text().splitlines()]
        assert all(w == 1.0 for r in logged for w in r["w"])  # OPD: every step weight 1
    gain = summary["aggregate"]["sod accuracy gain clean"]
    expected = [saved["seeds"][s]["sod"]["clean"]["accuracy"] - saved["seeds"][s]["before"]["clean"]["accuracy"]
                for s in ("0", "1")]
    assert gain["values"] == pytest.approx(expected)
    assert gain["mean"] == pytest.approx(sum(expected) / 2)
    assert math.isfinite(summary["wall_seconds"])
    assert set(POSITIONS) >= set(saved["seeds"]["0"]["sod"]["train_positions"].get("clean", {}))
    difference = summary["aggregate"]["sod minus opd accuracy faulted"]
    paired = [saved["seeds"][s]["sod"]["faulted"]["accuracy"] - saved["seeds"][s]["opd"]["faulted"]["accuracy"]
              for s in ("0", "1")]
    assert difference["values"] == pytest.approx(paired)
    (out / "experiment.png").unlink()
    again = run_experiment(["--output-dir", str(out), "--report"])  # no training: table and figure only
    assert json.loads(json.dumps(again["aggregate"])) == json.loads(json.dumps(summary["aggregate"]))
    assert (out / "experiment.png").exists()
    with pytest.raises(ValueError, match="experiment.json"):
        run_experiment(["--output-dir", str(tmp_path / "empty"), "--report"])
