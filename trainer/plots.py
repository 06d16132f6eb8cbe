"""PNG plots of the demo and the fault experiment: one figure per question, seeds drawn as bands.

- :func:`plot_training`: does distillation help, and why is the training reward below held-out accuracy?
  (training reward / KL per update, mean line and min-max band over seeds, with held-out greedy and
  sampled accuracy before and after).
- :func:`plot_step_profiles`: how do the step divergence d_k and SOD's weight w_k behave around tool faults?
- :func:`plot_experiment`: the controlled fault experiment (d_k / w_k around the fault, retries during
  training, held-out accuracy of OPD and SOD with 95% intervals).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

CLEAN = "no fault"
BEFORE = "faulted run, up to the fault"
AFTER = "faulted run, after the fault"
CATEGORIES = (CLEAN, BEFORE, AFTER)
SMOOTHING = 5
DPI = 110
# Fewest steps (all seeds together) behind a plotted step-profile point.
MIN_STEPS = 30
COLOURS = {"opd": "tab:blue", "sod": "tab:orange", "before": "tab:gray", "teacher": "tab:green"}


def step_profile(divergences: Sequence[Sequence[float]], weights: Sequence[Sequence[float]],
                 faults: Sequence[Sequence[int]]) -> dict[str, dict[int, tuple[float, float, int]]]:
    """Mean ``d_k`` and ``w_k`` per step index ``k`` (1-based), split by position relative to the first fault.

    A step k of a trajectory whose first corrupted observation followed step f counts as "after the fault"
    when k > f.  Returns ``{category: {k: (mean d_k, mean w_k, count)}}``.
    """
    sums: dict[str, dict[int, list[float]]] = {c: defaultdict(lambda: [0.0, 0.0, 0]) for c in CATEGORIES}
    for d, w, fault in zip(divergences, weights, faults):
        first = min(fault) if fault else None
        for k, (dk, wk) in enumerate(zip(d, w), start=1):
            category = CLEAN if first is None else (BEFORE if k <= first else AFTER)
            entry = sums[category][k]
            entry[0] += dk
            entry[1] += wk
            entry[2] += 1
    return {c: {k: (s[0] / s[2], s[1] / s[2], s[2]) for k, s in sorted(sums[c].items())} for c in CATEGORIES}


def _smooth(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, minimum and maximum of equally long curves (one per seed); NaNs are skipped."""
    if not curves:
        raise ValueError("curves must hold at least one curve")
    length = len(curves[0])
    if any(len(c) != length for c in curves):
        raise ValueError(f"curves must have equal lengths, got {[len(c) for c in curves]}")
    mean, low, high = [], [], []
    for i in range(length):
        column = [c[i] for c in curves if c[i] is not None and not math.isnan(c[i])]
        if not column:
            mean.append(math.nan)
            low.append(math.nan)
            high.append(math.nan)
            continue
        mean.append(sum(column) / len(column))
        low.append(min(column))
        high.append(max(column))
    return mean, low, high


def _draw_band(axis, xs, curves, colour, label, smooth: bool = False, style: str = "-", marker=None):
    prepared = [_smooth(c) if smooth else list(c) for c in curves]
    mean, low, high = band(prepared)
    axis.plot(xs, mean, style, color=colour, label=label, marker=marker)
    if len(curves) > 1:
        axis.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)


def _ci_point(axis, x, summary: dict, colour, marker, label):
    mean = summary["mean"]
    if summary.get("ci95"):
        low, high = summary["ci95"]
        axis.errorbar([x], [mean], yerr=[[mean - low], [high - mean]], fmt=marker, color=colour, capsize=4,
                      markersize=7, label=label)
    else:
        axis.plot([x], [mean], marker, color=colour, markersize=7, label=label)
    for value in summary["values"]:
        axis.plot([x], [value], ".", color=colour, alpha=0.5)


def plot_training(histories: dict[str, list[list[dict]]], held_out: dict[str, dict[str, dict]], path: Path,
                  title: str) -> Path:
    """Left: training reward per update (sampled at the training temperature) against held-out accuracy,
    greedy and sampled, before and after; right: training KL per update and held-out KL.

    ``histories[variant]`` holds one list of per-update metrics per seed; ``held_out[variant]`` maps
    ``"greedy before" / "greedy after" / "sampled before" / "sampled after" / "kl before" / "kl after"`` to
    :func:`trainer.measure.summarize` dictionaries over seeds.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for offset, (variant, runs) in enumerate(histories.items()):
        colour = COLOURS.get(variant, f"C{offset}")
        updates = len(runs[0])
        xs = list(range(1, updates + 1))
        _draw_band(axes[0], xs, [[m["reward"] for m in run] for run in runs], colour, smooth=True,
                   label=f"{variant.upper()}: training reward, sampled at T=1 ({SMOOTHING}-update mean)")
        _draw_band(axes[1], xs, [[m["kl"] for m in run] for run in runs], colour, smooth=True,
                   label=f"{variant.upper()}: training KL on its own samples ({SMOOTHING}-update mean)")
        stats = held_out[variant]
        shift = offset * updates * 0.02
        for when, x in (("before", 0), ("after", updates)):
            _ci_point(axes[0], x + shift, stats[f"greedy {when}"], colour, "s",
                      f"{variant.upper()}: held-out accuracy, greedy" if when == "after" else None)
            _ci_point(axes[0], x + shift, stats[f"sampled {when}"], colour, "^",
                      f"{variant.upper()}: held-out accuracy, sampled at T=1" if when == "after" else None)
            _ci_point(axes[1], x + shift, stats[f"kl {when}"], colour, "s",
                      f"{variant.upper()}: held-out KL (greedy rollouts)" if when == "after" else None)
    axes[0].set_ylabel("accuracy (exact match) / reward")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("greedy decoding scores far above sampling at T=1")
    axes[1].set_ylabel("student-teacher reverse KL per token")
    axes[1].set_title("the student moves toward the teacher")
    for axis in axes:
        axis.set_xlabel("distillation update (held-out points at 0 and at the end; bars: 95% CI over seeds)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_step_profiles(profiles: dict[str, list[dict]], path: Path, title: str, min_steps: int = MIN_STEPS) -> Path:
    """Mean d_k (left) and w_k (right) against the step index k, per category, with a band over seeds.

    ``profiles[label]`` holds one :func:`step_profile` result per seed; a point (k, category) is drawn only
    where the seeds together have at least ``min_steps`` steps (fewer give a mean that is mostly noise).
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {CLEAN: "-", BEFORE: "--", AFTER: ":"}
    markers = {CLEAN: "o", BEFORE: "s", AFTER: "^"}
    for offset, (label, per_seed) in enumerate(profiles.items()):
        colour = f"C{offset}"
        for category in CATEGORIES:
            counts = defaultdict(int)
            for profile in per_seed:
                for k, (_, _, count) in profile.get(category, {}).items():
                    counts[k] += count
            ks = sorted(k for k, count in counts.items() if count >= min_steps)
            if not ks:
                continue
            for axis, column in zip(axes, (0, 1)):
                curves = [[profile.get(category, {}).get(k, (math.nan,) * 3)[column] for k in ks]
                          for profile in per_seed]
                _draw_band(axis, ks, curves, colour, f"{label}: {category}", style=styles[category],
                           marker=markers[category])
    axes[0].set_ylabel("step divergence d_k (mean reverse KL of step k)")
    axes[0].set_title("how far the student's step k is from the teacher")
    axes[1].set_ylabel("SOD step weight w_k = min(d_1 / d_k, 1.2)")
    axes[1].set_title("the weight SOD gives step k")
    for axis in axes:
        axis.set_xlabel("step index k (assistant turn)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7)
    else:
        for axis in axes:
            axis.text(0.5, 0.5, f"no step index with {min_steps} steps or more", ha="center",
                      transform=axis.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_experiment(summary: dict, path: Path, positions: Sequence[str], variants: Sequence[str]) -> Path:
    """The fault experiment in one figure.

    (a) d_k before / right after / later than the failed call (held-out rollouts of the starting student
    with every first call failing, and without faults as the control); (b) the weights SOD assigned there
    during training; (c) retry rate of the faulted training rollouts per update, OPD against SOD; (d) held-out
    greedy accuracy with and without the fault, before and after each objective (mean, 95% t-interval, one dot
    per seed).  ``positions`` name the steps relative to the failed call (the x axis of (a) and (b)),
    ``variants`` the objectives compared in (c).
    """
    seeds = list(summary["seeds"].values())
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    xs = list(range(len(positions)))
    for kind, style, colour in (("faulted", "-", "tab:red"), ("clean", "--", "tab:gray")):
        label = "first call failed" if kind == "faulted" else "no fault (control)"
        d_curves = [[r["before"][kind]["positions"].get(kind, {}).get(p, {}).get("d", math.nan)
                     for p in positions] for r in seeds]
        _draw_band(axes[0, 0], xs, d_curves, colour, label, style=style, marker="o")
        w_curves = [[r["sod"]["train_positions"].get(kind, {}).get(p, {}).get("w", math.nan) for p in positions]
                    for r in seeds]
        _draw_band(axes[0, 1], xs, w_curves, colour, label, style=style, marker="o")
    axes[0, 0].set_ylabel("step divergence d_k (reverse KL; held-out, starting student)")
    axes[0, 0].set_title("(a) does the teacher disagree right after the fault?")
    axes[0, 1].set_ylabel("SOD weight w_k (mean during SOD training)")
    axes[0, 1].set_title("(b) the weight SOD gives those steps")
    for axis in axes[0]:
        axis.set_xticks(xs, ["k = 1 (before)", "k = 2 (right after)", "k >= 3 (later)"])
        axis.set_xlabel("step relative to the failed first tool call")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for name in variants:
        curves = [[u["retry_rate"] if u["retry_rate"] is not None else math.nan for u in r[name]["train_rollouts"]]
                  for r in seeds]
        updates = list(range(1, len(curves[0]) + 1))
        _draw_band(axes[1, 0], updates, curves, COLOURS[name], f"{name.upper()}", smooth=True)
    axes[1, 0].set_ylim(-0.02, 1.02)
    axes[1, 0].set_xlabel("distillation update")
    axes[1, 0].set_ylabel(f"retry rate of faulted training rollouts ({SMOOTHING}-update mean)")
    axes[1, 0].set_title("(c) does the student keep retrying a failed call?")
    axes[1, 0].grid(alpha=0.3)
    axes[1, 0].legend(fontsize=8)
    aggregate = summary["aggregate"]
    groups = [("before", "before"), ("opd", "after OPD"), ("sod", "after SOD")]
    for g, (stage, label) in enumerate(groups):
        for j, (kind, marker) in enumerate((("clean", "o"), ("faulted", "^"))):
            key = f"{stage} accuracy {kind}"
            if key in aggregate:
                _ci_point(axes[1, 1], g + (j - 0.5) * 0.25, aggregate[key], COLOURS.get(stage, "tab:gray"), marker,
                          f"{'no fault' if kind == 'clean' else 'first call fails'}" if g == 0 else None)
    teacher = summary["teacher"]
    axes[1, 1].axhline(teacher["clean"]["accuracy"], color="tab:green", linestyle="--", linewidth=1,
                       label="teacher, no fault")
    axes[1, 1].axhline(teacher["faulted"]["accuracy"], color="tab:green", linestyle=":", linewidth=1,
                       label="teacher, first call fails")
    axes[1, 1].set_xticks(range(len(groups)), [label for _, label in groups])
    axes[1, 1].set_ylim(-0.02, 1.02)
    axes[1, 1].set_ylabel("held-out accuracy, greedy (mean, 95% CI, dots: seeds)")
    axes[1, 1].set_title("(d) held-out accuracy: o no fault, ^ first call fails")
    axes[1, 1].grid(alpha=0.3)
    axes[1, 1].legend(fontsize=8)
    fig.suptitle(f"tool-fault experiment, {len(seeds)} seeds (bands: min-max over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
