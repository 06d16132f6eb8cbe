"""A small word/character tokenizer for the built-in task, built in code (no download).

Known words (``print``, ``Answer``, the task's words) are single tokens; every other printable ASCII
character is its own token, digits included, so the tokenizer is lossless on ASCII text and numbers are
spelled digit by digit (easy for a tiny model to copy).  Special tokens follow the Qwen3 chat format
(``<|im_start|>``, ``<|im_end|>``, ``<tool_call>``, ``<tool_response>``...), and the chat template renders tool
turns the way Qwen3's does: a ``user`` turn holding ``<tool_response>...</tool_response>``.
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .task import WORD_VOCABULARY

PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, IM_START, IM_END, "<tool_call>", "</tool_call>", "<tool_response>",
                  "</tool_response>")
ROLE_WORDS = ("system", "user", "assistant")

# Qwen3-like chat template: tool messages become a user turn with <tool_response> ... </tool_response>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{ '<|im_start|>user\n<tool_response>' + message['content'] + '</tool_response><|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def task_vocabulary() -> list[str]:
    """The ordered vocabulary: special tokens, role and task words, then printable ASCII characters."""
    words = list(dict.fromkeys([*ROLE_WORDS, *WORD_VOCABULARY]))
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return [*SPECIAL_TOKENS, *words, *[c for c in characters if c not in words]]


def build_task_tokenizer() -> PreTrainedTokenizerFast:
    """Build the task tokenizer (a ``PreTrainedTokenizerFast``, saveable with ``save_pretrained``)."""
    vocabulary = task_vocabulary()
    vocab = {token: i for i, token in enumerate(vocabulary)}
    model = models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN)
    tokenizer = Tokenizer(model)
    words = sorted((w for w in vocabulary if len(w) > 1 and w not in SPECIAL_TOKENS), key=len, reverse=True)
    pattern = "|".join(re.escape(w) for w in words) + r"|[\s\S]"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   eos_token=IM_END, bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast
