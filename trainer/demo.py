"""The embedded demo: everything from scratch on CPU, no network, no downloaded weights, several seeds.

1. Build the task tokenizer in code; print the machine (CPU model, cores, torch version).
2. Train a tiny Qwen3-architecture teacher by supervised learning on programmatic tool-using solutions
   (cached in the output folder: a rerun with the same settings loads it).  One teacher serves every seed.
3. Per seed: warm-start a smaller student more weakly (noisy solutions), also cached; evaluate it on the
   held-out problems greedily and by sampling at the training temperature; run on-policy distillation
   (SOD step weights by default; ``--compare opd,sod`` also runs plain OPD from the same start); evaluate
   again.
4. Print the per-seed numbers and their mean, standard deviation and 95% interval over seeds; write PNG
   plots and ``summary.json``.

Greedy and sampled accuracy are both reported because they differ a lot for a tiny model: the training
reward is the accuracy of rollouts sampled at temperature 1 (full vocabulary), which a wrong digit anywhere
in a turn spoils, while greedy decoding takes the most likely token every time.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import TrainConfig
from .measure import MemoizedExecutor, describe_machine, format_summary, machine_description, summarize
from .models import build_preset, count_parameters, lm_head_weight
from .plots import plot_step_profiles, plot_training, step_profile
from .rollout import ChatFormat, RolloutSettings, ToolExecutor
from .sandbox import PROTECTIONS, unknown_protections
from .sft import solution_turns, supervised_train
from .task import ERROR_OBSERVATION, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Problem, ProblemSource, generate_problem
from .tokenizer import build_task_tokenizer
from .tools import demo_tool_executor
from .train import SODTrainer, collate, evaluate, format_metrics, model_hidden

# Objectives the demo can compare: name -> step_divergence ("none" is plain OPD).
VARIANTS = {"opd": "none", "sod": "kl"}
SFT_SEED_OFFSET = 1000
SFT_POOL = 3000
# The held-out problems are the same for every seed (the seeds vary models and sampling, not the test).
HELD_OUT_SEED = 0
# Fraction of the training updates whose step logs form the "early" / "late" step profiles.
PROFILE_FRACTION = 0.25


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (defaults: about 7 minutes on 2 shared CPU cores for 3 seeds, first run included)."""

    teacher_sft_steps: int = 600
    teacher_lr: float = 3e-3
    teacher_noise: float = 0.25  # slips in the teacher's data: contexts only (learn_noise=False)
    student_sft_steps: int = 600
    student_lr: float = 3e-3
    student_noise: float = 0.25  # slips the student learns to make
    student_max_calls: int = 2  # the student never sees a solution with more tool calls than this
    sft_batch: int = 32
    updates: int = 32
    prompts_per_step: int = 16
    rollouts_per_prompt: int = 2
    lr: float = 3e-4
    warmup_updates: int = 5
    temperature: float = 1.0
    max_turns: int = 5
    max_new_tokens: int = 24
    max_total_tokens: int = 400
    eval_problems: int = 200
    tool_fault_rate: float = 0.1


SFT_LOG_EVERY = 100  # without a terminal: one line every this many supervised steps instead of a bar


def on_terminal() -> bool:
    """Whether progress bars may be drawn: stdout and stderr are both terminals (not a log file or a pipe)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def progress_bar(total: int, desc: str) -> tqdm:
    """A tqdm bar on a terminal; elsewhere a disabled one (no carriage-return frames in a log file)."""
    return tqdm(total=total, desc=desc, leave=False, disable=not on_terminal())


def library_bars_off_terminal() -> None:
    """Off a terminal, also switch off the bars of Hugging Face libraries (``save_pretrained``'s, ...)."""
    if not on_terminal():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"{flag} must name at least one value, got {text!r}")
    return values


def parse_demo_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``python -m trainer demo``."""
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m trainer demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo", help="where models, logs and plots go")
    parser.add_argument("--compare", default="sod", help="comma-separated objectives among opd,sod")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds; each seeds a student warm-start, sampling and faults")
    parser.add_argument("--teacher-seed", type=int, default=0)
    parser.add_argument("--updates", type=int, default=defaults.updates, help="distillation updates")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="distillation learning rate")
    parser.add_argument("--teacher-sft-steps", type=int, default=defaults.teacher_sft_steps)
    parser.add_argument("--teacher-lr", type=float, default=defaults.teacher_lr)
    parser.add_argument("--teacher-noise", type=float, default=defaults.teacher_noise,
                        help="share of the teacher's tool calls with a slip it reads but is not trained to write")
    parser.add_argument("--student-sft-steps", type=int, default=defaults.student_sft_steps)
    parser.add_argument("--student-noise", type=float, default=defaults.student_noise,
                        help="share of the student's tool calls with a slip it is trained to write")
    parser.add_argument("--student-max-calls", type=int, default=defaults.student_max_calls,
                        help="longest reference solution (tool calls) the student sees; 0: no limit")
    parser.add_argument("--prompts-per-step", type=int, default=defaults.prompts_per_step)
    parser.add_argument("--rollouts-per-prompt", type=int, default=defaults.rollouts_per_prompt)
    parser.add_argument("--eval-problems", type=int, default=defaults.eval_problems)
    parser.add_argument("--tool-fault-rate", type=float, default=defaults.tool_fault_rate,
                        help="probability that a tool observation is corrupted during distillation")
    parser.add_argument("--sandbox-allow-missing", nargs="*", default=[], metavar="NAME",
                        help=f"sandbox protections the demo may run without, among: {', '.join(PROTECTIONS)}")
    parser.add_argument("--no-tool-memo", action="store_true",
                        help="run every tool call in the sandbox (default: a repeated pure-arithmetic print "
                             "replays the output of its first sandboxed run)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rebuild", action="store_true", help="retrain the cached teacher and students")
    args = parser.parse_args(argv)
    if unknown_protections(args.sandbox_allow_missing):
        parser.exit(2, f"{parser.prog}: error: {unknown_protections(args.sandbox_allow_missing)}\n")
    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise SystemExit(f"--compare must list objectives among {sorted(VARIANTS)}, got {args.compare!r}")
    args.variants = list(dict.fromkeys(names))
    args.seed_list = _int_list(args.seeds, "--seeds")
    for name in ("updates", "teacher_sft_steps", "student_sft_steps", "prompts_per_step", "rollouts_per_prompt",
                 "eval_problems", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("tool_fault_rate", "teacher_noise", "student_noise"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise SystemExit(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(args, name)}")
    if args.student_max_calls < 0:
        raise SystemExit(f"--student-max-calls must be >= 0 (0: no limit), got {args.student_max_calls}")
    if not args.teacher_lr > 0:
        raise SystemExit(f"--teacher-lr must be > 0, got {args.teacher_lr}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be > 0, got {args.lr}")
    return args


def sft_problems(seed: int, max_calls: int | None = None):
    """``SFT_POOL`` training problems of stream ``seed + SFT_SEED_OFFSET``, in order, keeping only those
    whose reference solution makes at most ``max_calls`` tool calls (``None``: all)."""
    if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
        raise ValueError(f"max_calls must be None or an int >= 1, got {max_calls!r}")
    problems, index = [], 0
    while len(problems) < SFT_POOL:
        problem = generate_problem(seed + SFT_SEED_OFFSET, index)
        index += 1
        if max_calls is None or len(problem.solution_code) <= max_calls:
            problems.append(problem)
    return problems


def noisy_turns(problem: Problem, turns: list[str], observations: list[str]) -> list[bool]:
    """Which of ``solution_turns``' assistant turns carry a corrupted operand (the answer turn never does).

    A noise-free turn k calls the reference code, with a leading operand that repeats the previous result
    replaced by the previous observation (what ``trainer.sft.solution_turns`` does); any other text is noise.
    """
    flags, previous_true, previous_seen = [], None, None
    for k, (code, output) in enumerate(zip(problem.solution_code, problem.tool_outputs)):
        left = re.fullmatch(r"print\((-?\d+)(.*)\)", code)
        if previous_true is not None and left is not None and left.group(1) == previous_true:
            code = f"print({previous_seen}{left.group(2)})"
        flags.append(turns[k] != f"{TOOL_CALL_OPEN}{code}{TOOL_CALL_CLOSE}")
        previous_true, previous_seen = output, observations[k]
    return flags + [False] * (len(turns) - len(flags))


def conversation(chat: ChatFormat, question: str, turns: list[str], observations: list[str],
                 trained: list[bool]) -> tuple[list[int], list[int]]:
    """``chat.conversation`` with the response mask zeroed on the turns where ``trained`` is False."""
    ids = chat.prompt_ids(question)
    mask = [0] * len(ids)
    for k, content in enumerate(turns):
        turn = chat.assistant_turn_ids(content)
        ids += turn
        mask += [int(trained[k])] * len(turn)
        if k < len(observations):
            tail = chat.tool_turn_ids(observations[k], last_token=turn[-1])
            ids += tail
            mask += [0] * len(tail)
    return ids, mask


def warm_start_examples(chat: ChatFormat, seed: int, noise: float, retry_fraction: float = 0.0,
                        max_calls: int | None = None, learn_noise: bool = True):
    """Tokenized supervised solutions of :func:`sft_problems` ``(seed, max_calls)``.

    ``noise``: per tool call, probability of one wrong operand digit (``trainer.sft``); the rest of the
    solution follows what the wrong call printed.  ``learn_noise=False`` keeps those contexts but takes the
    corrupted turns out of the loss: the model learns to continue sensibly from a slip without learning to
    make it (how the demo's teacher is trained, so that its advice on the student's own slips is sound).
    ``retry_fraction``: probability that a solution's first tool call fails (observation
    :data:`trainer.task.ERROR_OBSERVATION`) and the next turn repeats it.  Returns ``[(ids, response_mask)]``.
    """
    if not 0.0 <= retry_fraction <= 1.0:
        raise ValueError(f"retry_fraction must lie in [0, 1], got {retry_fraction}")
    rng = random.Random(seed)
    examples = []
    for problem in sft_problems(seed, max_calls):
        turns, observations = solution_turns(problem, noise, rng)
        trained = [True] * len(turns) if learn_noise else [not f for f in noisy_turns(problem, turns, observations)]
        if retry_fraction > 0 and rng.random() < retry_fraction:
            turns = [turns[0], *turns]
            observations = [ERROR_OBSERVATION, *observations]
            trained = [trained[0], *trained]
        examples.append(conversation(chat, problem.question, turns, observations, trained))
    return examples


def warm_start(folder: Path, preset: str, tokenizer, chat: ChatFormat, *, steps: int, lr: float, noise: float,
               batch: int, seed: int, rebuild: bool, label: str, retry_fraction: float = 0.0,
               max_calls: int | None = None, learn_noise: bool = True):
    """Load the cached model in ``folder`` if it was trained with these settings, else train and save it.

    Returns ``(model in eval mode, seconds spent training)`` (0 when loaded).
    """
    recipe = {"preset": preset, "steps": steps, "lr": lr, "noise": noise, "batch": batch, "seed": seed,
              "vocab": len(tokenizer), "retry_fraction": retry_fraction, "max_calls": max_calls,
              "learn_noise": learn_noise,
              "pool": SFT_POOL}
    marker = folder / "sft.json"
    if not rebuild and marker.is_file() and json.loads(marker.read_text()) == recipe:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        print(f"{label}: loaded cached warm-start from {folder}")
        return model.eval(), 0.0
    examples = warm_start_examples(chat, seed, noise, retry_fraction, max_calls, learn_noise)
    model = build_preset(preset, tokenizer, seed=seed)
    start = time.perf_counter()
    desc = f"{label} SFT ({count_parameters(model) / 1e6:.2f}M params)"
    bar = progress_bar(total=steps, desc=desc)
    done = [0]

    def progress(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        done[0] += 1
        if bar.disable and done[0] % SFT_LOG_EVERY == 0:
            print(f"{desc}: step {done[0]}/{steps}, loss {loss:.3f}", flush=True)

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


def held_out_problems(count: int):
    """The first ``count`` held-out problems of the built-in task (the same for every seed)."""
    source = ProblemSource(HELD_OUT_SEED)
    return [source.held_out(i) for i in range(count)]


def training_profiles(steps_file: Path, updates: int) -> dict[str, dict]:
    """:func:`trainer.plots.step_profile` of the first and the last ``PROFILE_FRACTION`` of the updates."""
    records = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    span = max(1, round(updates * PROFILE_FRACTION))
    parts = {"early": [r for r in records if r["update"] < span],
             "late": [r for r in records if r["update"] >= updates - span]}
    return {name: step_profile([r["d"] for r in rs], [r["w"] for r in rs], [r["fault_after_step"] for r in rs])
            for name, rs in parts.items()}


@torch.no_grad()
def off_path_share(policy, teacher, pad_id: int, trajectories, micro_batch_size: int = 32) -> dict:
    """Where the reverse KL(policy || teacher) of ``trajectories`` sits.

    A generated token is *off the teacher's path* once an earlier generated token of its rollout differs from
    the teacher's greedy choice there (the policy slipped, and the teacher now advises on a state it would
    never have reached).  Returns the share of the summed per-token KL and of the tokens that are off the
    path, and the mean KL per token on and off it.  Materializes the logits: meant for the demo's tiny models.
    """
    sums = {"kl_on": 0.0, "kl_off": 0.0, "tokens_on": 0, "tokens_off": 0}
    weight_p, weight_t = lm_head_weight(policy), lm_head_weight(teacher)
    for i in range(0, len(trajectories), micro_batch_size):
        batch = collate(trajectories[i:i + micro_batch_size], pad_id)
        logp = torch.log_softmax(model_hidden(policy, batch) @ weight_p.T, dim=-1)
        logt = torch.log_softmax(model_hidden(teacher, batch) @ weight_t[:weight_p.shape[0]].T, dim=-1)
        kl = (logp.exp() * (logp - logt)).sum(-1).clamp_min(0)
        mask = batch.response_mask.bool()
        slipped = mask & (logt.argmax(-1) != batch.target_ids)
        # Off the path: some earlier generated token of the row was a slip.
        off = (torch.cumsum(slipped.long(), dim=1) - slipped.long()) > 0
        on = mask & ~off
        off = mask & off
        sums["kl_on"] += float(kl[on].sum())
        sums["kl_off"] += float(kl[off].sum())
        sums["tokens_on"] += int(on.sum())
        sums["tokens_off"] += int(off.sum())
    total_kl, total_tokens = sums["kl_on"] + sums["kl_off"], sums["tokens_on"] + sums["tokens_off"]
    return {"kl_share_off_path": sums["kl_off"] / total_kl if total_kl > 0 else 0.0,
            "token_share_off_path": sums["tokens_off"] / max(total_tokens, 1),
            "kl_per_token_on_path": sums["kl_on"] / max(sums["tokens_on"], 1),
            "kl_per_token_off_path": sums["kl_off"] / max(sums["tokens_off"], 1)}


def _eval_pair(policy, teacher, tokenizer, chat, executor, problems, settings, temperature: float) -> dict:
    greedy = evaluate(policy, teacher, tokenizer, chat, executor, problems, settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)  # the same sampling stream for every policy and seed
        sampled = evaluate(policy, teacher, tokenizer, chat, executor, problems, settings, temperature=temperature)
    return {"greedy": greedy.accuracy, "sampled": sampled.accuracy, "kl": greedy.kl, "sampled_kl": sampled.kl,
            "sampled_off_path": off_path_share(policy, teacher, tokenizer.pad_token_id, sampled.trajectories),
            "greedy_by_calls": accuracy_by_calls(greedy.trajectories),
            "sampled_by_calls": accuracy_by_calls(sampled.trajectories),
            "greedy_per_problem": [t.reward for t in greedy.trajectories]}


def accuracy_by_calls(trajectories) -> dict[str, float]:
    """Accuracy per number of tool calls the problem's reference solution needs (``{"1": acc, ...}``)."""
    groups: dict[int, list[float]] = {}
    for t in trajectories:
        groups.setdefault(len(t.problem.solution_code), []).append(t.reward)
    return {str(k): sum(v) / len(v) for k, v in sorted(groups.items())}


def run_demo(argv: list[str] | None = None, executor: ToolExecutor | None = None) -> dict:
    """Run the demo; returns the summary dictionary (also written to ``summary.json``).

    ``executor`` replaces the sandboxed Python tool (tests pass an in-process double); by default every tool
    call goes through :func:`trainer.tools.sandbox_executor`, wrapped in :class:`MemoizedExecutor`.
    """
    args = parse_demo_args(argv)
    library_bars_off_terminal()
    s = DemoSettings()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()
    machine = machine_description()
    print(f"machine: {describe_machine(machine)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    executor = demo_tool_executor(executor, allow_missing=args.sandbox_allow_missing, memoize=not args.no_tool_memo)
    tokenizer = build_task_tokenizer()
    chat = ChatFormat(tokenizer)
    teacher, _ = warm_start(out / "teacher", "tiny-teacher", tokenizer, chat, steps=args.teacher_sft_steps,
                            lr=args.teacher_lr, noise=args.teacher_noise, batch=s.sft_batch, seed=args.teacher_seed,
                            rebuild=args.rebuild, label="teacher", learn_noise=False)
    teacher.requires_grad_(False)
    settings = RolloutSettings(max_turns=s.max_turns, max_new_tokens=s.max_new_tokens,
                               max_total_tokens=s.max_total_tokens)
    held_out = held_out_problems(args.eval_problems)

    def held_out_eval(policy):
        return _eval_pair(policy, teacher, tokenizer, chat, executor, held_out, settings, s.temperature)

    print(f"evaluating the teacher on {len(held_out)} held-out problems ...")
    teacher_eval = held_out_eval(teacher)
    print(f"teacher accuracy: greedy {teacher_eval['greedy']:.3f}, sampled at T={s.temperature:g} "
          f"{teacher_eval['sampled']:.3f}")
    per_seed, histories, profiles = {}, {n: [] for n in args.variants}, {}
    for seed in args.seed_list:
        student_init, _ = warm_start(out / f"student-init-s{seed}", "tiny-student", tokenizer, chat,
                                     steps=args.student_sft_steps, lr=s.student_lr, noise=args.student_noise,
                                     batch=s.sft_batch, seed=seed + 1, rebuild=args.rebuild,
                                     label=f"student (seed {seed})", max_calls=args.student_max_calls or None)
        before = held_out_eval(student_init)
        print(f"[seed {seed}] student before: greedy {before['greedy']:.3f}, sampled {before['sampled']:.3f}, "
              f"KL {before['kl']:.3f}")
        record = {"before": before}
        for name in args.variants:
            config = TrainConfig(objective="kl", step_divergence=VARIANTS[name], updates=args.updates,
                                 prompts_per_step=args.prompts_per_step, rollouts_per_prompt=args.rollouts_per_prompt,
                                 micro_batch_size=args.prompts_per_step * args.rollouts_per_prompt,
                                 max_turns=s.max_turns, max_new_tokens=s.max_new_tokens,
                                 max_total_tokens=s.max_total_tokens, lr=args.lr, temperature=s.temperature,
                                 warmup_updates=s.warmup_updates, tool_fault_rate=args.tool_fault_rate,
                                 seed=seed, output_dir=str(out / f"{name}-s{seed}"),
                                 checkpoint_every=args.updates, threads=args.threads,
                                 sandbox_allow_missing=tuple(args.sandbox_allow_missing))
            student = copy.deepcopy(student_init)
            trainer = SODTrainer(config, student, teacher, tokenizer, executor, problems=ProblemSource(seed),
                                 log=tqdm.write)
            bar = progress_bar(total=args.updates, desc=f"seed {seed} {name} distillation")

            def progress(metrics, bar=bar, name=name):
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{metrics['kl']:.3f}")
                if (metrics["update"] + 1) % 10 == 0:
                    tqdm.write(f"[seed {seed} {name}] " + format_metrics(metrics))

            start = time.perf_counter()
            history = trainer.train(progress)
            bar.close()
            elapsed = time.perf_counter() - start
            after = held_out_eval(student)
            histories[name].append(history)
            profiles.setdefault(name, []).append(training_profiles(Path(config.output_dir) / "steps.jsonl",
                                                                   args.updates))
            record[name] = {"after": after, "train_seconds": elapsed,
                            "train_reward_first5": sum(m["reward"] for m in history[:5]) / min(5, len(history)),
                            "train_reward_last5": sum(m["reward"] for m in history[-5:]) / min(5, len(history))}
            print(f"[seed {seed}] after {name.upper()} ({elapsed:.0f}s): greedy {after['greedy']:.3f}, "
                  f"sampled {after['sampled']:.3f}, KL {after['kl']:.3f}")
        per_seed[str(seed)] = record
    summary = {"machine": machine, "settings": {**asdict(s), **{k: v for k, v in vars(args).items()}},
               "teacher": {k: v for k, v in teacher_eval.items() if k != "greedy_per_problem"},
               "eval_problems": len(held_out), "seeds": args.seed_list, "variants": args.variants,
               "per_seed": per_seed, "aggregate": aggregate(per_seed, args.variants)}
    if isinstance(executor, MemoizedExecutor):
        summary["tool_calls"] = {"calls": executor.calls, "sandbox_runs": executor.sandbox_runs}
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    machine_line = f"{len(args.seed_list)} seeds, {len(held_out)} held-out problems\n{describe_machine(machine)}"
    held = {name: {f"{kind} {when}": summary["aggregate"][name][f"{kind} {when}"]
                   for kind in ("greedy", "sampled", "kl") for when in ("before", "after")} for name in args.variants}
    plot_training(histories, held, plots / "training.png", machine_line)
    plot_step_profiles({f"{name.upper()} {part}": [p[part] for p in profiles[name]] for name in args.variants
                        for part in ("early", "late")}, plots / "step_profile.png",
                       f"training rollouts (tool fault rate {args.tool_fault_rate}), first and last "
                       f"{PROFILE_FRACTION:.0%} of the updates, bands: min-max over seeds; {machine_line}")
    summary["plots"] = [str(plots / "training.png"), str(plots / "step_profile.png")]
    summary["wall_seconds"] = time.perf_counter() - wall_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    return summary


def aggregate(per_seed: dict, variants: list[str]) -> dict:
    """Per objective: :func:`trainer.measure.summarize` over seeds of each before / after / change number."""
    result = {}
    for name in variants:
        rows = {}
        for kind in ("greedy", "sampled", "kl"):
            before = [r["before"][kind] for r in per_seed.values()]
            after = [r[name]["after"][kind] for r in per_seed.values()]
            rows[f"{kind} before"] = summarize(before)
            rows[f"{kind} after"] = summarize(after)
            rows[f"{kind} change"] = summarize([a - b for a, b in zip(after, before)])
        longest = max((int(k) for r in per_seed.values() for k in r["before"]["greedy_by_calls"]), default=0)
        if longest:
            key = str(longest)
            before = [r["before"]["greedy_by_calls"].get(key) for r in per_seed.values()]
            after = [r[name]["after"]["greedy_by_calls"].get(key) for r in per_seed.values()]
            if None not in before and None not in after:
                rows["greedy longest before"] = summarize(before)
                rows["greedy longest after"] = summarize(after)
                rows["longest calls"] = longest
        for key in ("train_reward_first5", "train_reward_last5"):
            rows[key] = summarize([r[name][key] for r in per_seed.values()])
        rows["off path before"] = summarize([r["before"]["sampled_off_path"]["kl_share_off_path"]
                                             for r in per_seed.values()])
        rows["off path after"] = summarize([r[name]["after"]["sampled_off_path"]["kl_share_off_path"]
                                            for r in per_seed.values()])
        rows["off path tokens before"] = summarize([r["before"]["sampled_off_path"]["token_share_off_path"]
                                                    for r in per_seed.values()])
        result[name] = rows
    return result


ROWS = (("greedy before", "held-out accuracy, greedy, before"),
        ("greedy after", "held-out accuracy, greedy, after"),
        ("greedy change", "  change"),
        ("greedy longest before", "  on problems needing {calls} tool calls, before"),
        ("greedy longest after", "  on problems needing {calls} tool calls, after"),
        ("sampled before", "held-out accuracy, sampled T=1, before"),
        ("sampled after", "held-out accuracy, sampled T=1, after"),
        ("sampled change", "  change"),
        ("train_reward_first5", "training reward (sampled T=1), first 5 updates"),
        ("train_reward_last5", "training reward (sampled T=1), last 5 updates"),
        ("kl before", "student-teacher KL per token, before"),
        ("kl after", "student-teacher KL per token, after"),
        ("off path tokens before", "sampled tokens after the student's first slip, before"),
        ("off path before", "  their share of the sampled KL, before"),
        ("off path after", "  their share of the sampled KL, after"))


def print_summary(summary: dict) -> None:
    """Per-seed table, then mean ± std [95% t-interval] over seeds, the machine and the wall time."""
    seeds = [str(s) for s in summary["seeds"]]
    teacher = summary["teacher"]
    print(f"\nteacher: held-out accuracy greedy {teacher['greedy']:.3f}, sampled {teacher['sampled']:.3f}")
    for name in summary["variants"]:
        rows = summary["aggregate"][name]
        width = max(len(label) for _, label in ROWS) + 2
        title = f"{name.upper()}, {summary['eval_problems']} held-out problems"
        print(f"\n{title:<{width}}" + "".join(f"{'seed ' + s:>10}" for s in seeds) + "   mean ± std [95% CI]")
        for key, label in ROWS:
            if key not in rows:
                continue
            if key.startswith("greedy longest"):
                label = label.format(calls=rows["longest calls"])
            values = rows[key]["values"]
            print(f"{label:<{width}}" + "".join(f"{v:>10.3f}" for v in values) + "   " + format_summary(rows[key]))
    print("\ngreedy vs sampled: the training reward is the accuracy of rollouts sampled at T=1 (one wrong digit "
          "spoils a rollout);\ngreedy decoding takes the most likely token, hence the gap between the training "
          "reward and greedy held-out accuracy.\na slip is a generated token the teacher would not have chosen "
          "greedily; after it the teacher advises on a state it\nwould never reach (the KL rows are on greedy "
          "rollouts, the slip rows on the sampled ones).")
    print(f"machine: {describe_machine(summary['machine'])}")
    if "tool_calls" in summary:
        calls = summary["tool_calls"]
        print(f"tool calls: {calls['calls']}, run in the sandbox: {calls['sandbox_runs']} (the rest replayed "
              f"repeated arithmetic prints)")
    print(f"wall time {summary['wall_seconds']:.0f}s; plots: {', '.join(summary['plots'])}")
