"""Models: built-in tiny presets, local Hugging Face folders, and the hidden-state forward pass.

The trainer never asks a model for logits: :func:`hidden_states` calls the model body (the decoder stack
with its final norm) and :func:`lm_head_weight` returns the output projection (or the tied embedding),
which ``sod_kernels`` turns into the loss without materializing tokens x vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from .tokenizer import build_task_tokenizer

PRESET_PREFIX = "tiny-"
ROPE_THETA = 10000.0
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class TinyPreset:
    """Size of a built-in Qwen3-architecture model."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    intermediate_size: int


PRESETS = {
    "tiny-teacher": TinyPreset(hidden_size=96, layers=3, heads=4, kv_heads=2, intermediate_size=256),
    "tiny-student": TinyPreset(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=192),
}


def is_preset(name: str) -> bool:
    """Whether ``name`` names a built-in preset (``tiny-teacher``, ``tiny-student``)."""
    return name in PRESETS


def build_preset(name: str, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialised (seeded) Qwen3 model of preset ``name`` sized to ``tokenizer``."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {sorted(PRESETS)}, got {name!r}")
    p = PRESETS[name]
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=p.hidden_size, num_hidden_layers=p.layers,
                         num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                         head_dim=p.hidden_size // p.heads, intermediate_size=p.intermediate_size,
                         max_position_embeddings=MAX_POSITIONS, rope_theta=ROPE_THETA, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    return model


def load_model(spec: str, tokenizer, seed: int, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A preset name or a local Hugging Face model folder (never downloads)."""
    if is_preset(spec):
        return build_preset(spec, tokenizer, seed).to(dtype)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be a preset {sorted(PRESETS)} or an existing local model folder, got "
                         f"{spec!r}")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)


def load_tokenizer(spec: str):
    """The task tokenizer for presets; the folder's own tokenizer for a local Hugging Face model."""
    if is_preset(spec):
        return build_task_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be a preset {sorted(PRESETS)} or an existing local model folder, got "
                         f"{spec!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer of {spec!r} has no chat template; the rollout needs one")
    return tokenizer


def decoder_body(model: PreTrainedModel) -> torch.nn.Module:
    """The model without its lm_head (``model.model`` for Llama/Qwen-style models)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "model", None)
    if body is None:
        raise ValueError(f"cannot find the decoder body of {type(model).__name__} (no get_decoder() or .model)")
    return body


def hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` (after the last norm), without computing any logits."""
    out = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The output projection ``[V, H]`` (the tied input embedding when the model ties them)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s lm_head has a bias; pass it to the loss (not supported here)")
    return head.weight


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
