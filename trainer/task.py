"""The built-in tool-use task: multi-step arithmetic chains and small word problems.

Every problem is solved by calling the Python tool once per intermediate result (``print(a+b)``), then
answering ``Answer: <number>``.  Problems are a pure function of ``(seed, index)``, so a training run can
ask for "problem 17 of update 3" at any time (including after a resume) without keeping generator state.

The module also holds the reward (exact match on the integer answer), the answer / tool-call parsers the
rollout uses, and the tool-fault injection that corrupts an observation with a given probability: silently
(``kind="shift"``: every number in the output moved) or visibly (``kind="error"``: the output replaced by an
error line), at any step or only after one chosen step (``at_step``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ANSWER_PREFIX = "Answer:"
ANSWER_PATTERN = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)")
TOOL_CALL_PATTERN = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
TOOL_NAME = "python"

# Problem generation ranges (kept small so that a tiny model's numbers stay short).
CHAIN_MIN_OPS = 1
CHAIN_MAX_OPS = 3
CHAIN_START_RANGE = (2, 60)
CHAIN_ADD_RANGE = (1, 40)
CHAIN_MUL_RANGE = (2, 6)
WORD_SMALL_RANGE = (2, 9)
WORD_MEDIUM_RANGE = (2, 15)
# Fraction of generated problems that are word problems (the rest are arithmetic chains).
WORD_PROBLEM_FRACTION = 0.4
# Held-out problems use a disjoint index space: index + HELD_OUT_OFFSET.
HELD_OUT_OFFSET = 10**9

NAMES = ("Ana", "Ben", "Cy", "Dee", "Eli", "Flo")
CHAIN_WORDS = {"+": "add", "-": "minus", "*": "times"}

# Word-problem templates: (question format, list of (code format, result name)), answer is the last result.
# Code formats reference the problem's numbers (a, b, c) and earlier results (r1, r2).
WORD_TEMPLATES = (
    ("{name} has {a} bags of {b} nuts and eats {c}. How many nuts are left?",
     ("{a}*{b}", "{r1}-{c}")),
    ("{name} buys {a} packs of {b} cards, then {c} more packs. How many cards?",
     ("{a}*{b}", "{c}*{b}", "{r1}+{r2}")),
    ("{name} has {a} coins, finds {b} more and doubles them. How many coins?",
     ("{a}+{b}", "{r1}*2")),
)

WORD_VOCABULARY = sorted({w for template, _ in WORD_TEMPLATES for w in re.findall(r"[A-Za-z]+", template)}
                         | set(NAMES) | set(CHAIN_WORDS.values()) | {"start", "print", "Answer"})


@dataclass(frozen=True)
class Problem:
    """One task instance.

    question:      the user message.
    answer:        the exact-match target (an integer written in decimal), or a free string for datasets.
    solution_code: the code of each tool call of the reference solution ([] when unknown, e.g. datasets).
    tool_outputs:  what each reference tool call prints.
    """

    question: str
    answer: str
    solution_code: tuple[str, ...] = ()
    tool_outputs: tuple[str, ...] = ()


def _chain_problem(rng: random.Random) -> Problem:
    value = rng.randint(*CHAIN_START_RANGE)
    words = [f"start {value}"]
    code, outputs = [], []
    for _ in range(rng.randint(CHAIN_MIN_OPS, CHAIN_MAX_OPS)):
        op = rng.choice(("+", "-", "*"))
        operand = rng.randint(*(CHAIN_MUL_RANGE if op == "*" else CHAIN_ADD_RANGE))
        code.append(f"print({value}{op}{operand})")
        value = eval_binary(value, op, operand)
        outputs.append(str(value))
        words.append(f"{CHAIN_WORDS[op]} {operand}")
    return Problem(question=", ".join(words) + ".", answer=str(value), solution_code=tuple(code),
                   tool_outputs=tuple(outputs))


def _word_problem(rng: random.Random) -> Problem:
    template, steps = rng.choice(WORD_TEMPLATES)
    values = {"name": rng.choice(NAMES), "a": rng.randint(*WORD_SMALL_RANGE), "b": rng.randint(*WORD_MEDIUM_RANGE),
              "c": rng.randint(*WORD_SMALL_RANGE)}
    code, outputs = [], []
    for k, expression in enumerate(steps, start=1):
        concrete = expression.format(**values)
        result = _evaluate_expression(concrete)
        values[f"r{k}"] = result
        code.append(f"print({concrete})")
        outputs.append(str(result))
    return Problem(question=template.format(**values), answer=outputs[-1], solution_code=tuple(code),
                   tool_outputs=tuple(outputs))


def eval_binary(left: int, op: str, right: int) -> int:
    """``left op right`` for ``op`` in ``+ - *``."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"op must be one of '+', '-', '*', got {op!r}")


def _evaluate_expression(expression: str) -> int:
    """Evaluate ``int op int`` (the only form the templates produce) without ``eval``."""
    match = re.fullmatch(r"(-?\d+)([+\-*])(-?\d+)", expression)
    if match is None:
        raise ValueError(f"expression must look like '<int><op><int>', got {expression!r}")
    return eval_binary(int(match.group(1)), match.group(2), int(match.group(3)))


def generate_problem(seed: int, index: int) -> Problem:
    """Problem ``index`` of the stream defined by ``seed`` (a pure function of both)."""
    rng = random.Random(f"sod-task-{seed}-{index}")
    if rng.random() < WORD_PROBLEM_FRACTION:
        return _word_problem(rng)
    return _chain_problem(rng)


def held_out_problem(seed: int, index: int) -> Problem:
    """Problem ``index`` of the held-out stream (disjoint index space from training)."""
    return generate_problem(seed, HELD_OUT_OFFSET + index)


def solve(problem: Problem) -> str:
    """Re-derive the answer by running the reference solution's arithmetic (checks the generator)."""
    if not problem.solution_code:
        raise ValueError("solve needs a problem with solution_code (built-in task problems have it)")
    result = None
    for code in problem.solution_code:
        match = re.fullmatch(r"print\((.*)\)", code)
        if match is None:
            raise ValueError(f"solution code must be 'print(<expression>)', got {code!r}")
        result = _evaluate_expression(match.group(1))
    return str(result)


def normalize_answer(text: str | None) -> str | None:
    """Canonical form of an answer: integers without leading zeros / '+', floats with integral value as ints."""
    if text is None:
        return None
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_answer(text: str) -> str | None:
    """The last ``Answer: <number>`` of an assistant message, or None."""
    matches = ANSWER_PATTERN.findall(text)
    return matches[-1] if matches else None


def reward(predicted: str | None, answer: str) -> float:
    """Exact-match reward: 1.0 when the normalized answers are equal, else 0.0."""
    if predicted is None:
        return 0.0
    return 1.0 if normalize_answer(predicted) == normalize_answer(answer) else 0.0


def extract_tool_call(text: str) -> str | None:
    """The Python code of the first tool call in an assistant message, or None if there is none.

    Accepts both the compact form ``<tool_call>print(1+2)</tool_call>`` and the JSON form real chat models
    (Qwen3, Hermes) emit: ``<tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>``.
    An unterminated ``<tool_call>`` at the end of the message is also accepted (generation cut at the
    stop token).
    """
    match = TOOL_CALL_PATTERN.search(text)
    if match is None:
        start = text.find(TOOL_CALL_OPEN)
        if start < 0:
            return None
        body = text[start + len(TOOL_CALL_OPEN):]
    else:
        body = match.group(1)
    body = body.strip()
    if body.startswith("{"):
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return body
        if isinstance(call, dict):
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return arguments
            if isinstance(arguments, dict):
                for key in ("code", "script", "source"):
                    if isinstance(arguments.get(key), str):
                        return arguments[key]
    return body


# Tool-fault kinds of FaultInjector and the observation a visible ("error") fault shows instead of the output.
FAULT_KINDS = ("shift", "error")
ERROR_OBSERVATION = "Error: result lost"


def corrupt_observation(output: str, rng: np.random.Generator) -> str:
    """A wrong but plausible tool observation: every integer shifted by a nonzero offset, else a junk line."""
    numbers = list(re.finditer(r"-?\d+", output))
    if not numbers:
        return output + "\nError: result lost"
    pieces, last = [], 0
    for m in numbers:
        offset = int(rng.integers(1, 10)) * (1 if rng.random() < 0.5 else -1)
        pieces.append(output[last:m.start()])
        pieces.append(str(int(m.group()) + offset))
        last = m.end()
    pieces.append(output[last:])
    return "".join(pieces)


@dataclass
class FaultInjector:
    """Corrupts a tool observation with probability ``rate``, deterministically from (seed, keys).

    kind:    ``"shift"`` (a wrong but plausible observation, :func:`corrupt_observation`) or ``"error"``
             (the observation replaced by :data:`ERROR_OBSERVATION`, a failure the model can see).
    at_step: ``None`` (any tool call may be corrupted) or k >= 1: only the observation that follows
             assistant step k (the k-th tool call of a rollout) may be; the others pass unchanged.
    """

    rate: float
    seed: int
    kind: str = "shift"
    at_step: int | None = None
    faults_seen: int = field(default=0, compare=False)

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"tool_fault_rate must lie in [0, 1], got {self.rate}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {FAULT_KINDS}, got {self.kind!r}")
        if self.at_step is not None and (isinstance(self.at_step, bool) or not isinstance(self.at_step, int)
                                         or self.at_step < 1):
            raise ValueError(f"at_step must be None or an int >= 1 (a 1-based assistant step), got {self.at_step!r}")

    def maybe_corrupt(self, output: str, *keys: int) -> tuple[str, bool]:
        """Return ``(observation, faulted)``; ``keys`` (update, sample, turn) pick the random draw.

        The last key is the 0-based assistant turn whose tool call printed ``output`` (the rollout passes
        ``(*fault_keys, sample, turn)``); ``at_step`` compares it with ``at_step - 1``.  Whether an observation
        is corrupted does not depend on ``at_step`` beyond that filter, so the same keys fault the same calls.
        """
        if self.rate <= 0.0:
            return output, False
        if self.at_step is not None:
            if not keys:
                raise ValueError("maybe_corrupt needs the turn as its last key when at_step is set")
            if int(keys[-1]) + 1 != self.at_step:
                return output, False
        rng = np.random.default_rng([self.seed, *[int(k) for k in keys]])
        if rng.random() >= self.rate:
            return output, False
        self.faults_seen += 1
        if self.kind == "error":
            return ERROR_OBSERVATION, True
        return corrupt_observation(output, rng), True


def load_dataset(path: str | Path) -> list[Problem]:
    """Problems from a local JSONL or Parquet file.

    Each record needs a prompt (column ``question``, ``prompt`` or ``problem``) and an answer (``answer``,
    ``target`` or ``solution``); answers are compared by exact match after :func:`normalize_answer`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset must be an existing .jsonl or .parquet file, got {str(path)!r}")
    if path.suffix == ".jsonl" or path.suffix == ".json":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"reading the Parquet dataset {str(path)!r} needs pyarrow; install it or convert "
                             f"the file to JSONL") from exc
        records = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"dataset must end in .jsonl or .parquet, got {str(path)!r}")
    problems = []
    for i, record in enumerate(records):
        question = next((record[k] for k in ("question", "prompt", "problem") if k in record), None)
        answer = next((record[k] for k in ("answer", "target", "solution") if k in record), None)
        if question is None or answer is None:
            raise ValueError(f"dataset record {i} of {str(path)!r} needs a 'question'/'prompt'/'problem' and an "
                             f"'answer'/'target'/'solution' field, got keys {sorted(record)}")
        problems.append(Problem(question=str(question), answer=str(answer)))
    if not problems:
        raise ValueError(f"dataset {str(path)!r} holds no records")
    return problems


class ProblemSource:
    """Training and held-out problems: the built-in generator, or a local dataset split by a fixed seed."""

    def __init__(self, seed: int, dataset: str | None = None, held_out_fraction: float = 0.1):
        self.seed = seed
        self.records = None if dataset is None else load_dataset(dataset)
        if self.records is not None:
            order = list(range(len(self.records)))
            random.Random(seed).shuffle(order)
            n_held = max(1, int(len(order) * held_out_fraction)) if len(order) > 1 else 0
            self.held_out_ids = order[:n_held]
            self.train_ids = order[n_held:] or order

    def train(self, index: int) -> Problem:
        """Training problem ``index`` (datasets cycle, reshuffled per epoch deterministically)."""
        if self.records is None:
            return generate_problem(self.seed, index)
        epoch, position = divmod(index, len(self.train_ids))
        order = list(self.train_ids)
        random.Random(f"{self.seed}-epoch-{epoch}").shuffle(order)
        return self.records[order[position]]

    def held_out(self, index: int) -> Problem:
        """Held-out problem ``index`` (datasets: cycles over the held-out split)."""
        if self.records is None:
            return held_out_problem(self.seed, index)
        ids = self.held_out_ids or self.train_ids
        return self.records[ids[index % len(ids)]]
