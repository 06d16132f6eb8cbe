"""The embedded demo: everything from scratch on CPU, no network, no downloaded weights.

1. Build the task tokenizer in code.
2. Train a tiny Qwen3-architecture teacher by supervised learning on programmatic tool-using solutions
   (cached in the output folder: a rerun with the same settings loads it).
3. Warm-start a smaller student more weakly (fewer steps, noisy solutions), also cached.
4. Evaluate both on held-out problems (greedy rollouts through the sandboxed Python tool).
5. Run on-policy distillation with SOD step weights (``--compare opd,sod`` also runs plain OPD from the
   same seed), with a progress bar and per-update metrics.
6. Evaluate again; print a summary table; write PNG plots and ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import TrainConfig
from .models import build_preset, count_parameters
from .plots import plot_step_profiles, plot_training, step_profile
from .rollout import ChatFormat, RolloutSettings
from .sft import build_examples, supervised_train
from .task import FaultInjector, ProblemSource, generate_problem
from .tokenizer import build_task_tokenizer
from .tools import describe_sandbox, sandbox_executor
from .train import SODTrainer, evaluate, format_metrics

# Objectives the demo can compare: name -> step_divergence ("none" is plain OPD).
VARIANTS = {"opd": "none", "sod": "kl"}
SFT_SEED_OFFSET = 1000
SFT_POOL = 3000


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (defaults: about 8 minutes on 2 CPU cores)."""

    teacher_sft_steps: int = 250
    teacher_lr: float = 4e-3
    student_sft_steps: int = 300
    student_lr: float = 3e-3
    student_noise: float = 0.25
    sft_batch: int = 32
    updates: int = 60
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 2
    lr: float = 1e-3
    warmup_updates: int = 5
    temperature: float = 1.0
    max_turns: int = 5
    max_new_tokens: int = 24
    max_total_tokens: int = 400
    eval_problems: int = 64
    tool_fault_rate: float = 0.1
    eval_fault_rate: float = 0.3


def parse_demo_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``python -m trainer demo``."""
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="where models, logs and plots go")
    parser.add_argument("--compare", default="sod", help="comma-separated objectives among opd,sod")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=defaults.updates, help="distillation updates")
    parser.add_argument("--teacher-sft-steps", type=int, default=defaults.teacher_sft_steps)
    parser.add_argument("--student-sft-steps", type=int, default=defaults.student_sft_steps)
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    parser.add_argument("--rollouts-per-prompt", type=int, default=defaults.rollouts_per_prompt)
    parser.add_argument("--eval-problems", type=int, default=defaults.eval_problems)
    parser.add_argument("--tool-fault-rate", type=float, default=defaults.tool_fault_rate,
                        help="probability that a tool observation is corrupted during distillation")
    parser.add_argument("--eval-fault-rate", type=float, default=defaults.eval_fault_rate,
                        help="fault rate of the held-out rollouts used for the step plots")
    parser.add_argument("--sandbox-allow-missing", nargs="*", default=[],
                        help="sandbox protections the demo may run without (see trainer.sandbox.PROTECTIONS)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rebuild", action="store_true", help="retrain the cached teacher and student")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise SystemExit(f"--compare must list objectives among {sorted(VARIANTS)}, got {args.compare!r}")
    args.variants = list(dict.fromkeys(names))
    return args


def warm_start(folder: Path, preset: str, tokenizer, chat: ChatFormat, *, steps: int, lr: float, noise: float,
               batch: int, seed: int, rebuild: bool, label: str):
    """Load the cached model in ``folder`` if it was trained with these settings, else train and save it."""
    recipe = {"preset": preset, "steps": steps, "lr": lr, "noise": noise, "batch": batch, "seed": seed,
              "vocab": len(tokenizer)}
    marker = folder / "sft.json"
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == recipe:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        print(f"{label}: loaded cached warm-start from {folder}")
        return model.eval(), 0.0
    problems = [generate_problem(seed + SFT_SEED_OFFSET, i) for i in range(SFT_POOL)]
    examples = build_examples(problems, chat, noise_rate=noise, seed=seed)
    model = build_preset(preset, tokenizer, seed=seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{label} SFT ({count_parameters(model) / 1e6:.2f}M params)", leave=False)

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    losses = supervised_train(model, examples, steps=steps, batch_size=batch, lr=lr,
                              pad_id=tokenizer.pad_token_id, seed=seed, progress=progress)
    bar.close()
    elapsed = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(recipe))
    print(f"{label}: {steps} SFT steps in {elapsed:.0f}s, final loss {losses[-1]:.3f} (saved to {folder})")
    return model.eval(), elapsed


def _profile(result):
    return step_profile(result.step_divergence, result.step_weights,
                        [t.fault_after_step for t in result.trajectories])


def run_demo(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary dictionary (also written to ``summary.json``)."""
    args = parse_demo_args(argv)
    settings = DemoSettings()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(describe_sandbox())
    executor = sandbox_executor(timeout_s=10.0, allow_missing=args.sandbox_allow_missing)
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    teacher, _ = warm_start(out / "teacher", "tiny-teacher", tokenizer, chat, steps=args.teacher_sft_steps,
                            lr=settings.teacher_lr, noise=0.0, batch=settings.sft_batch, seed=args.seed,
                            rebuild=args.rebuild, label="teacher")
    student_init, _ = warm_start(out / "student-init", "tiny-student", tokenizer, chat,
                                 steps=args.student_sft_steps, lr=settings.student_lr, noise=settings.student_noise,
                                 batch=settings.sft_batch, seed=args.seed + 1, rebuild=args.rebuild,
                                 label="student")
    teacher.requires_grad_(False)
    rollout_settings = RolloutSettings(max_turns=settings.max_turns, max_new_tokens=settings.max_new_tokens,
                                       max_total_tokens=settings.max_total_tokens)
    source = ProblemSource(args.seed)
    held_out = [source.held_out(i) for i in range(args.eval_problems)]
    eval_faults = FaultInjector(args.eval_fault_rate, args.seed + 7)

    def held_out_eval(policy, faults=None):
        return evaluate(policy, teacher, tokenizer, chat, executor, held_out, rollout_settings, faults=faults)

    print("evaluating teacher and warm-started student on held-out problems ...")
    teacher_eval = held_out_eval(teacher)
    before = held_out_eval(student_init)
    before_faulted = held_out_eval(student_init, eval_faults)
    print(f"teacher accuracy {teacher_eval.accuracy:.3f}; student accuracy {before.accuracy:.3f}, "
          f"KL {before.kl:.4f}")

    results, histories, evaluations, profiles = {}, {}, {}, {"student before": _profile(before_faulted)}
    for name in args.variants:
        config = TrainConfig(student=str(out / "student-init"), teacher=str(out / "teacher"), objective="kl",
                             step_divergence=VARIANTS[name], updates=args.updates,
                             prompts_per_step=args.prompts_per_step, rollouts_per_prompt=args.rollouts_per_prompt,
                             micro_batch_size=args.prompts_per_step * args.rollouts_per_prompt,
                             max_turns=settings.max_turns, max_new_tokens=settings.max_new_tokens,
                             max_total_tokens=settings.max_total_tokens, lr=settings.lr,
                             temperature=settings.temperature, warmup_updates=settings.warmup_updates,
                             tool_fault_rate=args.tool_fault_rate, seed=args.seed, output_dir=str(out / name),
                             checkpoint_every=max(args.updates, 1), threads=args.threads,
                             sandbox_allow_missing=tuple(args.sandbox_allow_missing))
        student = copy.deepcopy(student_init)
        trainer = SODTrainer(config, student, teacher, tokenizer, executor, problems=source)
        bar = tqdm(total=args.updates, desc=f"{name} distillation")

        def progress(metrics, bar=bar):
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.3f}")
            tqdm.write(f"[{name}] " + format_metrics(metrics))

        start = time.perf_counter()
        history = trainer.train(progress)
        bar.close()
        elapsed = time.perf_counter() - start
        after = held_out_eval(student)
        after_faulted = held_out_eval(student, eval_faults)
        histories[name] = history
        evaluations[name] = [(0, before.accuracy, before.kl), (args.updates, after.accuracy, after.kl)]
        profiles[f"{name} after"] = _profile(after_faulted)
        results[name] = {"student_accuracy_before": before.accuracy, "student_kl_before": before.kl,
                         "student_accuracy_after": after.accuracy, "student_kl_after": after.kl,
                         "train_seconds": elapsed,
                         "faulted_accuracy_before": before_faulted.accuracy,
                         "faulted_accuracy_after": after_faulted.accuracy}

    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_step_profiles(profiles, plots / "step_profile.png",
                       f"held-out rollouts with tool fault rate {args.eval_fault_rate}")
    plot_training(histories, evaluations, plots / "training.png")
    summary = {"teacher_accuracy": teacher_eval.accuracy, "eval_problems": len(held_out), "seed": args.seed,
               "variants": results, "wall_seconds": time.perf_counter() - wall_start,
               "plots": [str(plots / "step_profile.png"), str(plots / "training.png")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    """The final table: teacher accuracy, then student accuracy / KL before and after per objective."""
    names = list(summary["variants"])
    rows = [("teacher accuracy", [summary["teacher_accuracy"]] * len(names)),
            ("student accuracy before", [summary["variants"][n]["student_accuracy_before"] for n in names]),
            ("student accuracy after", [summary["variants"][n]["student_accuracy_after"] for n in names]),
            ("student-teacher KL before", [summary["variants"][n]["student_kl_before"] for n in names]),
            ("student-teacher KL after", [summary["variants"][n]["student_kl_after"] for n in names]),
            ("accuracy with faults before", [summary["variants"][n]["faulted_accuracy_before"] for n in names]),
            ("accuracy with faults after", [summary["variants"][n]["faulted_accuracy_after"] for n in names]),
            ("distillation seconds", [summary["variants"][n]["train_seconds"] for n in names])]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'held-out (' + str(summary['eval_problems']) + ' problems)':<{width}}" +
          "".join(f"{n.upper():>12}" for n in names))
    for label, values in rows:
        print(f"{label:<{width}}" + "".join(f"{v:>12.4f}" if "seconds" not in label else f"{v:>12.0f}"
                                             for v in values))
    print(f"\nwall time {summary['wall_seconds']:.0f}s; plots: {', '.join(summary['plots'])}")
