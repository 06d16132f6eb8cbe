"""Models: built-in tiny presets, local Hugging Face folders, and the hidden-state forward pass.

The trainer never asks a model for logits: :func:`hidden_states` calls the model body (the decoder stack
with its final norm) and :func:`output_head` returns the output projection (or the tied embedding) with what
the model does to its logits after it (read by ``sod_kernels.hf``): a logit scale (Cohere ``logit_scale``,
Granite ``1 / logits_scaling``, Falcon-H1 ``lm_head_multiplier``), folded into the hidden states exactly,
and a final soft-cap (Gemma 2/3 ``final_logit_softcapping``), passed to the fused losses.  A local model
folder is checked once when it is loaded: the trainer's logits (hidden states, lm_head, scale, cap) must
reproduce the model's own, or the folder is refused (a model that post-processes its logits in another way,
or an lm_head with a bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from sod_kernels import hf as sod_hf

from .tokenizer import build_task_tokenizer

PRESET_PREFIX = "tiny-"
ROPE_THETA = 10000.0
MAX_POSITIONS = 1024
# Tolerance of the load-time check that the trainer's logits reproduce the model's own, by weight dtype.
LOGIT_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}
# generation_config.json entries that do not change which distribution a token is sampled from.
GENERATION_NEUTRAL_KEYS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                                     "transformers_version", "_from_model_config", "max_length", "max_new_tokens",
                                     "use_cache", "cache_implementation", "do_sample", "temperature",
                                     # what generate returns, not what it samples
                                     "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                                     "return_dict_in_generate"})


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
    """A preset name or a local Hugging Face model folder (never downloads).

    A folder's model is checked once (:func:`check_model_logits`): a model whose logits the trainer would not
    reproduce is refused with a ``ValueError`` naming the folder.
    """
    if is_preset(spec):
        return build_preset(spec, tokenizer, seed).to(dtype)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be a preset {sorted(PRESETS)} or an existing local model folder, got "
                         f"{spec!r}")
    _check_folder(path, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"model folder {spec!r}: cannot load a causal LM from it: {_first_line(error)}") from None
    check_model_logits(model, spec)
    return model


def _check_folder(path: Path, spec: str) -> None:
    if not (path / "config.json").is_file():
        raise ValueError(f"model folder {spec!r} has no config.json; it must be a Hugging Face model folder "
                         f"(save_pretrained) or a preset {sorted(PRESETS)}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0].strip() if text else ''}"


def check_model_logits(model: PreTrainedModel, name: str) -> sod_hf.LogitProcessing:
    """Refuse (``ValueError`` naming ``name``) a model whose logits the trainer does not reproduce: the final
    hidden states through :func:`output_head` (lm_head, logit scale, soft-cap) must give ``model(ids).logits``
    on a short input.  Returns the model's logit processing."""
    output_head(model, name)
    tolerance = LOGIT_CHECK_TOLERANCE.get(next(model.parameters()).dtype, 1e-2)
    was_training = model.training
    model.eval()
    try:
        return sod_hf.check_logit_processing(model, atol=tolerance, rtol=tolerance)
    except ValueError as error:
        raise ValueError(f"model {name!r}: {error}") from None
    finally:
        model.train(was_training)
def load_tokenizer(spec: str):
    """The task tokenizer for presets; the folder's own tokenizer for a local Hugging Face model."""
    if is_preset(spec):
        return build_task_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model must be a preset {sorted(PRESETS)} or an existing local model folder, got "
                         f"{spec!r}")
    _check_folder(path, spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"model folder {spec!r}: cannot load its tokenizer: {_first_line(error)}") from None
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


@dataclass(frozen=True)
class OutputHead:
    """The output projection of a causal LM and what the model does to its logits.

    weight:  ``[V, H]`` (the tied input embedding when the model ties them; gradients reach it either way).
    scale:   the model multiplies its logits by it (1.0: no scale); :meth:`fold` moves it into the hidden
             states, ``s (h W^T) = (s h) W^T``.
    softcap: the model's final soft-cap ``c tanh(z / c)`` (after the scale), or None; the fused losses take it
             as ``student_softcap`` / ``teacher_softcap`` / ``softcap``.
    """

    weight: torch.Tensor
    scale: float = 1.0
    softcap: float | None = None

    def fold(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` with the logit scale folded in (itself when the scale is 1); differentiable."""
        return hidden if self.scale == 1.0 else hidden * self.scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits from final hidden states, materialized (``[..., V]``; small batches only)."""
        logits = self.fold(hidden) @ self.weight.T
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


def output_head(model: PreTrainedModel, name: str | None = None) -> OutputHead:
    """The lm_head weight ``[V, H]``, logit scale and soft-cap of ``model`` (``sod_kernels.hf`` reads them
    from its config).  A ``ValueError`` (naming ``name`` or the model class) if it has no lm_head or the
    lm_head has a bias (the trainer's losses do not take one)."""
    who = name or type(model).__name__
    try:
        head = sod_hf.lm_head(model)
    except TypeError as error:
        raise ValueError(f"model {who!r} has no usable lm_head: {error}") from None
    if head.bias is not None:
        raise ValueError(f"model {who!r}: its lm_head has a bias, which the trainer does not pass to the losses")
    return OutputHead(weight=head.weight, scale=head.processing.scale, softcap=head.processing.softcap)


def lm_head_weight(model: PreTrainedModel) -> torch.Tensor:
    """The output projection ``[V, H]`` (the tied input embedding when the model ties them); see
    :func:`output_head` for the logit scale and soft-cap that go with it."""
    return output_head(model).weight


def describe_logit_processing(head: OutputHead) -> str:
    """``"logit scale 0.125, soft-cap 30"``-style text, or ``"none"``."""
    parts = ([f"logit scale {head.scale:g}"] if head.scale != 1.0 else []) + \
        ([f"soft-cap {head.softcap:g}"] if head.softcap is not None else [])
    return ", ".join(parts) or "none"


def ignored_generation_settings(model: PreTrainedModel) -> dict:
    """The entries of the model's ``generation_config`` that would change the sampling distribution
    (``repetition_penalty``, ``top_k``, ``suppress_tokens``...), which the rollouts do not apply."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    return {k: v for k, v in sorted(config.to_diff_dict().items()) if k not in GENERATION_NEUTRAL_KEYS}


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
