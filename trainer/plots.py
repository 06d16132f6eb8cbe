"""PNG plots of a run: step divergence / step weight around tool faults, and accuracy / KL over training."""

from __future__ import annotations

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


def plot_step_profiles(profiles: dict[str, dict], path: Path, title: str) -> Path:
    """Two panels (d_k, w_k against k); one line style per category, one colour per profile label."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {CLEAN: "-", BEFORE: "--", AFTER: ":"}
    markers = {CLEAN: "o", BEFORE: "s", AFTER: "^"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (label, profile) in zip(colours, profiles.items()):
        for category in CATEGORIES:
            points = profile.get(category, {})
            if not points:
                continue
            ks = list(points)
            for axis, column in zip(axes, (0, 1)):
                axis.plot(ks, [points[k][column] for k in ks], styles[category], marker=markers[category],
                          color=colour, label=f"{label}: {category}")
    axes[0].set_ylabel("step divergence d_k (mean reverse KL)")
    axes[1].set_ylabel("SOD step weight w_k")
    for axis in axes:
        axis.set_xlabel("step index k (assistant turn)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _smooth(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_training(histories: dict[str, list[dict]], evaluations: dict[str, list[tuple[int, float, float]]],
                  path: Path) -> Path:
    """Training reward and KL per update (smoothed), and held-out accuracy / KL at evaluation points.

    ``evaluations[label]`` holds ``(update, accuracy, kl)`` tuples.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, (label, history) in zip(colours, histories.items()):
        steps = [m["update"] + 1 for m in history]
        axes[0].plot(steps, _smooth([m["reward"] for m in history]), color=colour, alpha=0.8,
                     label=f"{label}: train reward ({SMOOTHING}-update mean)")
        axes[1].plot(steps, _smooth([m["kl"] for m in history]), color=colour, alpha=0.8,
                     label=f"{label}: train KL ({SMOOTHING}-update mean)")
        points = evaluations.get(label, [])
        if points:
            axes[0].plot([p[0] for p in points], [p[1] for p in points], "o--", color=colour,
                         label=f"{label}: held-out accuracy")
            axes[1].plot([p[0] for p in points], [p[2] for p in points], "o--", color=colour,
                         label=f"{label}: held-out KL")
    axes[0].set_ylabel("accuracy / reward")
    axes[1].set_ylabel("student-teacher reverse KL per token")
    for axis in axes:
        axis.set_xlabel("update")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
