"""SOD steps from chat conversations: one step per assistant message (used through :mod:`sod_kernels.hf`).

A step is an assistant turn: the tokens the model generated for one assistant message (its content and
the end-of-turn token), not the role header the chat template writes before it nor the whitespace it
writes after it. Two ways to find them, chosen per template:

1. **Generation markers.** A template with ``{% generation %} ... {% endgeneration %}`` blocks makes
   ``tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True)`` mark the generated tokens.
   When the marked runs are as many as the assistant messages, run k is step k. Otherwise (blocks of two
   adjacent assistant messages that touch, or several blocks in one message) the runs are re-cut by
   message: the number of marked tokens in the rendering of each prefix ``messages[:i + 1]`` tells where
   message ``i``'s tokens end, so adjacent assistant turns never merge into one step.
2. **Turn boundaries.** Without markers, message ``i``'s generated text is what the rendering of
   ``messages[:i + 1]`` adds to the rendering of ``messages[:i]`` with the generation prompt (trailing
   whitespace removed); tokens overlapping it (character offsets of a fast tokenizer) form step ``i``.
   This needs a template that renders earlier turns the same way whatever follows them
   (prefix-preserving); a template that does not is refused with a ``ValueError``.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
RESERVED_TEMPLATE_KWARGS = ("tokenize", "return_dict", "return_assistant_tokens_mask", "add_generation_prompt",
                            "continue_final_message", "return_tensors", "padding", "truncation")


@dataclass
class ChatSteps:
    """Tokenized conversations with their SOD steps (``[B, L]`` int64 tensors, padded).

    input_ids:      token ids of the rendered conversations.
    attention_mask: 1 on tokens, 0 on padding.
    step_ids:       the 0-based index of the assistant message a generated token belongs to, -1 elsewhere
                    (unshifted: entry t describes ``input_ids[:, t]``; :func:`sod_kernels.hf.distillation_inputs`
                    shifts it).
    method:         ``"generation_markers"`` or ``"turn_boundaries"`` (how the steps were found).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    step_ids: torch.Tensor
    method: str

    @property
    def response_mask(self) -> torch.Tensor:
        """``[B, L]`` int64, 1 on generated tokens."""
        return (self.step_ids >= 0).long()


def _runs(mask: Sequence[int]) -> list[int]:
    """Index of the run of ones each position belongs to (-1 outside runs)."""
    out, run, previous = [], -1, 0
    for m in mask:
        if m and not previous:
            run += 1
        out.append(run if m else -1)
        previous = m
    return out


def _assistant_positions(messages: Sequence[dict]) -> list[int]:
    return [i for i, message in enumerate(messages) if message.get("role") == "assistant"]


def _marked(tokenizer, messages, template_args: dict) -> tuple[list[int], list[int]]:
    enc = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, **template_args)
    return list(enc["input_ids"]), [int(m) for m in enc["assistant_masks"]]


def _steps_from_markers(tokenizer, messages, template_args: dict) -> tuple[list[int], list[int]]:
    ids, mask = _marked(tokenizer, messages, template_args)
    runs = _runs(mask)
    assistants = _assistant_positions(messages)
    if max(runs, default=-1) + 1 == len(assistants):
        return ids, runs
    # Re-cut by message: cumulative marked-token counts of the prefixes that end at each assistant message.
    ends = [sum(_marked(tokenizer, messages[:i + 1], template_args)[1]) for i in assistants]
    positions = [t for t, m in enumerate(mask) if m]
    if any(b < a for a, b in zip(ends, ends[1:])) or (ends and ends[-1] != len(positions)):
        raise ValueError("the chat template marks a different number of generated tokens for a conversation and "
                         f"for its prefixes (prefix counts {ends}, whole conversation {len(positions)}); cannot "
                         "split the assistant tokens into one step per message")
    steps = [-1] * len(ids)
    step, current = -1, -1
    for j, t in enumerate(positions):
        message = bisect.bisect_right(ends, j)  # the first assistant message whose prefix count exceeds j
        if message != current:
            step, current = step + 1, message
        steps[t] = step
    return ids, steps


def _render(tokenizer, messages, template_args: dict, *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt,
                                         **template_args)


def _steps_from_boundaries(tokenizer, messages, template_args: dict) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("finding assistant turns without {% generation %} markers needs a fast tokenizer "
                        "(character offsets); pass a PreTrainedTokenizerFast or a template with markers")
    full = _render(tokenizer, messages, template_args, generation_prompt=False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    steps = [-1] * len(ids)
    step = -1
    for i in _assistant_positions(messages):
        try:
            before = _render(tokenizer, messages[:i], template_args, generation_prompt=True)
        except Exception as error:  # templates may refuse an empty or partial conversation
            raise ValueError(f"cannot render the conversation before assistant message {i} to find where it "
                             f"starts ({error}); use a chat template with {{% generation %}} markers") from error
        through = _render(tokenizer, messages[:i + 1], template_args, generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError(f"the chat template renders the turns before assistant message {i} differently "
                             "depending on what follows them (it is not prefix-preserving), so the turn boundaries "
                             "cannot be read from prefix renderings; use a chat template with {% generation %} "
                             "markers (chat_template=...)")
        start, end = len(before), max(len(through.rstrip()), len(before))
        hit = [t for t, (a, b) in enumerate(offsets) if b > a and b > start and a < end and steps[t] < 0]
        if hit:
            step += 1
            for t in hit:
                steps[t] = step
    return ids, steps


def _pad(rows: list[list[int]], value: int, length: int, side: str) -> torch.Tensor:
    padded = [([value] * (length - len(r)) + r) if side == "left" else (r + [value] * (length - len(r)))
              for r in rows]
    return torch.tensor(padded, dtype=torch.int64).reshape(len(rows), length)


def chat_step_ids(tokenizer, conversations, *, tools: list | None = None, chat_template: str | None = None,
                  padding_side: str = "right", **template_kwargs: Any) -> ChatSteps:
    """Tokenize chat conversations and number their assistant turns (SOD steps), one step per message.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template (fast, unless the template has
            ``{% generation %}`` markers).
        conversations: one conversation (a list of ``{"role", "content", ...}`` messages) or a list of them.
            Every assistant message is a step, including several assistant messages in a row.
        tools, chat_template, template_kwargs: passed to ``tokenizer.apply_chat_template`` (e.g.
            ``enable_thinking=False``).
        padding_side: ``"right"`` or ``"left"``; padding uses ``tokenizer.pad_token_id`` (required when the
            conversations differ in length).
    Returns:
        :class:`ChatSteps` (``method`` says which of the two ways of the module docstring was used).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    reserved = sorted(set(template_kwargs) & set(RESERVED_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"chat_step_ids sets {', '.join(reserved)} itself; do not pass them")
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise TypeError("conversations must be a non-empty list of messages or a list of such lists")
    batch = [conversations] if isinstance(conversations[0], dict) else list(conversations)
    for b, messages in enumerate(batch):
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"conversation {b} must be a list of message dicts")
    template = tokenizer.get_chat_template(chat_template, tools)
    template_args = {"tools": tools, "chat_template": template, **template_kwargs}
    marked = GENERATION_TAG.search(template) is not None
    find = _steps_from_markers if marked else _steps_from_boundaries
    rows = [find(tokenizer, messages, template_args) for messages in batch]
    length = max(len(ids) for ids, _ in rows)
    pad_id = tokenizer.pad_token_id
    if pad_id is None and any(len(ids) != length for ids, _ in rows):
        raise ValueError("the conversations differ in length and tokenizer.pad_token_id is None; set a pad token")
    pad_id = 0 if pad_id is None else pad_id
    return ChatSteps(input_ids=_pad([ids for ids, _ in rows], pad_id, length, padding_side),
                     attention_mask=_pad([[1] * len(ids) for ids, _ in rows], 0, length, padding_side),
                     step_ids=_pad([steps for _, steps in rows], -1, length, padding_side),
                     method="generation_markers" if marked else "turn_boundaries")
