"""A controlled tool-fault experiment: plain OPD against SOD where the teacher's advice after a fault misleads.

SOD's premise: after a tool fault the teacher, conditioned on an observation it cannot make sense of, pushes
the student confidently in a wrong direction, and the step divergence d_k jumps there; SOD's weight
w_k = min(d_1 / d_k, 1 + delta) then shrinks that advice.  This experiment builds that situation on purpose
and measures each link, for OPD (``step_divergence="none"``) and SOD (``"kl"``) from the same start, per seed:

- teacher: the demo's (supervised on tool-using solutions; it has never seen a tool fail).
- student: supervised on the same kind of solutions, but the first tool call of ``retry_fraction`` of them
  fails visibly (the observation is ``Error: result lost``) and the solution calls the same code again.
  After a failed call the student retries (the right move: the retry's output is correct); the teacher,
  which never saw a failure, does something else.
- distillation: the first tool call of each training rollout fails with probability ``train_fault_rate``
  (``FaultInjector(kind="error", at_step=1)``); everything else as in the demo.
- measured: d_k and SOD's w_k at the step before the fault (k = 1), right after it (k = 2) and later
  (k >= 3), on held-out rollouts and in training, with clean rollouts as the control; the teacher's and the
  student's retry rate after the fault; greedy held-out accuracy with the fault on every rollout and
  without faults, before and after each objective.  Seeds are summarised by mean, standard deviation and a
  95% t-interval; ``experiment.json`` keeps every per-seed number and ``experiment.png`` plots them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import TrainConfig
from .demo import held_out_problems, library_bars_off_terminal, progress_bar, warm_start
from .measure import MemoizedExecutor, describe_machine, format_summary, machine_description, summarize
from .plots import plot_experiment
from .sandbox import PROTECTIONS, unknown_protections
from .rollout import ChatFormat, RolloutSettings, ToolExecutor, Trajectory
from .task import FaultInjector, ProblemSource, extract_tool_call
from .tokenizer import build_task_tokenizer
from .tools import demo_tool_executor
from .train import SODTrainer, evaluate

VARIANTS = {"opd": "none", "sod": "kl"}
FAULT_STEP = 1
# Position of a step relative to the fault after step FAULT_STEP (clean rollouts use the same step indices).
POSITIONS = ("before", "right after", "later")
# Fault-injection seed offset of held-out evaluations (training uses the run seed).
EVAL_FAULT_SEED = 7


@dataclass(frozen=True)
class ExperimentSettings:
    """Sizes of the experiment (defaults: about 8 minutes on 2 CPU cores for 3 seeds, first run included)."""

    teacher_sft_steps: int = 600
    teacher_lr: float = 3e-3
    teacher_noise: float = 0.25  # as in the demo: slips in the contexts only, never a failed tool call
    student_sft_steps: int = 600
    student_lr: float = 3e-3
    student_noise: float = 0.25
    retry_fraction: float = 0.3
    sft_batch: int = 32
    updates: int = 40
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 2
    lr: float = 3e-4
    warmup_updates: int = 5
    temperature: float = 1.0
    train_fault_rate: float = 0.5
    max_turns: int = 6
    max_new_tokens: int = 24
    max_total_tokens: int = 448
    eval_problems: int = 128


def parse_experiment_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``python -m trainer experiment``."""
    d = ExperimentSettings()
    parser = argparse.ArgumentParser(prog="python -m trainer experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/experiment", help="where models, logs and the figure go")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (student, sampling, faults)")
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=d.updates)
    parser.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    parser.add_argument("--teacher-sft-steps", type=int, default=d.teacher_sft_steps)
    parser.add_argument("--student-sft-steps", type=int, default=d.student_sft_steps)
    parser.add_argument("--retry-fraction", type=float, default=d.retry_fraction,
                        help="share of the student's supervised solutions whose first call fails and is retried")
    parser.add_argument("--train-fault-rate", type=float, default=d.train_fault_rate,
                        help="probability that a training rollout's first tool call fails")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--eval-problems", type=int, default=d.eval_problems)
    parser.add_argument("--sandbox-allow-missing", nargs="*", default=[], metavar="NAME",
                        help=f"sandbox protections the run may do without, among: {', '.join(PROTECTIONS)}")
    parser.add_argument("--no-tool-memo", action="store_true",
                        help="run every tool call in the sandbox (default: replay repeated arithmetic prints)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rebuild", action="store_true", help="retrain the cached teacher and students")
    parser.add_argument("--report", action="store_true",
                        help="only recompute the table and figure from OUTPUT_DIR/experiment.json (no training)")
    args = parser.parse_args(argv)
    if unknown_protections(args.sandbox_allow_missing):
        parser.exit(2, f"{parser.prog}: error: {unknown_protections(args.sandbox_allow_missing)}\n")
    try:
        args.seed_list = list(dict.fromkeys(int(s) for s in args.seeds.split(",") if s.strip()))
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seed_list:
        parser.error("--seeds must name at least one seed")
    for name in ("updates", "prompts_per_step", "eval_problems", "teacher_sft_steps", "student_sft_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("retry_fraction", "train_fault_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    return args


def retried(trajectory: Trajectory) -> bool:
    """Whether the turn after the faulted tool call repeats that call's code (a retry)."""
    if FAULT_STEP not in trajectory.fault_after_step or len(trajectory.assistant_texts) <= FAULT_STEP:
        return False
    failed = extract_tool_call(trajectory.assistant_texts[FAULT_STEP - 1])
    return failed is not None and extract_tool_call(trajectory.assistant_texts[FAULT_STEP]) == failed


def position_of(step: int) -> str:
    """``before`` (k <= fault step), ``right after`` (k = fault step + 1) or ``later``; k is 1-based."""
    if step <= FAULT_STEP:
        return POSITIONS[0]
    return POSITIONS[1] if step == FAULT_STEP + 1 else POSITIONS[2]


def position_means(divergences, weights, faulted: list[bool]) -> dict:
    """Mean d_k and w_k per position, split into faulted and clean rollouts.

    Returns ``{"faulted" | "clean": {position: {"d": mean, "w": mean, "steps": count}}}`` (positions with
    no step are left out).
    """
    sums = {kind: {p: [0.0, 0.0, 0] for p in POSITIONS} for kind in ("faulted", "clean")}
    for d, w, is_faulted in zip(divergences, weights, faulted):
        kind = "faulted" if is_faulted else "clean"
        for k, (dk, wk) in enumerate(zip(d, w), start=1):
            entry = sums[kind][position_of(k)]
            entry[0] += dk
            entry[1] += wk
            entry[2] += 1
    return {kind: {p: {"d": s[0] / s[2], "w": s[1] / s[2], "steps": s[2]} for p, s in table.items() if s[2]}
            for kind, table in sums.items()}


def rollout_summary(trajectories: list[Trajectory]) -> dict:
    """Per-rollout-batch counts: faulted rollouts, their retries and rewards, clean rewards."""
    faulted = [t for t in trajectories if FAULT_STEP in t.fault_after_step]
    clean = [t for t in trajectories if not t.fault_after_step]
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return {"faulted": len(faulted), "retry_rate": mean([float(retried(t)) for t in faulted]),
            "faulted_reward": mean([t.reward for t in faulted]), "clean_reward": mean([t.reward for t in clean])}


class RecordingTrainer(SODTrainer):
    """An :class:`SODTrainer` that keeps :func:`rollout_summary` of every update's rollouts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rollout_log: list[dict] = []

    def rollout(self, update: int) -> list[Trajectory]:
        trajectories = super().rollout(update)
        self.rollout_log.append({"update": update, **rollout_summary(trajectories)})
        return trajectories


def training_positions(steps_file: Path) -> dict:
    """:func:`position_means` over the per-sample step logs of a whole run (``steps.jsonl``)."""
    records = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    return position_means([r["d"] for r in records], [r["w"] for r in records],
                          [FAULT_STEP in r["fault_after_step"] for r in records])


def _eval_record(result) -> dict:
    faulted = [FAULT_STEP in t.fault_after_step for t in result.trajectories]
    summary = rollout_summary(result.trajectories)
    return {"accuracy": result.accuracy, "kl": result.kl, "retry_rate": summary["retry_rate"],
            "faulted_rollouts": summary["faulted"],
            "positions": position_means(result.step_divergence, result.step_weights, faulted)}


def run_experiment(argv: list[str] | None = None, executor: ToolExecutor | None = None) -> dict:
    """Run the experiment; returns the summary (also written to ``experiment.json``).

    ``executor`` replaces the sandboxed Python tool (tests pass an in-process double).
    """
    args = parse_experiment_args(argv)
    if args.report:
        return report(args.output_dir)
    library_bars_off_terminal()
    s = ExperimentSettings()
    torch.set_num_threads(args.threads)
    machine = machine_description()
    print(f"machine: {describe_machine(machine)}")
    wall_start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    executor = demo_tool_executor(executor, allow_missing=args.sandbox_allow_missing, memoize=not args.no_tool_memo)
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    teacher, _ = warm_start(out / "teacher", "tiny-teacher", tokenizer, chat, steps=args.teacher_sft_steps,
                            lr=s.teacher_lr, noise=s.teacher_noise, batch=s.sft_batch, seed=args.teacher_seed,
                            rebuild=args.rebuild, label="teacher", learn_noise=False)
    teacher.requires_grad_(False)
    settings = RolloutSettings(max_turns=s.max_turns, max_new_tokens=s.max_new_tokens,
                               max_total_tokens=s.max_total_tokens)
    held_out = held_out_problems(args.eval_problems)

    def held_out_eval(policy, seed: int, faulted: bool) -> dict:
        faults = FaultInjector(1.0, seed + EVAL_FAULT_SEED, kind="error", at_step=FAULT_STEP) if faulted else None
        return _eval_record(evaluate(policy, teacher, tokenizer, chat, executor, held_out, settings, faults=faults))

    print("evaluating the teacher with and without a failed first tool call ...")
    teacher_record = {"clean": held_out_eval(teacher, args.teacher_seed, False),
                      "faulted": held_out_eval(teacher, args.teacher_seed, True)}
    print(f"teacher accuracy {teacher_record['clean']['accuracy']:.3f} without faults, "
          f"{teacher_record['faulted']['accuracy']:.3f} when its first call fails "
          f"(retries {teacher_record['faulted']['retry_rate'] or 0:.2f} of those)")
    seeds = {}
    for seed in args.seed_list:
        student_init, _ = warm_start(out / f"student-init-s{seed}", "tiny-student", tokenizer, chat,
                                     steps=args.student_sft_steps, lr=s.student_lr, noise=s.student_noise,
                                     batch=s.sft_batch, seed=seed + 1, rebuild=args.rebuild,
                                     label=f"student (seed {seed})", retry_fraction=args.retry_fraction)
        record = {"before": {"clean": held_out_eval(student_init, seed, False),
                             "faulted": held_out_eval(student_init, seed, True)}}
        print(f"[seed {seed}] student before: accuracy {record['before']['clean']['accuracy']:.3f} clean, "
              f"{record['before']['faulted']['accuracy']:.3f} with the fault "
              f"(retries {record['before']['faulted']['retry_rate'] or 0:.2f})")
        for name, step_divergence in VARIANTS.items():
            config = TrainConfig(objective="kl", step_divergence=step_divergence, updates=args.updates,
                                 prompts_per_step=args.prompts_per_step, rollouts_per_prompt=s.rollouts_per_prompt,
                                 micro_batch_size=args.prompts_per_step * s.rollouts_per_prompt,
                                 max_turns=s.max_turns, max_new_tokens=s.max_new_tokens,
                                 max_total_tokens=s.max_total_tokens, lr=args.lr, temperature=s.temperature,
                                 warmup_updates=s.warmup_updates, tool_fault_rate=args.train_fault_rate,
                                 seed=seed, output_dir=str(out / f"{name}-s{seed}"),
                                 checkpoint_every=args.updates, threads=args.threads,
                                 sandbox_allow_missing=tuple(args.sandbox_allow_missing))
            student = copy.deepcopy(student_init)
            trainer = RecordingTrainer(config, student, teacher, tokenizer, executor,
                                       problems=ProblemSource(seed), log=tqdm.write)
            trainer.faults = FaultInjector(args.train_fault_rate, seed, kind="error", at_step=FAULT_STEP)
            bar = progress_bar(total=args.updates, desc=f"seed {seed} {name}")
            start = time.perf_counter()
            history = trainer.train(lambda metrics, bar=bar: bar.update(1))
            bar.close()
            elapsed = time.perf_counter() - start
            record[name] = {"clean": held_out_eval(student, seed, False),
                            "faulted": held_out_eval(student, seed, True),
                            "train_seconds": elapsed, "train_rollouts": trainer.rollout_log,
                            "train_positions": training_positions(Path(config.output_dir) / "steps.jsonl"),
                            "train_kl": [m["kl"] for m in history]}
            print(f"[seed {seed}] after {name.upper()} ({elapsed:.0f}s): accuracy "
                  f"{record[name]['clean']['accuracy']:.3f} clean, {record[name]['faulted']['accuracy']:.3f} "
                  f"with the fault (retries {record[name]['faulted']['retry_rate'] or 0:.2f})")
        seeds[str(seed)] = record
    summary = {"machine": machine, "settings": {**asdict(s), **{k: v for k, v in vars(args).items()}},
               "teacher": teacher_record, "seeds": seeds, "aggregate": aggregate(seeds),
               "wall_seconds": time.perf_counter() - wall_start}
    if isinstance(executor, MemoizedExecutor):
        summary["tool_calls"] = {"calls": executor.calls, "sandbox_runs": executor.sandbox_runs}
    figure = plot_experiment(summary, out / "experiment.png", POSITIONS, list(VARIANTS))
    summary["figure"] = str(figure)
    (out / "experiment.json").write_text(json.dumps(summary, indent=2))
    print_experiment(summary)
    return summary


def aggregate(seeds: dict) -> dict:
    """Mean / std / 95% CI over seeds of every number the table shows."""
    rows = {}

    def add(label, values):
        values = [v for v in values if v is not None]
        if values:
            rows[label] = summarize(values)

    records = list(seeds.values())
    for stage in ("before", *VARIANTS):
        for kind in ("clean", "faulted"):
            add(f"{stage} accuracy {kind}", [r[stage][kind]["accuracy"] for r in records])
        add(f"{stage} retry rate", [r[stage]["faulted"]["retry_rate"] for r in records])
    for name in VARIANTS:
        for kind in ("clean", "faulted"):
            add(f"{name} accuracy gain {kind}",
                [r[name][kind]["accuracy"] - r["before"][kind]["accuracy"] for r in records])
    for kind in ("clean", "faulted"):
        add(f"sod minus opd accuracy {kind}", [r["sod"][kind]["accuracy"] - r["opd"][kind]["accuracy"]
                                               for r in records])
    add("sod minus opd retry rate", [None if r["sod"]["faulted"]["retry_rate"] is None
                                     or r["opd"]["faulted"]["retry_rate"] is None
                                     else r["sod"]["faulted"]["retry_rate"] - r["opd"]["faulted"]["retry_rate"]
                                     for r in records])
    for kind in ("faulted", "clean"):
        for position in POSITIONS:
            # Held-out rollouts of the starting student: the faulted evaluation fails every first call, the
            # clean one none, so each kind comes from its own evaluation.
            add(f"d {position} ({kind}, held-out, before)",
                [r["before"][kind]["positions"].get(kind, {}).get(position, {}).get("d") for r in records])
            add(f"w {position} ({kind}, held-out, before)",
                [r["before"][kind]["positions"].get(kind, {}).get(position, {}).get("w") for r in records])
            add(f"w {position} ({kind}, SOD training)",
                [r["sod"]["train_positions"].get(kind, {}).get(position, {}).get("w") for r in records])
    return rows


def report(output_dir: str | Path) -> dict:
    """Recompute the aggregate, the figure and the table from a finished run's ``experiment.json``."""
    path = Path(output_dir) / "experiment.json"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; run the experiment first")
    summary = json.loads(path.read_text())
    summary["aggregate"] = aggregate(summary["seeds"])
    summary["figure"] = str(plot_experiment(summary, Path(output_dir) / "experiment.png", POSITIONS,
                                                list(VARIANTS)))
    path.write_text(json.dumps(summary, indent=2))
    print_experiment(summary)
    return summary


def print_experiment(summary: dict) -> None:
    """The experiment's table: mean ± std [95% CI] over seeds."""
    rows = summary["aggregate"]
    n = len(summary["seeds"])
    width = max(len(label) for label in rows) + 2
    print(f"\nfault experiment, {n} seed(s) {', '.join(summary['seeds'])}: mean ± std [95% t-interval]")
    for label, stats in rows.items():
        print(f"{label:<{width}}{format_summary(stats)}")
    print(f"\nteacher accuracy {summary['teacher']['clean']['accuracy']:.3f} clean, "
          f"{summary['teacher']['faulted']['accuracy']:.3f} after a failed first call; "
          f"wall time {summary['wall_seconds']:.0f}s on {describe_machine(summary['machine'])}; "
          f"figure {summary['figure']}")
