"""The reference implementation.  See the package docstring; every function follows docs/math.md literally."""

from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------------------------- logits
def ref_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               temperature: float = 1.0, vocab: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """``[..., V]`` logits divided by the temperature; only the first ``vocab`` rows of ``weight``.  With
    ``softcap`` the lm_head output ``x`` becomes ``softcap * tanh(x / softcap)`` before the division."""
    if vocab is not None:
        weight = weight[:vocab]
        bias = None if bias is None else bias[:vocab]
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_token_logprobs(hidden, weight, target_ids, bias=None, temperature=1.0, softcap=None):
    """log softmax(z)[y] for every token: ``[...]``."""
    logp = torch.log_softmax(ref_logits(hidden, weight, bias, temperature, softcap=softcap), dim=-1)
    return logp.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)


def ref_jsd(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD over the last axis from two log-distributions, literally:
    ``M = (1 - beta) p_s + beta p_t``, ``beta KL(p_t || M) + (1 - beta) KL(p_s || M)`` (``0 log 0 = 0``).
    ``beta = 0`` / ``1`` are the forward / reverse KL (the special cases of TRL's GKD)."""
    if beta == 0:
        return _kl(logp_t, logp_s)
    if beta == 1:
        return _kl(logp_s, logp_t)
    log_m = torch.logaddexp(logp_s + math.log(1 - beta), logp_t + math.log(beta))
    return beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``sum p (log p - log q)`` over the last axis, with ``0 log 0 = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def ref_token_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, *,
                         student_bias=None, teacher_bias=None, divergence="reverse_kl", temperature=1.0,
                         student_softcap=None, teacher_softcap=None, beta=0.5):
    """Per-token D_t (docs/math.md) from fully materialized log-softmaxes: ``[...]``; ``beta`` for ``"jsd"``."""
    V = student_weight.shape[0]
    logp_s = torch.log_softmax(ref_logits(student_hidden, student_weight, student_bias, temperature,
                                          softcap=student_softcap), dim=-1)
    logp_t = torch.log_softmax(ref_logits(teacher_hidden, teacher_weight, teacher_bias, temperature, vocab=V,
                                          softcap=teacher_softcap), dim=-1)
    if divergence == "reverse_kl":
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    if divergence == "forward_kl":
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if divergence == "jsd":
        return ref_jsd(logp_s, logp_t, beta)
    raise ValueError(f"unknown divergence {divergence!r}")


# ------------------------------------------------------------------------------------------------ steps
def ref_saturated_reverse_kl(student_std: float, teacher_std: float, n: int = 64, seed: int = 0):
    """A reverse-KL case on logits of the given spreads (``n`` tokens x ``n`` columns, float32 logits drawn from
    N(0, std^2)): ``(z_s, z_t, loss, grad)`` with ``loss = sum_rows KL(p_s || p_t)`` and ``grad = d loss / d z_s``
    in float64 (fed through an identity lm_head, the logits are the hidden states)."""
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(n, n, generator=g) * student_std
    z_t = torch.randn(n, n, generator=g) * teacher_std
    exact = z_s.double().requires_grad_()
    log_s, log_t = torch.log_softmax(exact, -1), torch.log_softmax(z_t.double(), -1)
    loss = (log_s.exp() * (log_s - log_t)).sum()
    loss.backward()
    return z_s, z_t, loss.detach(), exact.grad


def ref_step_ids_from_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """Walk each row: a 1 after a 0 (or at the row start) opens a new step."""
    mask = response_mask.reshape(-1, response_mask.shape[-1]).tolist()
    out = []
    for row in mask:
        ids, step, inside = [], -1, False
        for v in row:
            if v:
                if not inside:
                    step += 1
                inside = True
                ids.append(step)
            else:
                inside = False
                ids.append(-1)
        out.append(ids)
    return torch.tensor(out, dtype=torch.int64).reshape(response_mask.shape)


def ref_step_divergence(token_signal: torch.Tensor, step_ids: torch.Tensor) -> list[list[float]]:
    """Per row, the list [d_1, ..., d_K] of step means of the signal (Python floats, float64 sums)."""
    rows = []
    for sig, ids in zip(token_signal.reshape(-1, token_signal.shape[-1]).tolist(),
                        step_ids.reshape(-1, step_ids.shape[-1]).tolist()):
        members: dict[int, list[float]] = {}
        for s, k in zip(sig, ids):
            if k >= 0:
                members.setdefault(k, []).append(s)
        rows.append([sum(members[k]) / len(members[k]) for k in sorted(members)])
    return rows


def ref_step_weights_running_product(d: list[float], epsilon: float = 1e-6, delta: float = 0.2) -> list[float]:
    """docs/math.md literally: w_1 = 1, w_k = min(prod_{u<k} (d_u + eps)/(d_{u+1} + eps), 1 + delta)."""
    weights = []
    product = 1.0
    for k in range(len(d)):
        if k == 0:
            weights.append(1.0)
            continue
        product *= (d[k - 1] + epsilon) / (d[k] + epsilon)
        weights.append(min(product, 1.0 + delta))
    return weights


def _token_weights(step_ids: torch.Tensor, per_row_weights: list[list[float]], dtype) -> torch.Tensor:
    flat_ids = step_ids.reshape(-1, step_ids.shape[-1]).tolist()
    out = [[(per_row_weights[b][k] if k >= 0 else 0.0) for k in row] for b, row in enumerate(flat_ids)]
    return torch.tensor(out, dtype=dtype).reshape(step_ids.shape)


def ref_sod_step_weights(student_logprobs, teacher_logprobs, response_mask, epsilon=1e-6, delta=0.2):
    """Token weights from the authors' signal |old - teacher| (0 outside steps)."""
    step_ids = ref_step_ids_from_mask(response_mask)
    signal = (student_logprobs.double() - teacher_logprobs.double()).abs()
    d = ref_step_divergence(signal, step_ids)
    w = [ref_step_weights_running_product(row, epsilon, delta) for row in d]
    return _token_weights(step_ids, w, torch.float64)


# ------------------------------------------------------------------------------------------------- loss
def ref_fused_sod_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask=None, *,
                       step_ids=None, target_ids=None, divergence="reverse_kl", step_divergence="kl",
                       epsilon=1e-6, delta=0.2, temperature=1.0, coef=1.0, student_bias=None,
                       teacher_bias=None, reduction="token_mean", token_weights=None, student_softcap=None,
                       teacher_softcap=None, beta=0.5, hard_loss_weight=0.0):
    """docs/math.md with everything materialized.  Differentiable through torch autograd.

    ``divergence="jsd"`` with ``beta``: the generalized JSD (:func:`ref_jsd`).  ``hard_loss_weight`` (lambda) adds
    ``lambda * sum m * (-log p_s(y)) / normalizer`` for ``target_ids`` (unweighted, not times ``coef``).

    ``token_weights`` (docs/math.md): precomputed ``[B,T]`` weights that replace the step weights.
    ``student_softcap`` / ``teacher_softcap``: each model's logit soft-cap (see :func:`ref_logits`) or None.

    Returns ``(loss, stats)`` where stats is a dict with ``token_divergence [B,T]`` (0 outside steps),
    ``token_weights [B,T]``, ``step_divergence`` and ``step_weights`` (lists of per-row lists),
    ``num_steps`` (list).  Inputs may be ``[T, H]`` (one sequence): then the row dimension is dropped.
    """
    single = student_hidden.dim() == 2
    if step_ids is None:
        step_ids = ref_step_ids_from_mask(response_mask)
    if single:
        student_hidden, teacher_hidden = student_hidden.unsqueeze(0), teacher_hidden.unsqueeze(0)
        step_ids = step_ids.unsqueeze(0)
        target_ids = None if target_ids is None else target_ids.unsqueeze(0)
    m = (step_ids >= 0)
    D = ref_token_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight,
                             student_bias=student_bias, teacher_bias=teacher_bias, divergence=divergence,
                             temperature=temperature, student_softcap=student_softcap,
                             teacher_softcap=teacher_softcap, beta=beta)
    D = torch.where(m, D, torch.zeros_like(D))
    hard = None
    if hard_loss_weight:
        nll = -ref_token_logprobs(student_hidden, student_weight, target_ids, student_bias, temperature,
                                  softcap=student_softcap)
        hard = hard_loss_weight * torch.where(m, nll, torch.zeros_like(nll))
    if step_divergence == "sampled":
        V = student_weight.shape[0]
        ls = torch.log_softmax(ref_logits(student_hidden, student_weight, student_bias, temperature,
                                          softcap=student_softcap), -1)
        lt = torch.log_softmax(ref_logits(teacher_hidden, teacher_weight, teacher_bias, temperature, vocab=V,
                                          softcap=teacher_softcap), -1)
        y = target_ids.long().unsqueeze(-1)
        signal = (ls.gather(-1, y) - lt.gather(-1, y)).squeeze(-1).abs()
    else:
        signal = D
    return ref_weighted_loss(D, signal, step_ids, single=single, step_divergence=step_divergence, epsilon=epsilon,
                             delta=delta, token_weights=token_weights, coef=coef, reduction=reduction, hard=hard)


# ------------------------------------------------------------------------------------- policy gradient
def ref_grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Loop over groups; torch.std (Bessel) per group; a group of one uses mean 0, std 1."""
    out = torch.empty(rewards.shape, dtype=torch.float64)
    r = rewards.double()
    for g in set(group_ids.tolist()):
        idx = [i for i, x in enumerate(group_ids.tolist()) if x == g]
        vals = r[idx]
        if len(idx) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = vals.mean(), vals.std()
        out[idx] = (vals - mean) / (std + 1e-6)
    return out


def ref_sod_advantages(grpo_advantages, student_logprobs, teacher_logprobs, response_mask, coef=1.0,
                       epsilon=1e-6, delta=0.2):
    m = (response_mask != 0).double()
    w = ref_sod_step_weights(student_logprobs, teacher_logprobs, response_mask, epsilon, delta)
    r = (teacher_logprobs.double() - student_logprobs.double()) * m
    return grpo_advantages.double()[:, None] * m + coef * w * r


def ref_ppo_dual_clip_loss(logp_new, old_logp, advantages, response_mask, clip_low=0.2, clip_high=0.28,
                           dual_clip=3.0, reduction="token_mean"):
    """PPO clipped surrogate with dual clip, token mean over the mask (docs/math.md)."""
    ratio = torch.exp(torch.clamp(logp_new - old_logp, -20.0, 20.0))
    A = advantages
    unclipped = -A * ratio
    clipped = -A * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    loss = torch.where(A < 0, torch.minimum(loss, -dual_clip * A), loss)
    m = (response_mask != 0).to(loss.dtype)
    per_token = loss * m
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / max(int(m.sum()), 1)


def ref_weighted_loss(D, signal, step_ids, *, single, step_divergence, epsilon, delta, token_weights, coef,
                      reduction, hard=None):
    """The loss from per-token divergences ``D [B, T]`` (zero off the mask) and the step signal ``[B, T]``:
    step means of the signal (clamped at 0), step weights (or the given ``token_weights``), the weighted sum
    and its reduction.  ``hard`` (``[B, T]``, zero off the mask, or None) is added to each token's loss
    unweighted.  Returns ``(loss, stats dict)``; ``single``: drop the batch axis of the outputs."""
    m = step_ids >= 0
    d = ref_step_divergence(signal.detach().double().clamp(min=0), step_ids)
    if step_divergence == "none":
        w = [[1.0] * len(row) for row in d]
    else:
        w = [ref_step_weights_running_product(row, epsilon, delta) for row in d]
    tw = _token_weights(step_ids, w, D.dtype).to(D.device)
    if token_weights is not None:
        given = token_weights.unsqueeze(0) if single else token_weights
        tw = torch.where(m, given.detach().to(D.dtype), torch.zeros_like(D))
    per_token = coef * m.to(D.dtype) * tw * D
    if hard is not None:
        per_token = per_token + hard
    if reduction == "none":
        loss = per_token[0] if single else per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / max(int(m.sum()), 1)
    stats = {
        "token_divergence": D[0] if single else D,
        "token_weights": tw[0] if single else tw,
        "step_divergence": d[0] if single else d,
        "step_weights": w[0] if single else w,
        "num_steps": len(d[0]) if single else [len(row) for row in d],
    }
    return loss, stats
