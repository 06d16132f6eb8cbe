"""What the demo and the fault experiment report besides the training itself.

- :func:`machine_description`: the CPU model, core count and library versions a result was measured with
  (tiny models trained on CPU are not bit-identical across CPUs or PyTorch builds, so every printed number
  carries the machine it came from).
- :func:`summarize`: mean, sample standard deviation and a two-sided 95% Student-t confidence interval of a
  few per-seed values.
- :class:`MemoizedExecutor`: runs each distinct pure integer-arithmetic ``print(...)`` program once in the
  sandbox and replays its output afterwards; every other program runs in the sandbox every time.
"""

from __future__ import annotations

import math
import os
import platform
import re
import threading
from dataclasses import dataclass, field
from typing import Sequence

from .rollout import ToolExecutor, ToolObservation

# ``print(<int> <op> <int> ...)`` with + - * only: deterministic in every CPython, so replaying is exact.
PURE_ARITHMETIC = re.compile(r"print\(\s*-?\d+(?:\s*[-+*]\s*-?\d+)*\s*\)")
# Most digits an operand of a memoised program may have (keeps replayed programs small and cheap).
MAX_OPERAND_DIGITS = 12


def cpu_model() -> str:
    """The CPU model name (``model name`` of ``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_description() -> dict:
    """CPU model, logical cores, torch version and threads, transformers and Python versions."""
    import torch
    import transformers

    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def describe_machine(machine: dict) -> str:
    """One line: ``CPU (N logical cores), torch X (T threads), transformers Y, Python Z``."""
    return (f"{machine['cpu']} ({machine['logical_cores']} logical cores), torch {machine['torch']} "
            f"({machine['torch_threads']} threads), transformers {machine['transformers']}, "
            f"Python {machine['python']}")


def _t_cdf(x: float, df: int) -> float:
    """CDF of Student's t with ``df`` degrees of freedom (Simpson's rule on the density; x >= 0)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 2000
    h = x / n
    total = 0.0
    for i in range(n + 1):
        t = i * h
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        total += density * (1 if i in (0, n) else 4 if i % 2 else 2)
    return 0.5 + total * h / 3


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile (in (0.5, 1)) of Student's t with ``df >= 1`` degrees of freedom."""
    if not 0.5 < probability < 1.0:
        raise ValueError(f"probability must lie in (0.5, 1), got {probability}")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        if _t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "ci95": (low, high), "n", "values"}`` of per-seed values.

    ``std`` is the sample standard deviation (n - 1); ``ci95`` the two-sided 95% t-interval of the mean
    (``None`` for a single value: one seed says nothing about the spread).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values must hold at least one number")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "std": None, "ci95": None, "n": 1, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci95": (mean - half, mean + half), "n": n, "values": values}


def format_summary(summary: dict, digits: int = 3) -> str:
    """``mean ± std [low, high]`` (or just the value for one seed)."""
    if summary["n"] == 1:
        return f"{summary['mean']:.{digits}f}"
    low, high = summary["ci95"]
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


@dataclass
class MemoizedExecutor:
    """A tool executor that replays the sandbox's output for repeated pure-arithmetic programs.

    A program matching :data:`PURE_ARITHMETIC` (only integer literals, ``+ - *`` and ``print``) always prints
    the same text, so after one successful sandboxed run its observation is reused.  Anything else, and
    any run that failed or timed out, goes to ``inner`` every time.  Thread-safe (the rollout runs tool
    calls from a thread pool); ``calls`` / ``sandbox_runs`` count what happened.
    """

    inner: ToolExecutor
    calls: int = 0
    sandbox_runs: int = 0
    _memo: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @staticmethod
    def cacheable(code: str) -> bool:
        """Whether ``code`` is exactly a pure integer-arithmetic print with operands of at most 12 digits."""
        if not isinstance(code, str) or PURE_ARITHMETIC.fullmatch(code) is None:
            return False
        return all(len(d) <= MAX_OPERAND_DIGITS for d in re.findall(r"\d+", code))

    def __call__(self, code: str) -> ToolObservation:
        key = code  # exact text: leading whitespace alone changes what Python does with it
        cacheable = self.cacheable(code)
        with self._lock:
            self.calls += 1
            if cacheable and key in self._memo:
                return self._memo[key]
            self.sandbox_runs += 1
        result = self.inner(code)
        if cacheable and result.ok and not result.timed_out:
            with self._lock:
                self._memo[key] = result
        return result
