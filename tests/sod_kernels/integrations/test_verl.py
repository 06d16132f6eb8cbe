"""sod_kernels.integrations.verl against the per-token loops of reference/authors_loop.py, the PPO
reference and verl 0.9.1's loss aggregation (an oracle written here from that release's published source),
on a verl-shaped batch (a duck-typed DataProto: ``.batch`` of tensors and ``.meta_info``)."""

from types import SimpleNamespace

import pytest
import torch

import sod_kernels
from reference.authors_loop import authors_sod_advantages, authors_step_weights
from reference.sod_reference import ref_ppo_dual_clip_loss
from sod_kernels.integrations import verl
from tests.hf_helpers import qwen3


class FakeDataProto:
    """What the functions use of verl's DataProto: a mapping of [B, ...] tensors and a meta-info dict."""

    def __init__(self, tensors, meta_info=None):
        self.batch = dict(tensors)
        self.meta_info = {} if meta_info is None else meta_info


def rollout(B=6, R=40, seed=0):
    """Responses made of assistant turns (1) separated by tool outputs (0) and right padding (0)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, R, dtype=torch.long)
    for b in range(B):
        t = 0
        while t < R - 2:
            turn = int(torch.randint(1, 7, (1,), generator=g))
            mask[b, t:t + turn] = 1
            t += turn + int(torch.randint(1, 5, (1,), generator=g))
        mask[b, R - int(torch.randint(0, 8, (1,), generator=g)):] = 0
    mask[-1] = 0  # one response with no step at all
    old = -torch.rand(B, R, generator=g) * 3
    ref = old + torch.randn(B, R, generator=g) * torch.linspace(0.2, 2.0, R)  # later turns drift further
    return old, ref, mask


def loop_log_info(old, ref, mask):
    """Per-row boundaries, token counts and step means by walking the tokens."""
    rows = []
    for o, r, m in zip(old.double().tolist(), ref.double().tolist(), mask.tolist()):
        spans, start = [], None
        for t, v in enumerate(m + [0]):
            if v and start is None:
                start = t
            if not v and start is not None:
                spans.append((start, t))
                start = None
        d = [sum(abs(o[t] - r[t]) for t in range(a, b)) / (b - a) for a, b in spans]
        rows.append({"boundaries": spans, "n_tokens_per_step": [b - a for a, b in spans], "d_values": d})
    return rows


@pytest.mark.parametrize("delta", [0.2, 0.5])
def test_stepwise_weights_match_the_authors_loop(delta):
    old, ref, mask = rollout(seed=int(delta * 10))
    weights, info = verl.compute_stepwise_opd_weights(old, ref, mask, 1e-6, delta)
    assert weights.dtype == torch.float32 and weights.shape == mask.shape
    torch.testing.assert_close(weights.double(), authors_step_weights(old, ref, mask, delta=delta), rtol=1e-6, atol=0)
    for row, want in zip(info, loop_log_info(old, ref, mask)):
        assert row["boundaries"] == want["boundaries"] and row["n_tokens_per_step"] == want["n_tokens_per_step"]
        assert row["n_steps"] == len(want["boundaries"])
        assert row["d_values"] == pytest.approx(want["d_values"], rel=1e-5)
        if row["n_steps"]:
            assert row["w_values"][0] == 1.0 and max(row["w_values"]) <= 1 + delta + 1e-7
    assert info[-1] == {"n_steps": 0, "d_values": [], "w_values": [], "n_tokens_per_step": [], "boundaries": []}
    assert any(w < 0.9 for row in info for w in row["w_values"])  # the drift is down-weighted
    # The defaults are the authors' function defaults (delta 0.5).
    default, _ = verl.compute_stepwise_opd_weights(old, ref, mask)
    torch.testing.assert_close(default.double(), authors_step_weights(old, ref, mask, delta=0.5), rtol=1e-6, atol=0)


def stepwise_cfg(**extra):
    return SimpleNamespace(enable=True, stepwise_enable=True, stepwise_epsilon=1e-6, stepwise_delta=0.2,
                           stepwise_opd_coef=0.7, **extra)


def test_regularizer_adds_the_weighted_opd_term_to_grpo_advantages():
    old, ref, mask = rollout(seed=3)
    scores = torch.randn(mask.shape[0])
    batch = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref,
                           "advantages": scores[:, None] * mask})  # verl's GRPO advantages: [B, R], masked
    logged = []
    out = verl.apply_token_kl_regularizer(batch, stepwise_cfg(), stepwise_log=lambda *a: logged.append(a))
    assert out is batch
    expected = authors_sod_advantages(scores, old, ref, mask, coef=0.7, delta=0.2)
    torch.testing.assert_close(batch.batch["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    record = batch.meta_info["token_kl_reg"]
    torch.testing.assert_close(record["stepwise_weights"].double(), authors_step_weights(old, ref, mask, delta=0.2),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(record["local_adv"], (ref - old) * mask)
    (info, epsilon, delta, coef), = logged
    assert (epsilon, delta, coef) == (1e-6, 0.2, 0.7) and len(info) == mask.shape[0]
    # [B] advantages are broadcast over the response (so they also fill masked-out positions, as theirs do).
    flat = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": scores})
    verl.apply_token_kl_regularizer(flat, stepwise_cfg())
    torch.testing.assert_close(flat.batch["advantages"], batch.batch["advantages"] + scores[:, None] * (1 - mask))


def test_regularizer_leaves_the_batch_alone_when_disabled_or_incomplete():
    old, ref, mask = rollout(seed=4)
    advantages = torch.randn(mask.shape)
    for cfg, keys in ((None, None), (SimpleNamespace(enable=False), None), (stepwise_cfg(), "ref_log_prob")):
        tensors = {"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": advantages}
        if keys:
            del tensors[keys]
        batch = FakeDataProto(tensors)
        assert verl.apply_token_kl_regularizer(batch, cfg) is batch
        assert batch.batch["advantages"] is advantages and "token_kl_reg" not in batch.meta_info
    as_dict = {"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": advantages.clone()}
    verl.apply_token_kl_regularizer(as_dict, {"enable": True, "stepwise_enable": True, "stepwise_delta": 0.2})
    assert "stepwise_weights" in as_dict["meta_info"]["token_kl_reg"]


def test_gated_form_matches_a_row_loop():
    old, ref, mask = rollout(seed=5)
    advantages = torch.randn(mask.shape[0])[:, None] * mask
    cfg = SimpleNamespace(enable=True, stepwise_enable=False, gamma=2.0, beta_min=0.05, beta_max=0.3)
    batch = verl.apply_token_kl_regularizer(
        FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": advantages}),
        cfg)
    expected = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        n = sum(mask[b].tolist())
        a = sum(advantages[b, t].item() for t in range(mask.shape[1]) if mask[b, t]) / (n + 1e-8)
        beta = 0.05 + 0.25 / (1 + torch.exp(torch.tensor(2.0 * a, dtype=torch.float64)).item())
        for t in range(mask.shape[1]):
            expected[b, t] = a + beta * (ref[b, t] - old[b, t]).item() * mask[b, t].item()
    torch.testing.assert_close(batch.batch["advantages"].double(), expected, rtol=1e-5, atol=1e-6)
    assert batch.meta_info["token_kl_reg"]["beta_jk"].shape == (mask.shape[0],)
    unchanged = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref,
                               "advantages": advantages})
    verl.apply_token_kl_regularizer(unchanged, SimpleNamespace(enable=True, beta_min=0.3, beta_max=0.3))
    assert unchanged.batch["advantages"] is advantages
    with pytest.raises(ValueError, match="beta_max"):
        verl.apply_token_kl_regularizer(unchanged, SimpleNamespace(enable=True))


def test_gated_form_reads_per_row_advantages_as_one_value_per_row():
    """[B] advantages (one per row) give what the same values broadcast over each row give, also when B
    equals the response length (where broadcasting them along the last dimension would silently mix rows)."""
    cfg = SimpleNamespace(enable=True, stepwise_enable=False, gamma=1.5, beta_min=0.0, beta_max=0.4)
    for B, R_ in ((8, 8), (5, 9)):
        old, ref, mask = rollout(B=B, R=R_, seed=B)
        scores = torch.randn(B)
        flat = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": scores})
        full = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref,
                              "advantages": scores[:, None].expand(B, R_).clone()})
        verl.apply_token_kl_regularizer(flat, cfg)
        verl.apply_token_kl_regularizer(full, cfg)
        torch.testing.assert_close(flat.batch["advantages"], full.batch["advantages"])
        torch.testing.assert_close(flat.meta_info["token_kl_reg"]["beta_jk"], full.meta_info["token_kl_reg"]["beta_jk"])
        has_tokens = mask.sum(1) > 0
        beta = 0.4 * torch.sigmoid(-1.5 * scores)
        torch.testing.assert_close(flat.meta_info["token_kl_reg"]["beta_jk"][has_tokens], beta[has_tokens])
    old, ref, mask = rollout(B=4, R=8, seed=1)
    for bad in (torch.randn(3), torch.randn(4, 7), torch.randn(4, 8, 1)):
        batch = FakeDataProto({"response_mask": mask, "old_log_probs": old, "ref_log_prob": ref, "advantages": bad})
        with pytest.raises(ValueError, match="advantages"):
            verl.apply_token_kl_regularizer(batch, cfg)


# ------------------------------------------------------------------------------------------- actor side
V, P, R = 80, 7, 24


def verl_agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    """verl 0.9.1's ``core_algos.agg_loss`` (as that release's source defines it), in float64: token-mean over
    the (global) token count; token-sum; the seq-mean modes over the rows with at least one response token (or
    the global row count), seq-mean-token-sum-norm that value over loss_scale_factor (default R); all times
    dp_size."""
    m = mask.double()
    total = (loss_mat * m).sum()
    counts = m.sum(-1)
    rows = (counts > 0).double()
    n_rows = rows.sum() if global_batch_size is None else global_batch_size
    if mode == "token-mean":
        return total / (m.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return total * dp_size
    if mode == "seq-mean-token-mean":
        return (((loss_mat * m).sum(-1) / (counts + 1e-8)) * rows).sum() / n_rows * dp_size
    seq = ((loss_mat * m).sum(-1) * rows).sum() / n_rows * dp_size
    if mode == "seq-mean-token-sum-norm":
        seq = seq / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return seq


def test_actor_loss_aggregates_as_verl_0_9_1_with_empty_rows_and_global_batch_info():
    student = qwen3(V, 32, seed=4)
    mb = micro_batch(seed=2, B=5)
    mb["response_mask"][3] = 0  # a response without any generated token (e.g. a rollout cut before it)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        mb["old_log_probs"] = verl.actor_log_probs(student, mb) + 0.3 * torch.randn(5, R, generator=g)
    mb["advantages"] = torch.randn(5, 1, generator=g) * mb["response_mask"]
    logp = logits_logprobs(student, mb, 1.0)
    per_token = ref_ppo_dual_clip_loss(logp, mb["old_log_probs"].double(), mb["advantages"].double(),
                                       mb["response_mask"], clip_low=0.2, clip_high=0.28, reduction="none")
    assert verl.VERL_VERSION == "0.9.1" and set(verl.LOSS_AGG_MODES) >= {"token-sum", "seq-mean-token-sum-norm"}
    options = [{}, {"loss_scale_factor": 100.0}, {"dp_size": 4, "batch_num_tokens": 200, "global_batch_size": 16}]
    for mode in verl.LOSS_AGG_MODES:
        for extra in options:
            loss, metrics = verl.actor_policy_loss(student, mb, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                                   loss_agg_mode=mode, **extra)
            want = verl_agg_loss(per_token, mb["response_mask"], mode, **extra)
            assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-7), (mode, extra)
            assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
    # verl up to 0.6 divided seq-mean-token-sum-norm by R only, and averaged over all rows, empty ones too.
    norm, _ = verl.actor_policy_loss(student, mb, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                     loss_agg_mode="seq-mean-token-sum-norm")
    assert norm.item() == pytest.approx(per_token.sum().item() / R / 4, rel=1e-4)
    empty = dict(mb, response_mask=torch.zeros_like(mb["response_mask"]))
    for mode in verl.LOSS_AGG_MODES:
        assert verl.actor_policy_loss(student, empty, loss_agg_mode=mode)[0].item() == 0.0  # verl: NaN
    with pytest.raises(ValueError, match="batch_num_tokens"):
        verl.actor_policy_loss(student, mb, dp_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        verl.actor_policy_loss(student, mb, dp_size=2, loss_agg_mode="seq-mean-token-mean")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        verl.actor_policy_loss(student, mb, loss_scale_factor=0.0, loss_agg_mode="seq-mean-token-sum-norm")


def micro_batch(seed=0, B=4):
    """verl's layout: left-padded prompts, right-padded responses, position ids from the attention mask."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, V, (B, P), generator=g)
    responses = torch.randint(1, V, (B, R), generator=g)
    attention = torch.ones(B, P + R, dtype=torch.long)
    attention[1, :3] = 0
    prompts[1, :3] = 0
    attention[2, -5:] = 0
    responses[2, -5:] = 0
    response_mask = attention[:, P:].clone()
    response_mask[:, 6:9] = 0  # a tool output between two turns
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention,
            "position_ids": position_ids, "responses": responses, "response_mask": response_mask}


def logits_logprobs(model, mb, temperature):
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       position_ids=mb["position_ids"]).logits.double()
    logits = logits[:, -R - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, mb["responses"][..., None]).squeeze(-1)


def test_actor_log_probs_equal_the_logits_path():
    model = qwen3(V, 32, seed=1)
    mb = micro_batch()
    got = verl.actor_log_probs(model, mb, temperature=0.9)
    torch.testing.assert_close(got.double(), logits_logprobs(model, mb, 0.9), rtol=1e-5, atol=1e-5)
    logp, entropy = verl.actor_log_probs(model, mb, temperature=0.9, return_entropy=True)
    with torch.no_grad():
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       position_ids=mb["position_ids"]).logits.double()[:, -R - 1:-1] / 0.9
    want = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp, got)
    bad = dict(mb, responses=mb["responses"].roll(1, dims=1))
    with pytest.raises(ValueError, match="last R tokens"):
        verl.actor_log_probs(model, bad)


def test_driver_and_actor_step_against_the_references():
    student, teacher = qwen3(V, 32, seed=2), qwen3(V, 48, seed=3)
    mb = micro_batch(seed=1)
    mask = mb["response_mask"]
    with torch.no_grad():
        old = verl.actor_log_probs(student, mb)
        ref = verl.actor_log_probs(teacher, mb)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    grpo = sod_kernels.grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    batch = FakeDataProto({**mb, "old_log_probs": old, "ref_log_prob": ref, "advantages": grpo[:, None] * mask})
    verl.apply_token_kl_regularizer(batch, stepwise_cfg())
    expected_adv = authors_sod_advantages(grpo, old, ref, mask, coef=0.7, delta=0.2)
    torch.testing.assert_close(batch.batch["advantages"].double(), expected_adv, rtol=1e-5, atol=1e-6)

    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for epoch in range(2):
        logp = logits_logprobs(student, batch.batch, 1.0)
        for mode in verl.LOSS_AGG_MODES:
            loss, metrics = verl.actor_policy_loss(student, batch.batch, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                                   loss_agg_mode=mode)
            per_token = ref_ppo_dual_clip_loss(logp, old.double(), expected_adv, mask, reduction="none")
            m = mask.double()
            want = verl_agg_loss(per_token, m, mode)
            assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
            assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
        assert metrics["actor/ppo_kl"] == pytest.approx(((old.double() - logp) * m).sum().item() / m.sum().item(),
                                                        abs=1e-5)
        if epoch == 0:
            assert metrics["actor/pg_clipfrac"] == 0.0 and abs(metrics["actor/ppo_kl"]) < 1e-5
        else:
            assert metrics["actor/ppo_kl"] != 0.0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
