"""Input preparation of the vocabulary-parallel functions: the single-process checks, plus the fields every
rank must agree on (sent in the descriptor exchange of :mod:`sod_kernels.parallel.layout`).

Each ``prepare_*`` function validates one rank's inputs exactly like its single-process counterpart, fills
the ``agreed`` dictionary (a fixed set of names per function, so every rank sends a vector of one length even
when its validation fails half-way) and returns what the computation needs.  Nothing here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.runtime import check_softcap
from ..core.tiles import compute_dtype
from ..core.validation import (BACKENDS, DIVERGENCES, REDUCTIONS, STEP_DIVERGENCES, check_chunk_size, check_lm_head,
                               check_model_pair, check_positive, check_same_device, check_shape, check_tensor)
from ..logprobs.policy_loss import check_policy_options, check_policy_tensors
from ..logprobs.token_logprobs import TRITON_DTYPES, check_target_ids, resolve_logprob_backend
from ..steps.finish import check_loss_options, check_token_weights, jsd_and_hard_options
from ..steps.weights import resolve_step_ids
from .layout import choice_code, dtype_code, exchange_descriptors, resolve_group

COMMON_FIELDS = ("rank of the hidden states", "leading size 0", "leading size 1", "hidden size", "dtype",
                 "bias given", "temperature", "reduction", "backend", "chunk_size", "check_inputs",
                 "reduce_hidden_grad", "grad mode", "hidden.requires_grad", "weight.requires_grad",
                 "bias.requires_grad", "distilled tokens", "distilled positions (checksum)",
                 "target_ids given", "target_ids (checksum)", "target_ids min", "target_ids max", "student_softcap")
SOD_FIELDS = COMMON_FIELDS + ("teacher_softcap", "teacher hidden size", "teacher dtype", "teacher_bias given", "divergence",
                              "step_divergence", "epsilon", "delta", "coef", "return_stats", "token_weights given",
                              "token_weights (checksum)", "step_ids (checksum)", "beta", "hard_loss_weight")
LOGPROB_FIELDS = COMMON_FIELDS + ("return_entropy",)
POLICY_FIELDS = COMMON_FIELDS + ("clip_low", "clip_high", "dual_clip", "return_stats", "old_logprobs (checksum)",
                                 "advantages (checksum)")


def check_vocab_start(vocab_start) -> int | None:
    if vocab_start is None:
        return None
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (this rank's first vocabulary id) or None (shards in rank "
                         f"order), got {vocab_start!r}")
    return int(vocab_start)


def descriptor_device(hidden) -> torch.device:
    return hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")


def weight_rows(weight) -> int:
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0


def exchange(what: str, process_group, vocab_start, hidden, weight, teacher_weight, fields, prepare):
    """Validate locally (``prepare(agreed)``), exchange descriptors, return ``(layout, prepared, agreed)``."""
    group, rank, world = resolve_group(process_group)
    agreed: dict[str, float] = {}
    prepared, error, start = None, None, None
    try:
        start = check_vocab_start(vocab_start)
        prepared = prepare(agreed)
    except (TypeError, ValueError) as exc:
        error = exc
    teacher_rows = None if teacher_weight is None else weight_rows(teacher_weight)
    layout = exchange_descriptors(group, rank, world, descriptor_device(hidden), vocab_start=start,
                                  rows=weight_rows(weight), teacher_rows=teacher_rows, fields=fields, agreed=agreed,
                                  error=error, what=what)
    return layout, prepared, agreed


def _flag(x) -> float:
    return 1.0 if x else 0.0


def common(agreed: dict, hidden, weight, bias, lead, *, temperature, reduction, impl, chunk_size, check_inputs,
           reduce_hidden_grad, softcap: float | None = None) -> None:
    agreed["rank of the hidden states"] = float(len(lead))
    agreed["leading size 0"] = float(lead[0])
    agreed["leading size 1"] = float(lead[1]) if len(lead) > 1 else -1.0
    agreed["hidden size"] = float(hidden.shape[-1])
    agreed["dtype"] = dtype_code(hidden.dtype)
    agreed["bias given"] = _flag(bias is not None)
    agreed["temperature"] = temperature
    agreed["reduction"] = choice_code(reduction, REDUCTIONS)
    agreed["backend"] = choice_code(impl, BACKENDS)
    agreed["chunk_size"] = -1.0 if chunk_size is None else float(chunk_size)
    agreed["check_inputs"] = _flag(check_inputs)
    agreed["reduce_hidden_grad"] = _flag(reduce_hidden_grad)
    agreed["grad mode"] = _flag(torch.is_grad_enabled())
    agreed["hidden.requires_grad"] = _flag(hidden.requires_grad)
    agreed["weight.requires_grad"] = _flag(weight.requires_grad)
    agreed["bias.requires_grad"] = _flag(bias is not None and bias.requires_grad)
    agreed["student_softcap"] = -1.0 if softcap is None else softcap


def distilled_rows(ids: torch.Tensor, single: bool, token_weights, dtype: torch.dtype):
    """``(step_rows [B, T], row_index [Na], token weights [B, T] in the compute dtype of ``dtype`` or None)``
    from the resolved step ids (``[T]`` for a single sequence): the distilled positions in row-major order."""
    step_rows = ids.unsqueeze(0) if single else ids
    B, T = step_rows.shape
    row_index = torch.nonzero(step_rows.reshape(-1) >= 0).squeeze(1)
    given = None if token_weights is None else token_weights.detach().to(compute_dtype(dtype)).reshape(B, T)
    return step_rows, row_index, given


def distillation_fields(agreed: dict, divergence, step_divergence, epsilon, delta, coef, return_stats, given,
                        step_rows, *, beta: float = 0.5, hard_loss_weight: float = 0.0) -> None:
    """The options and per-token inputs of a distillation loss (dense or sparse teacher) that every rank must
    pass alike: divergence (as resolved: ``"jsd"`` at ``beta`` 0 / 1 is the KL it names), step divergence,
    epsilon, delta, coef, return_stats, the token weights (checksum), the step ids (checksum), ``beta`` and
    ``hard_loss_weight``."""
    agreed["beta"], agreed["hard_loss_weight"] = beta, hard_loss_weight
    agreed["divergence"] = choice_code(divergence, DIVERGENCES)
    agreed["step_divergence"] = choice_code(step_divergence, STEP_DIVERGENCES)
    agreed["epsilon"], agreed["delta"], agreed["coef"] = epsilon, delta, coef
    agreed["return_stats"] = _flag(return_stats)
    agreed["token_weights given"] = _flag(given is not None)
    agreed["token_weights (checksum)"] = checksum(given) if given is not None else 0.0
    agreed["step_ids (checksum)"] = checksum(step_rows)


def rows_and_targets(agreed: dict, row_index: torch.Tensor, y: torch.Tensor | None, *, check_inputs: bool,
                      active_targets_only: bool) -> None:
    """Distilled-token count and checksums (one host sync): every rank must hold the same tokens."""
    device = row_index.device
    summary = [torch.tensor(float(row_index.numel()), dtype=torch.float64, device=device),
               row_index.to(torch.float64).sum()]
    if y is not None:
        used = y[row_index] if active_targets_only else y
        summary.append((used.to(torch.float64) * torch.arange(1, used.numel() + 1, device=device)).sum())
        if check_inputs and used.numel():
            summary += [used.min().to(torch.float64), used.max().to(torch.float64)]
    values = torch.stack(summary).tolist()
    agreed["distilled tokens"], agreed["distilled positions (checksum)"] = values[0], values[1]
    agreed["target_ids given"] = _flag(y is not None)
    if len(values) > 2:
        agreed["target_ids (checksum)"] = values[2]
    if len(values) > 3:
        agreed["target_ids min"], agreed["target_ids max"] = values[3], values[4]


def check_targets_in_vocab(agreed: dict, vocab: int, *, name: str = "target_ids", where: str = "") -> None:
    """After the exchange (``vocab`` known; the min / max agree on every rank): ids in ``[0, vocab)``.  Only
    where they were computed (``check_inputs`` and at least one target)."""
    if "target_ids min" in agreed and (agreed["target_ids min"] < 0 or agreed["target_ids max"] >= vocab):
        raise ValueError(f"{name} must lie in [0, {vocab}) (the full vocabulary, the sum of the shards){where}")


def checksum(x: torch.Tensor) -> float:
    flat = x.detach().reshape(-1).to(torch.float64)
    return float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)).sum())


@dataclass
class SODInputs:
    """One rank's validated inputs of :func:`sod_kernels.vocab_parallel.vocab_parallel_sod_loss`."""

    impl: str
    single: bool
    step_rows: torch.Tensor
    row_index: torch.Tensor
    sh: torch.Tensor
    th: torch.Tensor
    sw: torch.Tensor
    tw: torch.Tensor
    y: torch.Tensor | None
    given: torch.Tensor | None
    acc: torch.dtype
    step_divergence: str
    epsilon: float
    delta: float
    temperature: float
    coef: float
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    divergence: str = "reverse_kl"
    beta: float = 0.5
    hard_loss_weight: float = 0.0


def prepare_sod(agreed: dict, student_hidden, student_weight, teacher_hidden, teacher_weight, response_mask, *,
                step_ids, target_ids, token_weights, divergence, step_divergence, epsilon, delta, temperature, coef,
                student_bias, teacher_bias, reduction, return_stats, backend, chunk_size, check_inputs,
                reduce_hidden_grad, student_softcap=None, teacher_softcap=None, beta=0.5,
                hard_loss_weight=0.0) -> SODInputs:
    """The checks of ``fused_sod_loss`` on one rank (``student_weight`` / ``teacher_weight`` are shards; the
    target range is checked after the exchange, against the full vocabulary)."""
    step_divergence, epsilon, delta, temperature, coef = check_loss_options(
        divergence, step_divergence, token_weights, reduction, backend, chunk_size, epsilon, delta, temperature, coef)
    divergence, beta, hard_loss_weight = jsd_and_hard_options(divergence, beta, hard_loss_weight, target_ids)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    teacher_softcap = check_softcap(teacher_softcap, "teacher_softcap")
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    lead = check_model_pair(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                            teacher_bias)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, response_mask=response_mask, step_ids=step_ids,
                      target_ids=target_ids, student_bias=student_bias, teacher_bias=teacher_bias,
                      token_weights=token_weights)
    if step_divergence == "sampled" and target_ids is None:
        raise ValueError("step_divergence='sampled' needs target_ids (the sampled tokens)")
    if target_ids is not None:
        check_tensor(target_ids, "target_ids", ndim=(len(lead),), integer=True)
        check_shape(target_ids, "target_ids", lead, "the leading shape of student_hidden")
    ids = resolve_step_ids(response_mask, step_ids, lead, check_inputs=check_inputs)
    if token_weights is not None:
        check_token_weights(token_weights, lead, check_values=check_inputs)
    impl = resolve_logprob_backend(backend, student_hidden, "student_hidden")
    if impl == "triton" and teacher_hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports teacher_hidden in float32, bfloat16 or float16, got "
                        f"{teacher_hidden.dtype}; use backend='torch' for float64")

    single = student_hidden.dim() == 2
    step_rows, row_index, given = distilled_rows(ids, single, token_weights, student_hidden.dtype)
    y = None if target_ids is None else target_ids.reshape(-1).to(torch.int64).contiguous()
    acc = compute_dtype(student_hidden.dtype)
    common(agreed, student_hidden, student_weight, student_bias, lead, temperature=temperature,
           reduction=reduction, impl=impl, chunk_size=chunk_size, check_inputs=check_inputs,
           reduce_hidden_grad=reduce_hidden_grad, softcap=student_softcap)
    rows_and_targets(agreed, row_index, y, check_inputs=check_inputs, active_targets_only=False)
    agreed["teacher_softcap"] = -1.0 if teacher_softcap is None else teacher_softcap
    agreed["teacher hidden size"] = float(teacher_hidden.shape[-1])
    agreed["teacher dtype"] = dtype_code(teacher_hidden.dtype)
    agreed["teacher_bias given"] = _flag(teacher_bias is not None)
    distillation_fields(agreed, divergence, step_divergence, epsilon, delta, coef, return_stats, given, step_rows,
                        beta=beta, hard_loss_weight=hard_loss_weight)
    return SODInputs(impl, single, step_rows, row_index,
                     student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous(),
                     teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous(),
                     student_weight.contiguous(), teacher_weight.contiguous(), y, given, acc, step_divergence,
                     epsilon, delta, temperature, coef, student_softcap, teacher_softcap, divergence, beta,
                     hard_loss_weight)


def prepare_logprobs(agreed: dict, hidden, weight, target_ids, *, bias, temperature, backend, return_entropy,
                     chunk_size, check_inputs, reduce_hidden_grad, softcap=None):
    """The checks of ``fused_token_logprobs`` on one rank -> ``(impl, lead, flat hidden, y, row_index,
    temperature, softcap)``."""
    check_lm_head(hidden, weight, bias, hidden_name="hidden", weight_name="weight", bias_name="bias")
    temperature = check_positive(temperature, "temperature")
    softcap = check_softcap(softcap, "softcap")
    check_chunk_size(chunk_size)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    lead = tuple(hidden.shape[:-1])
    # The range [0, V) needs the full vocabulary: checked after the exchange.
    check_target_ids(target_ids, lead, 1, check_values=False)
    check_same_device(hidden=hidden, weight=weight, target_ids=target_ids, bias=bias)
    impl = resolve_logprob_backend(backend, hidden, "hidden")
    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    y = target_ids.reshape(-1).to(torch.int64).contiguous()
    rows = torch.arange(flat.shape[0], device=flat.device)
    common(agreed, hidden, weight, bias, lead, temperature=temperature, reduction="none", impl=impl,
           chunk_size=chunk_size, check_inputs=check_inputs, reduce_hidden_grad=reduce_hidden_grad, softcap=softcap)
    rows_and_targets(agreed, rows, y, check_inputs=check_inputs, active_targets_only=False)
    agreed["return_entropy"] = _flag(return_entropy)
    return impl, lead, flat, y, rows, temperature, softcap


def prepare_policy(agreed: dict, student_hidden, student_weight, target_ids, old_logprobs, advantages, response_mask,
                   *, clip_low, clip_high, dual_clip, temperature, student_bias, reduction, return_stats, backend,
                   chunk_size, check_inputs, reduce_hidden_grad, student_softcap=None):
    """The checks of ``fused_sod_policy_loss`` on one rank -> a dict of what the computation needs."""
    clip_low, clip_high, dual_clip, temperature = check_policy_options(reduction, clip_low, clip_high, dual_clip,
                                                                       temperature)
    student_softcap = check_softcap(student_softcap, "student_softcap")
    check_chunk_size(chunk_size)
    if not isinstance(reduce_hidden_grad, bool):
        raise TypeError(f"reduce_hidden_grad must be a bool, got {type(reduce_hidden_grad).__name__}")
    lead = check_policy_tensors(student_hidden, student_weight, student_bias, target_ids, old_logprobs, advantages,
                                response_mask, check_inputs=check_inputs)
    impl = resolve_logprob_backend(backend, student_hidden, "student_hidden")
    flat_mask = response_mask.reshape(-1) != 0
    row_index = torch.nonzero(flat_mask).squeeze(1)
    y = target_ids.reshape(-1).to(torch.int64).contiguous()
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    old = old_logprobs.detach().reshape(-1)[row_index].to(acc)
    adv = advantages.detach().reshape(-1)[row_index].to(acc)
    common(agreed, student_hidden, student_weight, student_bias, lead, temperature=temperature,
           reduction=reduction, impl=impl, chunk_size=chunk_size, check_inputs=check_inputs,
           reduce_hidden_grad=reduce_hidden_grad, softcap=student_softcap)
    rows_and_targets(agreed, row_index, y, check_inputs=check_inputs, active_targets_only=True)
    agreed["clip_low"], agreed["clip_high"] = clip_low, clip_high
    agreed["dual_clip"] = -1.0 if dual_clip is None else dual_clip
    agreed["return_stats"] = _flag(return_stats)
    agreed["old_logprobs (checksum)"] = checksum(old)
    agreed["advantages (checksum)"] = checksum(adv)
    return {"impl": impl, "lead": lead, "flat_mask": flat_mask, "row_index": row_index, "y": y, "acc": acc,
            "old": old, "adv": adv, "clip": (clip_low, clip_high, dual_clip), "temperature": temperature,
            "softcap": student_softcap,
            "hidden": student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous()}
