"""Logit soft-capping (``cap * tanh(x / cap)`` of the raw lm_head output, before the temperature) inside the
fused losses, on both backends (Triton under the interpreter on CPU), against the float64 reference.

Inputs are scaled so that most raw logits lie far beyond the cap (``|x| >> cap``): there the cap's slope is
almost 0 and the capped softmax differs completely from the uncapped one, which every test checks first.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import transformers

from reference.sod_reference import (ref_fused_sod_loss, ref_logits, ref_ppo_dual_clip_loss, ref_step_ids_from_mask,
                                     ref_token_logprobs)
from sod_kernels import fused_sod_loss, fused_sod_policy_loss, fused_token_logprobs, hf

B, T, HS, HT, V, VT = 2, 9, 8, 6, 40, 45
BACKENDS = ["torch", "triton"]
# (student_softcap, teacher_softcap): different caps, only the student capped, only the teacher capped.
CAPS = [(2.0, 3.5), (1.5, None), (None, 2.5)]


def _dtype(backend: str) -> torch.dtype:
    return torch.float64 if backend == "torch" else torch.float32


def _tolerances(backend: str) -> dict:
    return dict(rtol=1e-9, atol=1e-11) if backend == "torch" else dict(rtol=2e-4, atol=2e-6)


def _lm_inputs(seed: int, scale: float = 12.0):
    """float64 ``[B, T, H]`` hidden states, weights and biases whose logits reach ``|x| ~ 10 * cap``."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {"student_hidden": rnd(B, T, HS) * scale / math.sqrt(HS), "student_weight": rnd(V, HS),
            "student_bias": rnd(V), "teacher_hidden": rnd(B, T, HT) * scale / math.sqrt(HT),
            "teacher_weight": rnd(VT, HT), "teacher_bias": rnd(VT)}


def _mask_and_targets(seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    mask = torch.zeros(B, T, dtype=torch.int64)
    mask[0, 1:4] = 1
    mask[0, 5:9] = 1
    mask[1, 0:3] = 1
    mask[1, 4:5] = 1
    mask[1, 6:8] = 1
    return mask, torch.randint(0, V, (B, T), generator=g)


def _assert_cap_bites(x: torch.Tensor, cap: float, beyond: float = 3.0) -> None:
    """The inputs saturate the cap: a third of the raw logits lie beyond ``beyond`` caps."""
    assert (x.abs() > beyond * cap).double().mean() > 0.3


def _leaves(inputs: dict, dtype: torch.dtype) -> dict:
    out = {k: v.to(dtype).detach().clone() for k, v in inputs.items()}
    for k in ("student_hidden", "student_weight", "student_bias"):
        out[k].requires_grad_()
    return out


def _grads(tensors: dict) -> list[torch.Tensor]:
    return [tensors[k].grad.double() for k in ("student_hidden", "student_weight", "student_bias")]


def _assert_grads_close(got: list[torch.Tensor], want: list[torch.Tensor], backend: str) -> None:
    tol = _tolerances(backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * max(w.abs().max().item(), 1.0))


# ----------------------------------------------------------------------------------------- fused_sod_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
@pytest.mark.parametrize("caps", CAPS, ids=["both", "student", "teacher"])
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_sod_loss_and_gradients_match_the_reference(backend, divergence, caps, reduction):
    seed = zlib.crc32(repr((divergence, caps, reduction)).encode()) % 1000
    base = _lm_inputs(seed)
    mask, targets = _mask_and_targets(seed)
    step_divergence = "sampled" if divergence == "forward_kl" else "kl"
    student_cap, teacher_cap = caps
    for cap, who in ((student_cap, "student"), (teacher_cap, "teacher")):
        if cap is not None:
            _assert_cap_bites(base[f"{who}_hidden"] @ base[f"{who}_weight"].T + base[f"{who}_bias"], cap)
    dt = _dtype(backend)
    fused = _leaves(base, dt)
    ref = _leaves({k: v.to(dt) for k, v in base.items()}, torch.float64)
    options = dict(target_ids=targets, divergence=divergence, step_divergence=step_divergence, temperature=0.8,
                   coef=1.3, reduction=reduction)
    loss = fused_sod_loss(fused["student_hidden"], fused["student_weight"], fused["teacher_hidden"],
                          fused["teacher_weight"], mask, student_bias=fused["student_bias"],
                          teacher_bias=fused["teacher_bias"], student_softcap=student_cap,
                          teacher_softcap=teacher_cap, backend=backend, **options)
    want, _ = ref_fused_sod_loss(ref["student_hidden"], ref["student_weight"], ref["teacher_hidden"],
                                 ref["teacher_weight"], mask, student_bias=ref["student_bias"],
                                 teacher_bias=ref["teacher_bias"], student_softcap=student_cap,
                                 teacher_softcap=teacher_cap, **options)
    uncapped, _ = ref_fused_sod_loss(ref["student_hidden"], ref["student_weight"], ref["teacher_hidden"],
                                     ref["teacher_weight"], mask, student_bias=ref["student_bias"],
                                     teacher_bias=ref["teacher_bias"], **options)
    assert (uncapped - want).abs().max() > 0.05 * want.abs().max()  # the cap changes the loss a lot
    torch.testing.assert_close(loss.double(), want.detach(), **_tolerances(backend))
    upstream = torch.rand(want.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    _assert_grads_close(_grads(fused), _grads(ref), backend)
    with torch.no_grad():  # the forward-only path
        again = fused_sod_loss(fused["student_hidden"], fused["student_weight"], fused["teacher_hidden"],
                               fused["teacher_weight"], mask, student_bias=fused["student_bias"],
                               teacher_bias=fused["teacher_bias"], student_softcap=student_cap,
                               teacher_softcap=teacher_cap, backend=backend, **options)
    torch.testing.assert_close(again.double(), want.detach(), **_tolerances(backend))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_triton_low_memory_and_two_pass_paths_apply_the_caps(divergence):
    """memory="low" (vocabulary slices, gathered sampled logits) and a chunk size that forces the two-pass
    path with chunks smaller than a step."""
    base = _lm_inputs(7)
    mask, targets = _mask_and_targets(7)
    ref = _leaves({k: v.float() for k, v in base.items()}, torch.float64)
    options = dict(target_ids=targets, divergence=divergence, step_divergence="sampled", temperature=1.2)
    want, _ = ref_fused_sod_loss(ref["student_hidden"], ref["student_weight"], ref["teacher_hidden"],
                                 ref["teacher_weight"], mask, student_bias=ref["student_bias"],
                                 teacher_bias=ref["teacher_bias"], student_softcap=1.0, teacher_softcap=3.0,
                                 **options)
    want.backward()
    for extra in (dict(memory="low"), dict(chunk_size=2)):
        fused = _leaves(base, torch.float32)
        loss = fused_sod_loss(fused["student_hidden"], fused["student_weight"], fused["teacher_hidden"],
                              fused["teacher_weight"], mask, student_bias=fused["student_bias"],
                              teacher_bias=fused["teacher_bias"], student_softcap=1.0, teacher_softcap=3.0,
                              backend="triton", **options, **extra)
        torch.testing.assert_close(loss.double(), want.detach(), **_tolerances("triton"))
        loss.backward()
        _assert_grads_close(_grads(fused), _grads(ref), "triton")


# ------------------------------------------------------------------------------------ fused_token_logprobs
def _ref_entropy(hidden, weight, bias, temperature, softcap):
    logp = torch.log_softmax(ref_logits(hidden, weight, bias, temperature, softcap=softcap), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_and_entropy_with_softcap(backend):
    base = _lm_inputs(11)
    _, targets = _mask_and_targets(11)
    cap, tau = 1.5, 0.7
    _assert_cap_bites(base["student_hidden"] @ base["student_weight"].T + base["student_bias"], cap)
    dt = _dtype(backend)
    fused = _leaves(base, dt)
    ref = _leaves({k: v.to(dt) for k, v in base.items()}, torch.float64)
    logp, entropy = fused_token_logprobs(fused["student_hidden"], fused["student_weight"], targets,
                                         bias=fused["student_bias"], temperature=tau, softcap=cap, backend=backend,
                                         return_entropy=True)
    args = (ref["student_hidden"], ref["student_weight"])
    want_logp = ref_token_logprobs(*args, targets, ref["student_bias"], tau, softcap=cap)
    want_entropy = _ref_entropy(*args, ref["student_bias"], tau, cap)
    assert (ref_token_logprobs(*args, targets, ref["student_bias"], tau) - want_logp).abs().max() > 1.0
    torch.testing.assert_close(logp.double(), want_logp.detach(), **_tolerances(backend))
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **_tolerances(backend))
    g = torch.Generator().manual_seed(12)
    a, e = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    (logp.double() * a + entropy.double() * e).sum().backward()
    (want_logp * a + want_entropy * e).sum().backward()
    _assert_grads_close(_grads(fused), _grads(ref), backend)


# ----------------------------------------------------------------------------------- fused_sod_policy_loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["token_mean", "none"])
def test_policy_loss_with_softcap(backend, reduction):
    base = _lm_inputs(21)
    mask, targets = _mask_and_targets(21)
    cap, tau = 2.0, 0.9
    dt = _dtype(backend)
    fused = _leaves(base, dt)
    ref = _leaves({k: v.to(dt) for k, v in base.items()}, torch.float64)
    g = torch.Generator().manual_seed(22)
    with torch.no_grad():
        logp0 = ref_token_logprobs(ref["student_hidden"], ref["student_weight"], targets, ref["student_bias"], tau,
                                   softcap=cap)
    old = (logp0 + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dt)  # ratios on every branch
    adv = torch.randn(B, T, generator=g, dtype=torch.float64).to(dt)
    loss = fused_sod_policy_loss(fused["student_hidden"], fused["student_weight"], targets, old, adv, mask,
                                 student_bias=fused["student_bias"], temperature=tau, student_softcap=cap,
                                 reduction=reduction, backend=backend)
    logp = ref_token_logprobs(ref["student_hidden"], ref["student_weight"], targets, ref["student_bias"], tau,
                              softcap=cap)
    want = ref_ppo_dual_clip_loss(logp, old.double(), adv.double(), mask, reduction=reduction)
    torch.testing.assert_close(loss.double(), want.detach(), **_tolerances(backend))
    upstream = torch.rand(want.shape, generator=g, dtype=torch.float64)
    (loss.double() * upstream).sum().backward()
    (want * upstream).sum().backward()
    _assert_grads_close(_grads(fused), _grads(ref), backend)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_caps_raise_value_errors_naming_the_argument(bad):
    base = {k: v.float() for k, v in _lm_inputs(0).items()}
    mask, targets = _mask_and_targets(0)
    sh, sw, th, tw = base["student_hidden"], base["student_weight"], base["teacher_hidden"], base["teacher_weight"]
    for name in ("student_softcap", "teacher_softcap"):
        with pytest.raises(ValueError, match=name):
            fused_sod_loss(sh, sw, th, tw, mask, **{name: bad})
    with pytest.raises(ValueError, match="softcap"):
        fused_token_logprobs(sh, sw, targets, softcap=bad)
    zeros = torch.zeros(B, T)
    with pytest.raises(ValueError, match="student_softcap"):
        fused_sod_policy_loss(sh, sw, targets, zeros, zeros, mask, student_softcap=bad)


def test_non_numeric_caps_raise_type_errors():
    base = {k: v.float() for k, v in _lm_inputs(0).items()}
    mask, targets = _mask_and_targets(0)
    with pytest.raises(TypeError, match="teacher_softcap"):
        fused_sod_loss(base["student_hidden"], base["student_weight"], base["teacher_hidden"],
                       base["teacher_weight"], mask, teacher_softcap="30")
    with pytest.raises(TypeError, match="softcap"):
        fused_token_logprobs(base["student_hidden"], base["student_weight"], targets, softcap=True)


# ------------------------------------------------------------------------------------------ hf (Gemma 2)
def _gemma2(seed: int, cap: float, vocab: int = 96, hidden: int = 32):
    """A tiny random Gemma 2 (built from a config) whose raw logits reach several times the cap."""
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=8, max_position_embeddings=128, final_logit_softcapping=cap,
                                       initializer_range=0.5)
    return transformers.Gemma2ForCausalLM(config).eval()


def _materialized_loss(student, teacher, input_ids, attention, step_ids, **options):
    """The SOD loss on the models' own (capped) logits: the logits are the reference's "hidden states" and
    an identity its lm_head; differentiable into the student's parameters."""
    zs = student(input_ids=input_ids, attention_mask=attention).logits.double()[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=input_ids, attention_mask=attention).logits.double()[:, :-1]
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    loss, _ = ref_fused_sod_loss(zs, eye(zs.shape[-1]), zt, eye(zt.shape[-1]), step_ids=step_ids[:, 1:],
                                 target_ids=input_ids[:, 1:], **options)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_helpers_pass_the_gemma2_caps_to_the_losses(backend):
    student, teacher = _gemma2(0, cap=2.0), _gemma2(1, cap=3.0, hidden=48)
    assert hf.check_logit_processing(student) == hf.LogitProcessing(softcap=2.0)
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 96, (2, 12), generator=g)
    attention = torch.ones_like(input_ids)
    mask = torch.zeros_like(input_ids)
    mask[:, 3:6] = 1
    mask[:, 8:11] = 1
    step_ids = ref_step_ids_from_mask(mask)
    inputs = hf.distillation_inputs(student, teacher, input_ids, attention, response_mask=mask)
    assert inputs["student_softcap"] == 2.0 and inputs["teacher_softcap"] == 3.0
    with torch.no_grad():
        raw = hf.final_hidden_states(student, input_ids) @ hf.lm_head(student).weight.T
    _assert_cap_bites(raw, 2.0, beyond=1.0)
    options = dict(divergence="reverse_kl", step_divergence="sampled", temperature=0.8)
    loss = fused_sod_loss(**inputs, backend=backend, **options)
    loss.backward()
    fused_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    want = _materialized_loss(student, teacher, input_ids, attention, step_ids, **options)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    for got, p in zip(fused_grads, student.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-5 * max(p.grad.abs().max().item(), 1e-3))
    # A teacher without a cap: only the student's is passed on.
    plain = hf.distillation_inputs(student, _gemma2(4, cap=None), input_ids, attention, response_mask=mask)
    assert plain["student_softcap"] == 2.0 and "teacher_softcap" not in plain
    # sampled_token_logprobs against the model's own logits.
    logp = hf.sampled_token_logprobs(student, input_ids, attention, temperature=0.8, backend=backend)
    with torch.no_grad():
        z = student(input_ids=input_ids, attention_mask=attention).logits.double()[:, :-1] / 0.8
    want_logp = torch.log_softmax(z, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="soft-caps its logits"):
        hf.refuse_softcap(hf.lm_head(student), "student")
