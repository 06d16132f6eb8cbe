"""The demo's statistics, machine line, tool memo, warm-start data, step profiles and a tiny multi-seed run."""

from __future__ import annotations

import json
import random
import statistics
import threading

import pytest
import torch

import trainer.demo as demo
from tests.trainer.test_trainer_rollout import ArithmeticTool, ReplayGenerator
from trainer.measure import MemoizedExecutor, machine_description, summarize, t_quantile
from trainer.plots import AFTER, BEFORE, CLEAN, band
from trainer.models import build_preset
from trainer.rollout import ChatFormat, RolloutSettings, ToolObservation, run_rollouts
from trainer.sft import solution_turns
from trainer.task import ERROR_OBSERVATION, ProblemSource
from trainer.tokenizer import build_task_tokenizer

# Two-sided 95% quantiles of Student's t (standard tables) and of the normal distribution.
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 30: 2.042, 1000: 1.962}


@pytest.mark.parametrize("df, expected", sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-3)


def test_summarize_gives_mean_sample_std_and_t_interval():
    values = [float(v) for v in torch.rand(5, generator=torch.Generator().manual_seed(4))]
    result = summarize(values)
    assert result["mean"] == pytest.approx(statistics.fmean(values))
    assert result["std"] == pytest.approx(statistics.stdev(values))
    half = T_TABLE[4] * statistics.stdev(values) / 5 ** 0.5
    assert result["ci95"] == pytest.approx((statistics.fmean(values) - half, statistics.fmean(values) + half),
                                           abs=1e-3)
    single = summarize([0.25])
    assert single["mean"] == 0.25 and single["ci95"] is None and single["std"] is None
    with pytest.raises(ValueError, match="values"):
        summarize([])
    with pytest.raises(ValueError, match="probability"):
        t_quantile(0.4, 3)
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.975, 0)


def test_machine_description_names_the_cpu_and_the_torch_build():
    machine = machine_description()
    assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["logical_cores"] >= 1


class CountingTool:
    def __init__(self, result=None):
        self.calls = []
        self.result = result
        self.lock = threading.Lock()

    def __call__(self, code):
        with self.lock:
            self.calls.append(code)
        return self.result or ArithmeticTool()(code)


def test_memo_replays_only_successful_pure_arithmetic_prints():
    inner = CountingTool()
    memo = MemoizedExecutor(inner)
    first = memo("print(12+30)")
    assert memo("print(12+30)") is first and first.output == "42\n"
    assert inner.calls == ["print(12+30)"]
    for code in ("import os\nprint(1)", " print(12+30)", "print(12+30);print(1)", "print(2**99)",
                 "print(1234567890123*2)"):
        assert not MemoizedExecutor.cacheable(code)
        memo(code)
        memo(code)
        assert inner.calls[-2:] == [code, code]
    failing = CountingTool(ToolObservation(output="Traceback", ok=False))
    memo = MemoizedExecutor(failing)
    memo("print(1-2)")
    memo("print(1-2)")
    assert failing.calls == ["print(1-2)"] * 2 and memo.sandbox_runs == 2 and memo.calls == 2


def test_warm_start_examples_insert_a_failed_call_and_its_retry(monkeypatch):
    monkeypatch.setattr(demo, "SFT_POOL", 40)
    chat = ChatFormat(build_task_tokenizer())
    plain = demo.warm_start_examples(chat, seed=5, noise=0.0)
    retrying = demo.warm_start_examples(chat, seed=5, noise=0.0, retry_fraction=1.0)
    tokenizer = chat.tokenizer
    for (ids, mask), (rids, rmask) in zip(plain[:20], retrying[:20]):
        text, retried_text = tokenizer.decode(ids), tokenizer.decode(rids)
        assert ERROR_OBSERVATION not in text and retried_text.count(ERROR_OBSERVATION) == 1
        calls = retried_text.split("<tool_call>")[1:]
        assert calls[0].split("</tool_call>")[0] == calls[1].split("</tool_call>")[0]
        assert sum(rmask) > sum(mask) and len(rids) == len(rmask)
    with pytest.raises(ValueError, match="retry_fraction"):
        demo.warm_start_examples(chat, seed=0, noise=0.0, retry_fraction=1.5)


def test_noisy_turns_flag_exactly_the_corrupted_calls_and_learn_noise_masks_them(monkeypatch):
    monkeypatch.setattr(demo, "SFT_POOL", 60)
    chat = ChatFormat(build_task_tokenizer())
    problems = demo.sft_problems(3)
    rng = random.Random(0)
    for problem in problems:
        clean = solution_turns(problem)
        assert demo.noisy_turns(problem, *clean) == [False] * len(clean[0])
        turns, observations = solution_turns(problem, 1.0, rng)
        assert demo.noisy_turns(problem, turns, observations) == [True] * len(problem.solution_code) + [False]
    flagged = total = 0
    for problem in problems:
        turns, observations = solution_turns(problem, 0.3, rng)
        flags = demo.noisy_turns(problem, turns, observations)
        flagged, total = flagged + sum(flags), total + len(problem.solution_code)
        ids, mask = demo.conversation(chat, problem.question, turns, observations, [not f for f in flags])
        full_ids, full_mask = chat.conversation(problem.question, turns, observations)
        assert ids == full_ids and sum(mask) < sum(full_mask) if any(flags) else mask == full_mask
    assert 0.15 < flagged / total < 0.45
    learned = demo.warm_start_examples(chat, seed=3, noise=0.3)
    masked = demo.warm_start_examples(chat, seed=3, noise=0.3, learn_noise=False)
    assert [ids for ids, _ in learned] == [ids for ids, _ in masked]
    assert sum(map(sum, (m for _, m in masked))) < sum(map(sum, (m for _, m in learned)))


def test_sft_problems_can_leave_out_long_solutions(monkeypatch):
    monkeypatch.setattr(demo, "SFT_POOL", 50)
    short = demo.sft_problems(2, max_calls=2)
    everything = demo.sft_problems(2)
    assert len(short) == len(everything) == 50
    assert max(len(p.solution_code) for p in short) == 2 and max(len(p.solution_code) for p in everything) == 3
    assert [p for p in everything if len(p.solution_code) <= 2] == short[:len([p for p in everything
                                                                               if len(p.solution_code) <= 2])]
    with pytest.raises(ValueError, match="max_calls"):
        demo.sft_problems(0, max_calls=0)


def test_training_profiles_split_early_and_late_updates(tmp_path):
    records = [{"update": u, "d": [0.1 * (u + 1), 0.4], "w": [1.0, 0.25 * (u + 1) / 4],
                "fault_after_step": [1] if u % 2 else []} for u in range(8)]
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    profiles = demo.training_profiles(path, updates=8)
    assert profiles["early"][CLEAN] == {1: pytest.approx((0.1, 1.0, 1)), 2: pytest.approx((0.4, 0.0625, 1))}
    assert profiles["early"][BEFORE] == {1: pytest.approx((0.2, 1.0, 1))}
    assert profiles["late"][AFTER] == {2: pytest.approx((0.4, 0.5, 1))}
    assert profiles["early"][AFTER] == {2: pytest.approx((0.4, 0.125, 1))}
    assert profiles["late"][CLEAN][1] == pytest.approx((0.7, 1.0, 1))


def test_off_path_share_splits_the_kl_at_the_first_slip():
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    policy = build_preset("tiny-student", tokenizer, seed=0).eval()
    teacher = build_preset("tiny-teacher", tokenizer, seed=1).eval()
    problems = [ProblemSource(0).train(i) for i in range(3)]
    script = {p.question: solution_turns(p)[0] for p in problems}
    trajectories = run_rollouts(problems, [0, 1, 2], ReplayGenerator(chat, script), chat, ArithmeticTool(),
                                RolloutSettings(max_turns=5, max_new_tokens=40, max_total_tokens=600))
    result = demo.off_path_share(policy, teacher, tokenizer.pad_token_id, trajectories, micro_batch_size=2)
    kl_on = kl_off = tokens_on = tokens_off = 0.0
    with torch.no_grad():
        for traj in trajectories:  # one row at a time, logits from the models' own forward
            ids = torch.tensor([traj.token_ids])
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, :-1].double(), -1)
            logt = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)
            slipped = False
            for t in range(len(traj.token_ids) - 1):
                if not traj.response_mask[t + 1]:
                    continue
                kl = max(float((logp[t].exp() * (logp[t] - logt[t])).sum()), 0.0)
                if slipped:
                    kl_off, tokens_off = kl_off + kl, tokens_off + 1
                else:
                    kl_on, tokens_on = kl_on + kl, tokens_on + 1
                slipped = slipped or int(logt[t].argmax()) != traj.token_ids[t + 1]
    assert tokens_off > 0 and tokens_on > 0  # an untrained teacher slips off its own path at once
    assert result["token_share_off_path"] == pytest.approx(tokens_off / (tokens_on + tokens_off))
    assert result["kl_share_off_path"] == pytest.approx(kl_off / (kl_on + kl_off), rel=1e-4)
    assert result["kl_per_token_on_path"] == pytest.approx(kl_on / tokens_on, rel=1e-4)


def test_band_is_mean_min_max_and_rejects_ragged_curves():
    mean, low, high = band([[0.0, 1.0], [2.0, float("nan")], [1.0, 3.0]])
    assert mean == pytest.approx([1.0, 2.0]) and low == [0.0, 1.0] and high == [2.0, 3.0]
    with pytest.raises(ValueError, match="equal lengths"):
        band([[1.0], [1.0, 2.0]])


@pytest.mark.parametrize("argv", [["--seeds", ""], ["--seeds", "1,x"], ["--compare", "ppo"], ["--updates", "0"],
                                  ["--tool-fault-rate", "-0.1"], ["--lr", "0"],
                                  ["--teacher-noise", "2"], ["--student-max-calls", "-1"], ["--teacher-lr", "0"]])
def test_demo_flags_are_checked(argv):
    with pytest.raises(SystemExit):
        demo.parse_demo_args(argv)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(demo, "on_terminal", lambda: False)
    assert demo.progress_bar(3, "x").disable
    monkeypatch.setattr(demo, "on_terminal", lambda: True)
    bar = demo.progress_bar(3, "x")
    assert not bar.disable
    bar.close()


def test_library_bars_are_off_without_a_terminal(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(demo, "on_terminal", lambda: False)
    was = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        demo.library_bars_off_terminal()
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_tiny_demo_runs_every_seed_and_reports_mean_and_interval(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SFT_POOL", 40)
    out = tmp_path / "demo"
    argv = ["--output-dir", str(out), "--seeds", "0,1", "--compare", "opd,sod", "--teacher-sft-steps", "2",
            "--student-sft-steps", "2", "--updates", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "1",
            "--eval-problems", "3"]
    summary = demo.run_demo(argv, executor=ArithmeticTool())
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["per_seed"]) == {"0", "1"}
    assert saved["machine"]["torch"] == torch.__version__
    for name in ("opd", "sod"):
        rows = saved["aggregate"][name]
        greedy = [saved["per_seed"][s][name]["after"]["greedy"] - saved["per_seed"][s]["before"]["greedy"]
                  for s in ("0", "1")]
        assert rows["greedy change"]["values"] == pytest.approx(greedy)
        assert rows["greedy change"]["mean"] == pytest.approx(sum(greedy) / 2)
        assert rows["kl before"]["ci95"][0] <= rows["kl before"]["mean"] <= rows["kl before"]["ci95"][1]
    for plot in saved["plots"]:
        assert (tmp_path / "demo" / "plots").exists() and json.dumps(plot) and open(plot, "rb").read(4) == b"\x89PNG"
    captured = capsys.readouterr()
    printed = captured.out
    assert "\r" not in printed + captured.err  # no progress-bar frames without a terminal
    assert "mean ± std [95% CI]" in printed and saved["machine"]["cpu"] in printed
    assert printed.count("SFT steps") == 3 and summary["wall_seconds"] > 0


def test_warm_start_is_cached_per_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "SFT_POOL", 8)
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    kwargs = dict(steps=1, lr=1e-3, noise=0.0, batch=2, seed=0, rebuild=False, label="student")
    trained, seconds = demo.warm_start(tmp_path / "s", "tiny-student", tokenizer, chat, **kwargs)
    loaded, zero = demo.warm_start(tmp_path / "s", "tiny-student", tokenizer, chat, **kwargs)
    assert seconds > 0 and zero == 0.0 and "loaded cached" in capsys.readouterr().out
    for a, b in zip(trained.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    demo.warm_start(tmp_path / "s", "tiny-student", tokenizer, chat, **{**kwargs, "seed": 1})
    assert "loaded cached" not in capsys.readouterr().out  # another recipe trains again
