"""Supervised warm-starts for the demo: programmatic tool-using solutions of the built-in task.

A solution is the conversation the task's reference solver would have: one ``<tool_call>print(...)</tool_call>``
turn per intermediate result, each followed by its tool observation, then ``Answer: <number>``.  The loss is
next-token cross-entropy on the assistant tokens only (the same ``response_mask`` a rollout produces).
``noise_rate`` replaces one digit of a tool call's operand with probability ``noise_rate`` per call (the tool
output and the rest of the solution follow the wrong call), which gives a weaker, sloppier student.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

import torch

from .models import hidden_states, output_head
from .rollout import ChatFormat
from .task import ANSWER_PREFIX, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Problem, eval_binary

IGNORE_INDEX = -100


def _noisy_code(code: str, rng: random.Random) -> str:
    digits = [m.start() for m in re.finditer(r"\d", code)]
    position = rng.choice(digits)
    replacement = rng.choice([d for d in "0123456789" if d != code[position]])
    return code[:position] + replacement + code[position + 1:]


def solution_turns(problem: Problem, noise_rate: float = 0.0, rng: random.Random | None = None):
    """``(assistant_turns, observations)`` of the reference solution (optionally with noisy operands)."""
    if not problem.solution_code:
        raise ValueError("solution_turns needs a built-in task problem (with solution_code)")
    turns, observations = [], []
    previous_true, previous_seen = None, None
    for code, output in zip(problem.solution_code, problem.tool_outputs):
        left = re.fullmatch(r"print\((-?\d+)(.*)\)", code)
        if previous_true is not None and left is not None and left.group(1) == previous_true:
            # A call that starts from the previous result uses it as the model saw it (after noise).
            code = f"print({previous_seen}{left.group(2)})"
        if rng is not None and noise_rate > 0 and rng.random() < noise_rate:
            code = _noisy_code(code, rng)
        match = re.fullmatch(r"print\((-?\d+)([+\-*])(-?\d+)\)", code)
        seen = str(eval_binary(int(match.group(1)), match.group(2), int(match.group(3)))) if match else output
        turns.append(f"{TOOL_CALL_OPEN}{code}{TOOL_CALL_CLOSE}")
        observations.append(seen)
        previous_true, previous_seen = output, seen
    turns.append(f"{ANSWER_PREFIX} {observations[-1]}")
    return turns, observations


def build_examples(problems: Sequence[Problem], chat: ChatFormat, noise_rate: float = 0.0,
                   seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Tokenized ``(ids, response_mask)`` of each problem's solution."""
    rng = random.Random(seed)
    examples = []
    for problem in problems:
        turns, observations = solution_turns(problem, noise_rate, rng)
        examples.append(chat.conversation(problem.question, turns, observations))
    return examples


def supervised_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and shifted ``labels`` (-100 off the mask)."""
    width = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, mask) in enumerate(examples):
        n = len(row)
        ids[i, :n] = torch.tensor(row)
        attention[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(mask) == 1, torch.tensor(row), torch.tensor(IGNORE_INDEX))
    return ids, attention, labels[:, 1:]


def supervised_train(model, examples: Sequence[tuple[list[int], list[int]]], *, steps: int, batch_size: int,
                     lr: float, pad_id: int, seed: int, warmup: int = 20,
                     progress: Callable[[int, float], None] | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on random batches of ``examples``; returns the losses."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress_fraction * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    pool = list(examples)
    losses = []
    head = output_head(model)
    for step in range(steps):
        ids, attention, labels = supervised_batch(rng.sample(pool, min(batch_size, len(pool))), pad_id)
        hidden = hidden_states(model, ids, attention)[:, :-1]
        logits = head.logits(hidden)  # the model's own (its logit scale and soft-cap included)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses
