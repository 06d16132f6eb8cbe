"""The reference itself, against independent facts (so that the oracle is not only checked by itself)."""

import torch
import torch.nn.functional as F

from reference import (ref_fused_sod_loss, ref_grpo_advantages, ref_ppo_dual_clip_loss, ref_step_ids_from_mask,
                       ref_token_divergence, ref_token_logprobs)


def _models(seed=0, N=9, Hs=4, Ht=6, V=13, Vt=13):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, Hs, generator=g, dtype=torch.float64), torch.randn(V, Hs, generator=g, dtype=torch.float64),
            torch.randn(N, Ht, generator=g, dtype=torch.float64), torch.randn(Vt, Ht, generator=g, dtype=torch.float64))


def test_kl_matches_torch_kl_div():
    sh, sw, th, tw = _models()
    ls, lt = torch.log_softmax(sh @ sw.T, -1), torch.log_softmax(th @ tw.T, -1)
    rev = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)  # sum p_s (log p_s - log p_t)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(ref_token_divergence(sh, sw, th, tw), rev)
    assert torch.allclose(ref_token_divergence(sh, sw, th, tw, divergence="forward_kl"), fwd)


def test_kl_is_zero_for_identical_models_and_positive_otherwise():
    sh, sw, _, _ = _models()
    assert ref_token_divergence(sh, sw, sh, sw).abs().max() < 1e-12
    _, _, th, tw = _models(1, Ht=4)
    assert bool((ref_token_divergence(sh, sw, th, tw) > 0).all())


def test_padded_teacher_vocabulary_uses_first_columns():
    sh, sw, th, tw = _models(Vt=17)
    assert torch.allclose(ref_token_divergence(sh, sw, th, tw), ref_token_divergence(sh, sw, th, tw[:13]))


def test_token_logprobs_match_cross_entropy():
    sh, sw, _, _ = _models()
    y = torch.randint(0, 13, (9,))
    assert torch.allclose(ref_token_logprobs(sh, sw, y, temperature=0.5), -F.cross_entropy(sh @ sw.T / 0.5, y,
                                                                                          reduction="none"))


def test_step_ids_from_mask_example():
    assert ref_step_ids_from_mask(torch.tensor([[1, 1, 0, 0, 1, 0, 1]])).tolist() == [[0, 0, -1, -1, 1, -1, 2]]


def test_loss_of_one_step_is_mean_kl():
    sh, sw, th, tw = _models(N=6)
    mask = torch.tensor([0, 1, 1, 1, 0, 0])
    loss, stats = ref_fused_sod_loss(sh, sw, th, tw, mask)
    D = ref_token_divergence(sh, sw, th, tw)
    assert torch.allclose(loss, D[1:4].mean())
    assert stats["step_weights"] == [1.0]


def test_grpo_matches_torch_std():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    a = ref_grpo_advantages(r, torch.tensor([0, 0, 0, 0]))
    assert torch.allclose(a, (r.double() - r.double().mean()) / (r.double().std() + 1e-6))


def test_ppo_branches_by_hand():
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.log(torch.tensor([2.0, 0.5, 5.0, 1.1], dtype=torch.float64))
    A = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    per = ref_ppo_dual_clip_loss(new, old, A, torch.ones(4), reduction="none")
    # ratio 2, A>0: clipped at 1.28 -> -1.28; ratio 0.5, A<0: max(0.5, 0.8) = 0.8; ratio 5, A<0: max(5, 1.28)
    # = 5, dual clip min(5, 3) = 3; ratio 1.1, A>0: unclipped -1.1.
    assert torch.allclose(per, torch.tensor([-1.28, 0.8, 3.0, -1.1], dtype=torch.float64))
