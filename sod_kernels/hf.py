"""Hugging Face helpers: from a ``transformers`` causal LM and a batch to the inputs of the fused losses.

``transformers`` is an optional dependency: this module imports nothing from it, it only calls the model
objects it is given, so ``import sod_kernels.hf`` works without it.

What the fused losses need from a causal LM, and what this module gets right:

- the **final hidden states** (the lm_head's input, after the last norm), from the model body alone, so
  that no ``tokens x vocabulary`` logits are ever computed (:func:`final_hidden_states`);
- the **lm_head** weight ``[V, H]`` and bias: the tied input embedding when the model ties them, a padded
  vocabulary as it is (:func:`lm_head`);
- what the model does to its logits after the lm_head: a **logit scale** (Cohere ``logit_scale``, Granite
  ``1 / logits_scaling``, Falcon-H1 ``lm_head_multiplier``...) is folded into the hidden states exactly;
  a **final soft-cap** (Gemma 2/3 ``final_logit_softcapping``) is passed to the fused losses, which apply
  it inside their kernels (``student_softcap`` / ``teacher_softcap`` / ``softcap``)
  (:func:`logit_processing`, :func:`check_logit_processing`);
- the **one-token shift**: the hidden state at position ``t`` predicts token ``t + 1``, so the loss pairs
  ``hidden[:, :-1]`` with ``input_ids[:, 1:]`` and with the mask of those target tokens
  (:func:`shift_for_next_token`, which also refuses tensors that look shifted already);
- **steps from a chat**: one step per assistant message (:func:`chat_step_ids`, in
  :mod:`sod_kernels.hf_chat`).

:func:`distillation_inputs` puts it together: ``fused_sod_loss(**distillation_inputs(student, teacher,
input_ids, attention_mask, response_mask=...))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .core.validation import check_binary_mask, check_positive, check_shape, check_tensor
from .hf_chat import ChatSteps, chat_step_ids
from .logprobs.token_logprobs import fused_token_logprobs

__all__ = [
    "ChatSteps",
    "LMHead",
    "LogitProcessing",
    "ShiftedTokens",
    "check_logit_processing",
    "chat_step_ids",
    "distillation_inputs",
    "final_hidden_states",
    "fold_logit_scale",
    "lm_head",
    "logit_processing",
    "model_body",
    "refuse_softcap",
    "sampled_token_logprobs",
    "shift_for_next_token",
]


# ------------------------------------------------------------------------------------------- logits
@dataclass(frozen=True)
class LogitProcessing:
    """What a model applies to ``hidden @ weight.T + bias`` before its softmax.

    scale:   the logits are multiplied by it (1.0 when the model does not scale them).
    softcap: ``softcap * tanh(logits / softcap)`` after the scale, or None.
    """

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the lm_head output ``logits`` (any shape)."""
        out = logits * self.scale if self.scale != 1.0 else logits
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out


def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _positive_float(value, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: config.{name} must be a finite number > 0, got {value!r}")
    return float(value)


def logit_processing(model_or_config) -> LogitProcessing:
    """Read the logit scale and final soft-cap from a model or its config (the text config of a VLM).

    Recognized config fields: ``logit_scale`` (multiplies; Cohere), ``output_multiplier`` (multiplies),
    ``lm_head_multiplier`` (multiplies; Falcon-H1), ``logits_scaling`` (divides, as in Granite; multiplies
    for ``model_type == "hyperclovax"``), ``final_logit_softcapping`` (Gemma 2/3 and others). A field set to
    None means "not applied". :func:`check_logit_processing` verifies the result against the model's own
    logits, which catches a model that processes its logits in a way not listed here.
    """
    config = _text_config(model_or_config)
    source = type(config).__name__
    scale = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            scale = _positive_float(value, name, source)
            break
    else:
        value = getattr(config, "logits_scaling", None)
        if value is not None:
            value = _positive_float(value, "logits_scaling", source)
            scale = value if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / value
    cap = getattr(config, "final_logit_softcapping", None)
    softcap = None if cap is None else _positive_float(cap, "final_logit_softcapping", source)
    return LogitProcessing(scale=scale, softcap=softcap)


# ------------------------------------------------------------------------------------------- model parts
@dataclass
class LMHead:
    """The output projection of a causal LM.

    weight:     ``[V, H]`` (the input embedding when the model ties them; gradients reach it either way).
    bias:       ``[V]`` or None.
    processing: the model's :class:`LogitProcessing`.
    V may exceed the tokenizer's length (a padded vocabulary); the fused losses accept a teacher whose V is
    at least the student's and use the first ``Vs`` rows.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    processing: LogitProcessing

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


def _unwrap(model):
    """A PEFT-wrapped model's underlying transformers model (adapters stay active inside it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_head(model) -> LMHead:
    """The lm_head weight, bias and logit processing of a causal LM (``model.get_output_embeddings()``)."""
    model = _unwrap(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() gave "
                        f"{type(head).__name__}); pass a causal LM with an lm_head")
    if head.weight.dim() != 2:
        raise ValueError(f"{type(model).__name__}'s lm_head weight must be 2-D [V, H], got {tuple(head.weight.shape)}")
    return LMHead(weight=head.weight, bias=getattr(head, "bias", None), processing=logit_processing(model))


def model_body(model) -> torch.nn.Module:
    """The model without its lm_head: ``model.base_model`` (``model.model`` for Llama/Qwen-style models),
    else ``model.get_decoder()``."""
    model = _unwrap(model)
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        get_decoder = getattr(model, "get_decoder", None)
        body = get_decoder() if callable(get_decoder) else None
    if body is None or body is model:
        raise TypeError(f"cannot find the body of {type(model).__name__} (neither base_model nor get_decoder() "
                        "gives a module other than the model itself)")
    return body


_RESERVED_MODEL_KWARGS = ("input_ids", "attention_mask", "use_cache")


def _refuse_unknown(function: str, unknown: dict) -> None:
    """``TypeError`` naming keyword arguments a helper does not take. A ``transformers`` model ignores keys it
    does not know, so forwarding them would drop a misspelled or misplaced option silently."""
    if unknown:
        names = ", ".join(repr(k) for k in sorted(unknown))
        raise TypeError(f"{function}() got unexpected keyword argument(s) {names}; inputs for the model body go in "
                        "model_kwargs={...} (e.g. position_ids), options of the fused losses are passed to them")


def _model_kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError("model_kwargs must be a mapping of extra model inputs or None, got "
                        f"{type(model_kwargs).__name__}")
    clash = [k for k in model_kwargs if k in _RESERVED_MODEL_KWARGS]
    if clash:
        raise TypeError(f"model_kwargs must not hold {clash}: input_ids and attention_mask are arguments of their "
                        "own, and use_cache is always False")
    return dict(model_kwargs)


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        model_kwargs: Mapping[str, Any] | None = None, **unknown: Any) -> torch.Tensor:
    """``[B, L, H]`` hidden states after the final norm (the lm_head's input), without computing logits.

    Args:
        model: a ``transformers`` causal LM (or a PEFT model wrapping one).
        input_ids: ``[B, L]`` int64.
        attention_mask: ``[B, L]`` 0/1 or None.
        model_kwargs: more inputs for the model body (``{"position_ids": ...}``), or None.
    Returns:
        The body's ``last_hidden_state`` in the model's dtype; gradients flow as through the model.
    Raises:
        TypeError: any other keyword argument (the model would ignore it silently).
    """
    _refuse_unknown("final_hidden_states", unknown)
    extra = _model_kwargs(model_kwargs)
    check_tensor(input_ids, "input_ids", ndim=(2,), integer=True)
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask", ndim=(2,))
        check_shape(attention_mask, "attention_mask", tuple(input_ids.shape), "the shape of input_ids")
    out = model_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = getattr(out, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"the body of {type(_unwrap(model)).__name__} returned no last_hidden_state")
    return hidden


def check_logit_processing(model, input_ids: torch.Tensor | None = None, *, atol: float = 1e-4,
                           rtol: float = 1e-4) -> LogitProcessing:
    """Verify that ``processing.apply(hidden @ W.T + b)`` reproduces ``model(input_ids).logits``.

    Runs the model once with logits on a short input (default: 8 tokens of one row); raises ``ValueError``
    naming the model when they differ, i.e. when the model transforms its logits in a way
    :func:`logit_processing` does not know. Returns the verified :class:`LogitProcessing`.
    """
    head = lm_head(model)
    if input_ids is None:
        input_ids = torch.arange(8, device=head.weight.device).remainder(head.vocab_size).unsqueeze(0)
    with torch.no_grad():
        hidden = final_hidden_states(model, input_ids)
        logits = torch.nn.functional.linear(hidden.float(), head.weight.float(),
                                            None if head.bias is None else head.bias.float())
        expected = model(input_ids=input_ids, use_cache=False).logits.float()
        rebuilt = head.processing.apply(logits)
    if expected.shape != rebuilt.shape or not torch.allclose(rebuilt, expected, atol=atol, rtol=rtol):
        worst = (rebuilt - expected).abs().max().item() if expected.shape == rebuilt.shape else float("nan")
        raise ValueError(f"{type(_unwrap(model)).__name__}: hidden @ lm_head.weight.T with {head.processing} does not "
                         f"reproduce the model's logits (max abs difference {worst:.3g}); the model post-processes "
                         "its logits in a way the fused losses do not cover")
    return head.processing


def refuse_softcap(head: LMHead, who: str) -> None:
    """``ValueError`` naming ``who`` (e.g. "student") when the model soft-caps its logits: for a caller that
    does not pass the cap on (the fused losses take it as ``student_softcap`` / ``teacher_softcap`` /
    ``softcap``; :func:`distillation_inputs` and :func:`sampled_token_logprobs` do)."""
    if head.processing.softcap is not None:
        raise ValueError(f"the {who} model soft-caps its logits (final_logit_softcapping="
                         f"{head.processing.softcap}) and this caller does not pass the cap to the fused losses "
                         "(their student_softcap / teacher_softcap / softcap arguments); it would train on "
                         "different logits")


def fold_logit_scale(hidden: torch.Tensor, head: LMHead) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold the model's logit scale into ``hidden`` (``[..., H]``) and the bias: ``s (h W^T + b) = (s h) W^T + s b``.

    Returns ``(hidden, bias)``, unchanged when the scale is 1; the product is differentiable.
    """
    s = head.processing.scale
    if s == 1.0:
        return hidden, head.bias
    return hidden * s, None if head.bias is None else head.bias * s


# ------------------------------------------------------------------------------------------- the shift
@dataclass
class ShiftedTokens:
    """Tensors aligned for next-token prediction (length ``L - 1``).

    hidden:        ``[B, L-1, H]`` hidden states of positions ``0..L-2`` (None if none were given).
    target_ids:    ``[B, L-1]`` the tokens they predict, ``input_ids[:, 1:]``.
    response_mask: ``[B, L-1]`` 1 where the predicted token was generated (None if step ids were given).
    step_ids:      ``[B, L-1]`` step index of the predicted token, -1 elsewhere (None if a mask was given).
    """

    hidden: torch.Tensor | None
    target_ids: torch.Tensor
    response_mask: torch.Tensor | None
    step_ids: torch.Tensor | None


def shift_for_next_token(input_ids: torch.Tensor, *, hidden: torch.Tensor | None = None,
                         response_mask: torch.Tensor | None = None, step_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None) -> ShiftedTokens:
    """Align per-token tensors of a sequence for next-token losses: ``hidden[:, t]`` predicts ``input_ids[:, t+1]``.

    Every argument is *unshifted*: one entry per token of ``input_ids [B, L]`` (``hidden [B, L, H]``,
    ``response_mask`` / ``step_ids [B, L]`` describing the tokens themselves: 1 = the student generated this
    token). Exactly one of ``response_mask`` and ``step_ids``. Refused as probably shifted already:
    per-token tensors one position shorter than ``input_ids``, and a generated token at position 0 (nothing
    precedes the first token, so no position predicts it). With ``attention_mask``, a generated token on
    padding is refused too.
    """
    check_tensor(input_ids, "input_ids", ndim=(2,), integer=True)
    B, L = input_ids.shape
    if L < 2:
        raise ValueError(f"input_ids must hold at least 2 tokens per row to predict one, got shape {(B, L)}")
    if (response_mask is None) == (step_ids is None):
        raise ValueError("give exactly one of response_mask and step_ids")
    name, per_token = ("response_mask", response_mask) if response_mask is not None else ("step_ids", step_ids)
    for what, x in ((name, per_token), ("hidden", hidden)):
        if x is not None and x.dim() >= 2 and tuple(x.shape[:2]) == (B, L - 1):
            raise ValueError(f"{what} has {L - 1} positions for {L} input_ids: it looks shifted already; pass "
                             "unshifted tensors (one entry per token of input_ids), this function shifts them")
    check_tensor(per_token, name, ndim=(2,), integer=name == "step_ids" or None)
    check_shape(per_token, name, (B, L), "one entry per token of input_ids")
    if hidden is not None:
        check_tensor(hidden, "hidden", ndim=(3,), floating=True)
        check_shape(hidden, "hidden", (B, L, hidden.shape[-1]), "[B, L, H] for input_ids [B, L]")
    generated = per_token != 0 if name == "response_mask" else per_token >= 0
    if name == "response_mask":
        check_binary_mask(per_token, "response_mask")
    if bool(generated[:, 0].any()):
        raise ValueError(f"{name} marks the first token of a row as generated, but no position predicts the first "
                         "token; the tensor is probably shifted already (pass it unshifted: entry t describes "
                         "input_ids[:, t])")
    if attention_mask is not None:
        check_shape(attention_mask, "attention_mask", (B, L), "the shape of input_ids")
        if bool((generated & (attention_mask == 0)).any()):
            raise ValueError(f"{name} marks padding tokens (attention_mask 0) as generated; the mask and the "
                             "tokens are misaligned")
    return ShiftedTokens(hidden=None if hidden is None else hidden[:, :-1], target_ids=input_ids[:, 1:],
                         response_mask=None if response_mask is None else response_mask[:, 1:],
                         step_ids=None if step_ids is None else step_ids[:, 1:])


# ------------------------------------------------------------------------------------------- loss inputs
def distillation_inputs(student, teacher, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                        response_mask: torch.Tensor | None = None, step_ids: torch.Tensor | None = None,
                        model_kwargs: Mapping[str, Any] | None = None,
                        **unknown: Any) -> dict[str, torch.Tensor | float | None]:
    """Keyword arguments of :func:`sod_kernels.fused_sod_loss` for a student and a teacher causal LM.

    Runs both model bodies on ``input_ids [B, L]`` (the teacher under ``torch.no_grad``), folds each
    model's logit scale into its hidden states and bias, passes each model's final soft-cap on, and shifts
    by one token.

    Args:
        student, teacher: ``transformers`` causal LMs on one device (any hidden sizes; the teacher's
            vocabulary at least the student's).
        input_ids: ``[B, L]`` prompt + rollout tokens; attention_mask ``[B, L]`` or None.
        response_mask: ``[B, L]`` 0/1, 1 on tokens the student generated (unshifted), or
        step_ids: ``[B, L]`` int64 step index of each generated token, -1 elsewhere (unshifted; e.g.
            :func:`chat_step_ids`). Exactly one of the two.
        model_kwargs: more inputs for both bodies (``{"position_ids": ...}``), or None.
    Returns:
        ``{"student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
        "teacher_bias", "target_ids", and "response_mask" or "step_ids"}``, all ``L - 1`` long, plus
        ``"student_softcap"`` / ``"teacher_softcap"`` (a float) for a model that soft-caps its logits
        (``final_logit_softcapping``; applied after the folded logit scale, as the model does).
    Raises:
        ValueError: the tensors look shifted already.
        TypeError: any other keyword argument (options such as ``temperature`` or ``divergence`` belong to
            :func:`sod_kernels.fused_sod_loss`; a model would ignore them silently).
    """
    _refuse_unknown("distillation_inputs", unknown)
    shifted = shift_for_next_token(input_ids, response_mask=response_mask, step_ids=step_ids,
                                   attention_mask=attention_mask)
    s_head, t_head = lm_head(student), lm_head(teacher)
    s_hidden = final_hidden_states(student, input_ids, attention_mask, model_kwargs=model_kwargs)[:, :-1]
    s_hidden, s_bias = fold_logit_scale(s_hidden, s_head)
    with torch.no_grad():
        t_hidden = final_hidden_states(teacher, input_ids, attention_mask, model_kwargs=model_kwargs)[:, :-1]
        t_hidden, t_bias = fold_logit_scale(t_hidden, t_head)
    inputs: dict[str, torch.Tensor | float | None] = {
        "student_hidden": s_hidden, "student_weight": s_head.weight, "student_bias": s_bias,
        "teacher_hidden": t_hidden, "teacher_weight": t_head.weight.detach(),
        "teacher_bias": None if t_bias is None else t_bias.detach(), "target_ids": shifted.target_ids,
    }
    if shifted.response_mask is not None:
        inputs["response_mask"] = shifted.response_mask
    else:
        inputs["step_ids"] = shifted.step_ids
    for key, head in (("student_softcap", s_head), ("teacher_softcap", t_head)):
        if head.processing.softcap is not None:
            inputs[key] = head.processing.softcap
    return inputs


def sampled_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                           temperature: float = 1.0, backend: str = "auto",
                           model_kwargs: Mapping[str, Any] | None = None, **unknown: Any) -> torch.Tensor:
    """``[B, L-1]`` log-probability of each next token, ``log softmax(logits[:, t] / tau)[input_ids[:, t+1]]``.

    Through :func:`sod_kernels.fused_token_logprobs` on the final hidden states (no logits materialized),
    with the model's logit scale folded in and its final soft-cap applied inside the kernels.
    Differentiable when called with gradients enabled; float32 (float64 for a float64 model).
    ``model_kwargs``: more inputs for the model body (``{"position_ids": ...}``), or None; any other keyword
    argument raises ``TypeError``.
    """
    _refuse_unknown("sampled_token_logprobs", unknown)
    check_positive(temperature, "temperature")
    head = lm_head(model)
    hidden = final_hidden_states(model, input_ids, attention_mask, model_kwargs=model_kwargs)[:, :-1]
    hidden, bias = fold_logit_scale(hidden, head)
    return fused_token_logprobs(hidden, head.weight, input_ids[:, 1:], bias=bias, temperature=temperature,
                                backend=backend, softcap=head.processing.softcap)
