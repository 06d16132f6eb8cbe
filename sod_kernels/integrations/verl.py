"""Drop-ins for the SOD authors' verl code path, vectorized, and the actor's log-probs / PPO loss fused.

The authors' trainer (a verl fork) computes, on the driver after the GRPO advantages:

- ``compute_stepwise_opd_weights(old_log_probs, ref_log_prob, response_mask, epsilon, delta)``: a Python loop
  over rows and tokens that cuts each response into steps (maximal runs of ``response_mask == 1``), takes
  ``d_k`` = step mean of ``|old_log_probs - ref_log_prob|`` (``ref_log_prob`` holds the *teacher's* log-probs
  there) and gives step k the weight ``min(prod_{u<k} (d_u + eps) / (d_{u+1} + eps), 1 + delta)``;
- ``RayPPOTrainer._apply_token_kl_regularizer(batch, cfg)``: adds ``opd_coef * w * (ref - old) * m`` to the
  advantages (``cfg`` = ``algorithm.token_kl_reg``; their ``run_sod.sh`` passes ``stepwise_delta=0.2``).

:func:`compute_stepwise_opd_weights` and :func:`apply_token_kl_regularizer` here have the same inputs,
outputs and defaults (including ``delta=0.5``, the default of their function and config; their script
overrides it), computed with the vectorized helpers of :mod:`sod_kernels.steps` instead of per-token loops.
:func:`actor_log_probs` and :func:`actor_policy_loss` replace the actor's ``logits -> log_softmax -> gather``
and ``compute_policy_loss`` on a micro-batch with :func:`sod_kernels.fused_token_logprobs` /
:func:`sod_kernels.fused_sod_policy_loss` on the model's final hidden states; they follow verl 0.9.1's
``compute_policy_loss_vanilla`` and ``agg_loss`` (the release they are tested against; the sequence-mean
modes changed in verl 0.8: see :func:`actor_policy_loss`).

Where the driver functions differ from the authors' fork: a gated-form configuration without ``beta_max``
raises ``ValueError`` here (their method returns the batch unchanged, so a missing key silently disables
the regularizer), and ``[B]`` advantages are read as one advantage per row in both forms.

Batches: a verl ``DataProto`` or anything shaped like it (``.batch``, a mapping of ``[B, ...]`` tensors, and
``.meta_info``, a dict), or a plain dict of tensors (then the meta information goes to its ``"meta_info"``
entry). Only ``torch`` is imported; verl itself is not needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import hf
from ..core.validation import check_binary_mask, check_choice, check_positive, check_shape, check_tensor
from ..logprobs.policy_loss import fused_sod_policy_loss
from ..steps.weights import sod_step_statistics
from ..logprobs.token_logprobs import fused_token_logprobs

__all__ = ["actor_log_probs", "actor_policy_loss", "apply_token_kl_regularizer", "compute_stepwise_opd_weights"]

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
VERL_VERSION = "0.9.1"  # the verl release whose loss aggregation and PPO loss the actor side follows (tested)


# ------------------------------------------------------------------------------------------- driver side
def compute_stepwise_opd_weights(old_log_probs: torch.Tensor, ref_log_prob: torch.Tensor,
                                 response_mask: torch.Tensor, epsilon: float = 1e-6, delta: float = 0.5, *,
                                 log_info: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """Per-token SOD step weights of the authors' trainer, vectorized.

    Args:
        old_log_probs: ``[B, R]`` the student's (rollout policy's) log-probs of the response tokens.
        ref_log_prob: ``[B, R]`` the teacher's log-probs of the same tokens.
        response_mask: ``[B, R]`` 0/1 (1 = token the student generated; 0 = tool output, padding).
        epsilon, delta: ``w_k = min((d_1 + eps) / (d_k + eps), 1 + delta)`` (the running product of Eq. 7
            telescopes to this closed form; the cap applies to the output only in both).
        log_info: False skips building the per-row Python dicts (returns an empty list).
    Returns:
        ``(weights, info)``: ``weights`` ``[B, R]`` float32 on the inputs' device (0 outside steps); ``info``
        one dict per row: ``n_steps``, ``d_values``, ``w_values``, ``n_tokens_per_step`` and ``boundaries``
        (``(start, end)`` of each step, end exclusive), Python numbers as in the authors' log.
    """
    check_tensor(response_mask, "response_mask", ndim=(2,))
    stats = sod_step_statistics(old_log_probs, ref_log_prob, response_mask, epsilon, delta)
    weights = stats.token_weights.to(torch.float32)
    if not log_info:
        return weights, []
    B = response_mask.shape[0]
    K = int(stats.num_steps.max()) if B else 0
    inside = response_mask != 0
    starts = inside.clone()
    starts[:, 1:] &= ~inside[:, :-1]  # first token of each step
    step_ids = torch.cumsum(starts, dim=1).sub_(1).masked_fill_(~inside, -1)
    counts = torch.zeros(B, K + 1, dtype=torch.int64, device=step_ids.device)
    counts = counts.scatter_add_(1, step_ids + 1, torch.ones_like(step_ids))[:, 1:].tolist()
    start_positions = [torch.nonzero(row).squeeze(1).tolist() for row in starts.cpu()]
    d_rows, w_rows = stats.step_divergence.tolist(), stats.step_weights.tolist()
    info = []
    for b, n in enumerate(stats.num_steps.tolist()):
        info.append({"n_steps": n, "d_values": d_rows[b][:n], "w_values": w_rows[b][:n],
                     "n_tokens_per_step": counts[b][:n],
                     "boundaries": [(s, s + c) for s, c in zip(start_positions[b], counts[b][:n])]})
    return weights, info


def _option(cfg, name: str, default):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _parts(batch) -> tuple[Any, dict]:
    """(tensor mapping, meta-info dict) of a DataProto-like object or a plain dict."""
    if hasattr(batch, "batch") and hasattr(batch, "meta_info"):
        if batch.meta_info is None:
            batch.meta_info = {}
        return batch.batch, batch.meta_info
    if isinstance(batch, dict):
        return batch, batch.setdefault("meta_info", {})
    raise TypeError(f"batch must be a verl DataProto (with .batch and .meta_info) or a dict of tensors, got "
                    f"{type(batch).__name__}")


def apply_token_kl_regularizer(batch, cfg, *, stepwise_log: Callable[[list, float, float, float], Any] | None = None):
    """The authors' ``_apply_token_kl_regularizer``: add the (step-weighted) OPD term to the advantages in place.

    Args:
        batch: DataProto-like with ``responses``-aligned ``[B, R]`` tensors ``response_mask``,
            ``old_log_probs``, ``ref_log_prob`` (the teacher's) and ``advantages`` (``[B, R]`` or ``[B]``).
        cfg: ``algorithm.token_kl_reg`` (attributes or a mapping): ``enable``, ``stepwise_enable``,
            ``stepwise_epsilon`` (1e-6), ``stepwise_delta`` (0.5), ``stepwise_opd_coef`` (1.0); without
            ``stepwise_enable`` the gated form reads ``gamma`` (1.0), ``beta_min`` (0.0), ``beta_max``.
        stepwise_log: called as ``stepwise_log(info, epsilon, delta, opd_coef)`` with the per-row info of
            :func:`compute_stepwise_opd_weights` (the authors' trainer writes it to a file).
    Raises:
        ValueError: the gated form without ``beta_max`` (the authors' method returns the batch unchanged
            then), advantages neither ``[B]`` nor ``[B, R]``, a non-binary mask or misshapen log-probs.
    Returns:
        ``batch``, unchanged when ``cfg`` is None or disabled or a tensor is missing. Step-wise:
        ``advantages = A + opd_coef * w * (ref - old) * m`` (``A[:, None]`` for ``[B]`` advantages), and
        ``meta_info["token_kl_reg"]`` gets ``stepwise_weights`` and ``local_adv`` (``(ref - old) * m``).
        Gated: ``a = masked row mean of A``, ``beta = beta_min + (beta_max - beta_min) sigmoid(-gamma a)``,
        ``advantages = a[:, None] + beta[:, None] * (ref - old) * m``; ``meta_info`` gets ``beta_jk``, ``local_adv``.
        ``[B]`` advantages are one value per row in both forms (the gated row mean of a row is then its value).
    """
    if cfg is None or not _option(cfg, "enable", False):
        return batch
    tensors, meta = _parts(batch)
    if "advantages" not in tensors or "ref_log_prob" not in tensors or "old_log_probs" not in tensors:
        return batch
    mask = tensors["response_mask"]
    old, ref, advantages = tensors["old_log_probs"], tensors["ref_log_prob"], tensors["advantages"]
    check_binary_mask(mask, "response_mask")
    check_shape(old, "old_log_probs", tuple(mask.shape), "the shape of response_mask")
    check_shape(ref, "ref_log_prob", tuple(mask.shape), "the shape of response_mask")
    check_tensor(advantages, "advantages", ndim=(1, 2))
    expected = tuple(mask.shape[:advantages.dim()])
    check_shape(advantages, "advantages", expected, "[B] (one per row) or [B, R] like response_mask")
    # One advantage per row ([B]) is the same as that value at every token of the row.
    per_token = advantages.unsqueeze(1).expand(mask.shape) if advantages.dim() == 1 else advantages
    local_adv = (ref - old) * mask
    record = meta.setdefault("token_kl_reg", {})
    if _option(cfg, "stepwise_enable", False):
        epsilon = float(_option(cfg, "stepwise_epsilon", 1e-6))
        delta = float(_option(cfg, "stepwise_delta", 0.5))
        opd_coef = float(_option(cfg, "stepwise_opd_coef", 1.0))
        weights, info = compute_stepwise_opd_weights(old, ref, mask, epsilon, delta, log_info=stepwise_log is not None)
        weights = weights.to(local_adv.device)
        if stepwise_log is not None:
            stepwise_log(info, epsilon, delta, opd_coef)
        weighted = opd_coef * weights * local_adv
        tensors["advantages"] = per_token + weighted
        record.update({"stepwise_weights": weights.detach().clone(), "local_adv": local_adv.detach().clone()})
        return batch
    beta_max = _option(cfg, "beta_max", None)
    if beta_max is None:
        raise ValueError("token_kl_reg.beta_max must be set when stepwise_enable is false (the gated OPD form)")
    beta_min, gamma = float(_option(cfg, "beta_min", 0.0)), float(_option(cfg, "gamma", 1.0))
    if float(beta_max) <= beta_min:
        return batch
    m = mask.to(per_token.dtype)
    base = (per_token * m).sum(1) / (m.sum(1) + 1e-8)
    beta = beta_min + (float(beta_max) - beta_min) * torch.sigmoid(-gamma * base)
    tensors["advantages"] = base.unsqueeze(1) + beta.unsqueeze(1) * local_adv
    record.update({"beta_jk": beta.detach().clone(), "local_adv": local_adv.detach().clone()})
    return batch


# ------------------------------------------------------------------------------------------- actor side
def _response_hidden(model, micro_batch: Mapping):
    """Final hidden states of the positions that predict the response tokens, lm_head weight and bias."""
    responses = micro_batch["responses"]
    check_tensor(responses, "responses", ndim=(2,), integer=True)
    R = responses.shape[1]
    input_ids = micro_batch["input_ids"]
    if input_ids.shape[1] <= R:
        raise ValueError(f"input_ids ({tuple(input_ids.shape)}) must hold the prompt and the {R} response tokens")
    if not torch.equal(input_ids[:, -R:], responses):
        raise ValueError("responses must equal the last R tokens of input_ids (prompt + response, verl's layout)")
    extra = {"position_ids": micro_batch["position_ids"]} if micro_batch.get("position_ids") is not None else {}
    hidden = hf.final_hidden_states(model, input_ids, micro_batch.get("attention_mask"), model_kwargs=extra)
    head = hf.lm_head(model)
    hidden, bias = hf.fold_logit_scale(hidden[:, -R - 1:-1], head)
    return hidden, head.weight, bias, head.processing.softcap


def actor_log_probs(model, micro_batch: Mapping, *, temperature: float = 1.0, return_entropy: bool = False,
                    backend: str = "auto"):
    """``[B, R]`` log-probs of ``micro_batch["responses"]`` under ``model`` at ``temperature``, fused.

    Replaces the actor's (or the reference/teacher worker's) ``logits / T -> log_softmax -> gather`` over
    ``input_ids [B, P + R]`` (with ``attention_mask`` and ``position_ids`` when present): the same numbers,
    without the ``[B, R, V]`` logits. With ``return_entropy`` also the entropy of each position's softmax at
    ``temperature`` (verl's ``calculate_entropy``), as ``(log_probs, entropy)``. Differentiable when
    gradients are enabled.
    """
    hidden, weight, bias, softcap = _response_hidden(model, micro_batch)
    return fused_token_logprobs(hidden, weight, micro_batch["responses"], bias=bias, temperature=temperature,
                                softcap=softcap,
                                return_entropy=return_entropy, backend=backend)


def _agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, *, dp_size: int, batch_num_tokens,
              global_batch_size, loss_scale_factor) -> torch.Tensor:
    """verl 0.9.1's ``agg_loss`` of a ``[B, R]`` per-token loss (0 off the mask), without its 0/0 NaNs."""
    m = (mask != 0).to(loss_mat.dtype)
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp_size
    if mode == "token-mean":
        tokens = m.sum().clamp(min=1) if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * m).sum() / tokens * dp_size
    counts = m.sum(-1)
    nonempty = (counts > 0).to(loss_mat.dtype)  # rows without a response token are left out of the means
    rows = nonempty.sum().clamp(min=1) if global_batch_size is None else global_batch_size
    if mode == "seq-mean-token-mean":
        seq = (loss_mat * m).sum(-1) / (counts + 1e-8)
        return (seq * nonempty).sum() / rows * dp_size
    loss = ((loss_mat * m).sum(-1) * nonempty).sum() / rows * dp_size
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def actor_policy_loss(model, micro_batch: Mapping, *, clip_ratio: float = 0.2, clip_ratio_low: float | None = None,
                      clip_ratio_high: float | None = None, clip_ratio_c: float = 3.0,
                      loss_agg_mode: str = "token-mean", temperature: float = 1.0,
                      loss_scale_factor: float | None = None, dp_size: int = 1, batch_num_tokens=None,
                      global_batch_size=None, backend: str = "auto") -> tuple[torch.Tensor, dict[str, float]]:
    """The actor's PPO dual-clip policy loss of one micro-batch, with the new log-probs computed fused.

    Follows verl 0.9.1 (``compute_policy_loss_vanilla`` with ``agg_loss``; tested against both as that
    release defines them).

    Args:
        model: the actor (a causal LM).
        micro_batch: ``input_ids``, ``attention_mask``, (``position_ids``), ``responses``, ``response_mask``,
            ``old_log_probs``, ``advantages`` (all ``[B, R]`` except the first three, ``[B, P + R]``).
        clip_ratio, clip_ratio_low, clip_ratio_high, clip_ratio_c, loss_agg_mode, loss_scale_factor: as in
            verl's actor config (low / high default to ``clip_ratio``); temperature: the rollout temperature.
        dp_size, batch_num_tokens, global_batch_size: verl's ``global_batch_info`` (data-parallel size, response
            tokens and rows of the global batch), for a loss normalized over the global batch; by default the
            micro-batch's own counts, as verl without them.
    Aggregation (``l`` the per-token loss, ``m`` the mask, rows without a response token left out of the
    sequence means, as verl does from 0.8 on; verl up to 0.6 averaged over all rows and divided
    ``seq-mean-token-sum-norm`` by ``R`` only): ``token-mean`` ``sum(m l) / sum(m)``; ``token-sum``
    ``sum(m l)``; ``seq-mean-token-sum`` mean over non-empty rows of ``sum_t m l``; ``seq-mean-token-mean``
    mean over non-empty rows of ``sum_t m l / sum_t m``; ``seq-mean-token-sum-norm`` the
    ``seq-mean-token-sum`` value divided by ``loss_scale_factor`` (default ``R``). A micro-batch without any
    response token gives 0 (verl gives NaN).
    Returns:
        ``(loss, metrics)`` with verl's metric names: ``actor/pg_loss``, ``actor/pg_clipfrac`` (share of tokens
        where a clip decided), ``actor/ppo_kl`` (mean of ``old - new``) and ``actor/pg_clipfrac_lower`` (dual
        clip).
    """
    check_choice(loss_agg_mode, "loss_agg_mode", LOSS_AGG_MODES)
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an int >= 1, got {dp_size!r}")
    if dp_size > 1 and loss_agg_mode == "token-mean" and batch_num_tokens is None:
        raise ValueError("batch_num_tokens (of the global batch) is required with dp_size > 1 and token-mean")
    if dp_size > 1 and loss_agg_mode.startswith("seq-mean") and global_batch_size is None:
        raise ValueError("global_batch_size is required with dp_size > 1 and the seq-mean modes")
    if loss_scale_factor is not None:
        check_positive(loss_scale_factor, "loss_scale_factor")
    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    hidden, weight, bias, softcap = _response_hidden(model, micro_batch)
    mask = micro_batch["response_mask"]
    fused_mean = loss_agg_mode == "token-mean" and batch_num_tokens is None and dp_size == 1
    stats = fused_sod_policy_loss(hidden, weight, micro_batch["responses"], micro_batch["old_log_probs"],
                                  micro_batch["advantages"], mask, clip_low=low, clip_high=high,
                                  dual_clip=clip_ratio_c, temperature=temperature, student_bias=bias,
                                  student_softcap=softcap,
                                  reduction="token_mean" if fused_mean else "none", return_stats=True,
                                  backend=backend)
    loss = stats.loss
    if not fused_mean:
        loss = _agg_loss(loss, mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                         global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    m = (mask != 0).to(stats.logprobs.dtype)
    # verl's ppo_kl: the mean of -clamp(new - old, -20, 20) over the response tokens.
    log_ratio = torch.clamp(stats.logprobs - micro_batch["old_log_probs"].to(m.dtype), -20.0, 20.0)
    ppo_kl = (-log_ratio * m).sum() / m.sum().clamp(min=1)
    metrics = {"actor/pg_loss": loss.item(),
               "actor/pg_clipfrac": (stats.clip_frac_low + stats.clip_frac_high).item(),
               "actor/ppo_kl": ppo_kl.item(), "actor/pg_clipfrac_lower": stats.clip_frac_dual.item()}
    return loss, metrics
