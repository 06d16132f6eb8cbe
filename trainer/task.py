"""The built-in tool-use task: multi-step arithmetic chains and small word problems.

Every problem is solved by calling the Python tool once per intermediate result (``print(a+b)``), then
answering ``Answer: <number>``.  Problems are a pure function of ``(seed, index)``, so a training run can
ask for "problem 17 of update 3" at any time (including after a resume) without keeping generator state.

The module also holds local datasets (:func:`load_dataset`: what a row may hold, refused with the file and
the line otherwise), the reward (:func:`reward`: numbers compared by value, text answers after
normalization, or a user function named by import path, :func:`load_reward_function`), the answer /
tool-call parsers the rollout uses, and the tool-fault injection that corrupts an observation with a given
probability: silently
(``kind="shift"``: every number in the output moved) or visibly (``kind="error"``: the output replaced by an
error line), at any step or only after one chosen step (``at_step``).
"""

from __future__ import annotations

import importlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ANSWER_PREFIX = "Answer:"
# A number as an answer may write it: optional sign, digits (optionally grouped by commas in threes) with an
# optional decimal part, or a fraction of two integers ("3/4").
NUMBER_TEXT = r"[-+]?(?:\d+\s*/\s*\d+|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
NUMBER_PATTERN = re.compile(NUMBER_TEXT)
NUMBER_IN_TEXT = re.compile(r"(?<![\w.,/])" + NUMBER_TEXT + r"(?![\w/]|[.,]\d)")
ANSWER_TYPES = ("auto", "number", "text")
QUESTION_KEYS = ("question", "prompt", "problem", "messages")
ANSWER_KEYS = ("answer", "target", "solution")
MESSAGE_ROLES = ("system", "user", "assistant")
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

    question:      the user message (the last user message of ``messages`` when those are given).
    answer:        the target: a number (an integer for the built-in task) or a text answer (datasets).
    solution_code: the code of each tool call of the reference solution ([] when unknown, e.g. datasets).
    tool_outputs:  what each reference tool call prints.
    messages:      ``(role, content)`` pairs that start the conversation instead of one user message
                   (a dataset row given as chat messages); () for a plain question.
    answer_type:   ``"number"`` (compared by value), ``"text"`` (compared after normalization) or ``"auto"``
                   (a number when the answer reads as one, see :func:`parse_number`).
    """

    question: str
    answer: str
    solution_code: tuple[str, ...] = ()
    tool_outputs: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    answer_type: str = "auto"


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


def parse_number(text: str) -> Fraction | None:
    """The value of ``text`` when the whole of it (surrounding spaces aside) is a number as
    :data:`NUMBER_TEXT` writes one ("42", "-7", "1,000", "0.75", "3/4"), else None (also for "x/0")."""
    text = text.strip()
    if NUMBER_PATTERN.fullmatch(text) is None:
        return None
    return _number_value(text)


def _number_value(text: str) -> Fraction | None:
    text = text.replace(",", "").replace(" ", "")
    if "/" in text:
        numerator, denominator = text.split("/")
        return None if int(denominator) == 0 else Fraction(int(numerator), int(denominator))
    return Fraction(text)


def first_number(text: str) -> Fraction | None:
    """The value of the first number written in ``text`` ("42 nuts", "1,000.", "about 3/4"), or None."""
    for match in NUMBER_IN_TEXT.finditer(text):
        value = _number_value(match.group())
        if value is not None:
            return value
    return None


def normalize_text(text: str) -> str:
    """A text answer as compared: case-folded, runs of whitespace made one space, a final period dropped."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def normalize_answer(text: str | None) -> str | None:
    """Canonical form of an answer: a number as its value ("007" and "7.0" are "7", "1,000" is "1000", "3/4"
    and "0.75" are "0.75", "1/3" stays "1/3"), any other text by :func:`normalize_text`."""
    if text is None:
        return None
    value = parse_number(text)
    if value is None:
        return normalize_text(text)
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    return f"{float(value):.{digits}f}" if digits <= 15 else f"{value.numerator}/{value.denominator}"


def answer_kind(answer: str, answer_type: str = "auto") -> str:
    """``"number"`` or ``"text"``: how :func:`reward` compares with ``answer``."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if answer_type == "auto":
        return "number" if parse_number(answer) is not None else "text"
    return answer_type


def extract_answer(text: str) -> str | None:
    """What follows the last ``Answer:`` of an assistant message, to the end of its line, or None."""
    position = text.rfind(ANSWER_PREFIX)
    if position < 0:
        return None
    answer = text[position + len(ANSWER_PREFIX):].split("\n", 1)[0].strip()
    return answer or None


def reward(predicted: str | None, answer: str, answer_type: str = "auto") -> float:
    """1.0 when the predicted answer (:func:`extract_answer`) matches ``answer``, else 0.0.

    A number answer (:func:`answer_kind`) matches the first number of the prediction by value ("1000",
    "1,000 nuts", "1000.0" all match "1,000"; "0.75" matches "3/4"); a text answer matches a prediction equal
    to it after :func:`normalize_text` ("paris." matches "Paris").
    """
    if predicted is None:
        return 0.0
    if answer_kind(answer, answer_type) == "number":
        target = parse_number(answer)
        return 1.0 if target is not None and first_number(predicted) == target else 0.0
    return 1.0 if normalize_text(predicted) == normalize_text(answer) else 0.0


RewardFunction = Callable[[str, str], float]


def load_reward_function(spec: str) -> RewardFunction:
    """The function named by ``spec``, ``"package.module:function"`` (importable from the working directory or
    ``sys.path``).  It is called as ``function(response, answer)`` with the final assistant message (special
    tokens removed) and the row's answer (a string), and returns the reward (a finite number).  Raises
    ``ValueError`` naming ``reward_fn`` if it cannot be imported or is not callable."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"reward_fn must be 'module:function' (e.g. 'my_rewards:score'), got {spec!r}")
    import sys

    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or an error raised while importing the user's module
        raise ValueError(f"reward_fn {spec!r}: cannot import {module_name!r} "
                         f"({type(error).__name__}: {error})") from None
    function = module
    for part in name.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise ValueError(f"reward_fn {spec!r}: {module_name!r} has no callable {name!r}")
    return function


def call_reward_function(function: RewardFunction, response: str, answer: str) -> float:
    """``function(response, answer)`` as a float; a ``ValueError`` naming the function if it does not return
    a finite number."""
    value = function(response, answer)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"reward_fn {getattr(function, '__qualname__', function)!r} must return a finite "
                         f"number, got {value!r} for the answer {answer!r}")
    return float(value)


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


def load_dataset(path: str | Path, *, any_answer: bool = False) -> list[Problem]:
    """Problems from a local dataset file; a row that cannot train is refused with the file and the line.

    Files: ``.jsonl`` (one JSON object a line; blank lines skipped), ``.json`` (a JSON array of objects, or
    JSON Lines) or ``.parquet`` (needs pyarrow).  A row is an object with

    - a prompt under ``question``, ``prompt``, ``problem`` or ``messages`` (the first present): a non-empty
      string (the user message), or a list of chat messages ``{"role": "system"|"user"|"assistant",
      "content": "..."}`` that ends with a user message;
    - an answer under ``answer``, ``target`` or ``solution``: a string or a number; without a reward function
      (``any_answer``) it must be one line of text (the reward compares it with the line after ``Answer:``);
    - optionally ``answer_type``: ``"number"`` (the answer must read as a number: "42", "-1,000", "0.75",
      "3/4"), ``"text"`` or ``"auto"`` (the default: a number when it reads as one).

    Other keys are ignored.  Raises ``ValueError`` for a missing or unreadable file, a malformed line or row,
    or a file without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset must be an existing .jsonl, .json or .parquet file, got {str(path)!r}")
    name = str(path)
    if path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ValueError(f"reading the Parquet dataset {name!r} needs pyarrow; install it or convert "
                             f"the file to JSONL") from exc
        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
            raise ValueError(f"dataset {name!r} is not a readable Parquet file: {error}") from None
        rows = [(f"row {i + 1}", record) for i, record in enumerate(table.to_pylist())]
    else:
        raise ValueError(f"dataset must end in .jsonl, .json or .parquet, got {name!r}")
    problems = [_problem_from_row(record, f"dataset {name!r} {where}", any_answer) for where, record in rows]
    if not problems:
        raise ValueError(f"dataset {name!r} holds no rows")
    return problems


def _json_rows(path: Path) -> list[tuple[str, Any]]:
    """``(where, value)`` of each row of a JSON Lines file or a ``.json`` file holding one JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"dataset {str(path)!r} is not UTF-8 text ({error})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset {str(path)!r} line {error.lineno} column {error.colno}: not valid JSON "
                             f"({error.msg})") from None
        return [(f"row {i + 1}", value) for i, value in enumerate(values)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"dataset {str(path)!r} line {number} column {error.colno}: not valid JSON "
                             f"({error.msg})") from None
    return rows


def _problem_from_row(record, where: str, any_answer: bool) -> Problem:
    """One :class:`Problem` from a dataset row (see :func:`load_dataset`); ``where`` names the file and line."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(record).__name__}")
    prompt_key = next((k for k in QUESTION_KEYS if k in record), None)
    answer_key = next((k for k in ANSWER_KEYS if k in record), None)
    if prompt_key is None or answer_key is None:
        raise ValueError(f"{where}: a row needs a prompt ({', '.join(map(repr, QUESTION_KEYS))}) and an answer "
                         f"({', '.join(map(repr, ANSWER_KEYS))}), got keys {sorted(record)}")
    prompt = record[prompt_key]
    messages: tuple[tuple[str, str], ...] = ()
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{where}: {prompt_key!r} is empty")
        question = prompt
    elif isinstance(prompt, (list, tuple)):
        messages = _chat_messages(prompt, f"{where}: {prompt_key!r}")
        question = messages[-1][1]
    else:
        raise ValueError(f"{where}: {prompt_key!r} must be a string or a list of chat messages, got "
                         f"{type(prompt).__name__}")
    answer = record[answer_key]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or \
            (isinstance(answer, float) and not math.isfinite(answer)):
        raise ValueError(f"{where}: {answer_key!r} must be a string or a finite number, got {answer!r}")
    answer = answer if isinstance(answer, str) else repr(answer)
    answer_type = record.get("answer_type", "auto")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"{where}: 'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if not any_answer:
        if not answer.strip():
            raise ValueError(f"{where}: {answer_key!r} is empty; no answer can match it")
        if "\n" in answer.strip():
            raise ValueError(f"{where}: {answer_key!r} spans several lines; the reward compares one line (what "
                             f"follows 'Answer:'); give the final answer alone, or a reward_fn")
        if answer_type == "number" and parse_number(answer) is None:
            raise ValueError(f"{where}: answer_type is 'number' but {answer_key!r} {answer!r} is not a number "
                             f"(like 42, -1,000, 0.75 or 3/4)")
    return Problem(question=question, answer=answer.strip() if not any_answer else answer, messages=messages,
                   answer_type=answer_type)


def _chat_messages(value, where: str) -> tuple[tuple[str, str], ...]:
    """``(role, content)`` pairs of a list of chat messages, checked (see :func:`load_dataset`)."""
    if not value:
        raise ValueError(f"{where} is an empty list of chat messages")
    messages = []
    for k, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or \
                not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {k} must be an object with a string 'role' and 'content', got "
                             f"{message!r}")
        if message["role"] not in MESSAGE_ROLES:
            raise ValueError(f"{where}: message {k} has role {message['role']!r}; expected one of {MESSAGE_ROLES}")
        messages.append((message["role"], message["content"]))
    if messages[-1][0] != "user":
        raise ValueError(f"{where}: the last message must be the user's (the model answers it), got "
                         f"{messages[-1][0]!r}")
    return tuple(messages)


class ProblemSource:
    """Training and held-out problems: the built-in generator, or a local dataset split by a fixed seed.

    ``reward_fn``: the run's reward function (:func:`load_reward_function`), or None for :func:`reward`; with
    one, a dataset's answers may be any string (the function decides)."""

    def __init__(self, seed: int, dataset: str | None = None, held_out_fraction: float = 0.1,
                 reward_fn: str | None = None):
        self.seed = seed
        self.dataset = dataset
        self.reward_fn = reward_fn
        self.records = None if dataset is None else load_dataset(dataset, any_answer=reward_fn is not None)
        if self.records is not None:
            order = list(range(len(self.records)))
            random.Random(seed).shuffle(order)
            n_held = max(1, int(len(order) * held_out_fraction)) if len(order) > 1 else 0
            self.held_out_ids = order[:n_held]
            self.train_ids = order[n_held:] or order

    def describe(self) -> str:
        """One line for the run's report: where problems come from, how many rows, and how they are scored."""
        if self.records is None:
            return f"problems: the built-in tool-use task (seed {self.seed}), exact-match numeric reward"
        rows = len(self.records)
        chats = sum(1 for p in self.records if p.messages)
        split = f"{len(self.train_ids)} for training, {len(self.held_out_ids)} held out"
        shape = f"; {chats} given as chat messages" if chats else ""
        if self.reward_fn is not None:
            return (f"dataset {self.dataset!r}: {rows} rows loaded ({split}{shape}); every row scored by "
                    f"{self.reward_fn}")
        numbers = sum(1 for p in self.records if answer_kind(p.answer, p.answer_type) == "number")
        return (f"dataset {self.dataset!r}: {rows} rows loaded ({split}{shape}); the reward can score {rows} of "
                f"{rows}: {numbers} number answers (compared by value), {rows - numbers} text answers (compared "
                f"after normalization)")

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
