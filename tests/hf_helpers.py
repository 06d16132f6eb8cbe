"""Tiny offline transformers models and the SOD loss recomputed from their own (materialized) logits."""

from __future__ import annotations

import torch

from reference.sod_reference import ref_jsd, ref_step_divergence, ref_step_weights_running_product


def qwen3(vocab: int, hidden: int = 32, *, tie: bool = False, seed: int = 0, **extra):
    """A randomly initialized 2-layer Qwen3 causal LM (built from a config: nothing is downloaded)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=256, tie_word_embeddings=tie, **extra)
    return transformers.Qwen3ForCausalLM(config).eval()


def reference_loss(student, teacher, input_ids, attention_mask, step_ids, *, temperature=1.0,
                   divergence="reverse_kl", step_divergence="kl", epsilon=1e-6, delta=0.2, reduction="token_mean",
                   beta=0.5):
    """SOD loss from ``model(input_ids).logits``: shifted by hand (logits at t score token t + 1, ``step_ids``
    describe the tokens, unshifted), log-softmax in float64, SPEC eq. 7 weights as a running product."""
    with torch.no_grad():
        zs = student(input_ids=input_ids, attention_mask=attention_mask).logits.double()[:, :-1] / temperature
        zt = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.double()[:, :-1] / temperature
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt[..., :zs.shape[-1]], -1)
    if divergence == "reverse_kl":
        D = (ls.exp() * (ls - lt)).sum(-1)
    elif divergence == "jsd":
        D = ref_jsd(ls, lt, beta)
    else:
        D = (lt.exp() * (lt - ls)).sum(-1)
    ids = step_ids[:, 1:]
    if step_divergence == "sampled":
        y = input_ids[:, 1:, None]
        signal = (ls.gather(-1, y) - lt.gather(-1, y)).squeeze(-1).abs()
    else:
        signal = D.clamp(min=0)
    d = ref_step_divergence(signal, ids)
    if step_divergence == "none":
        w = [[1.0] * len(row) for row in d]
    else:
        w = [ref_step_weights_running_product(row, epsilon, delta) for row in d]
    weights = torch.tensor([[w[b][k] if k >= 0 else 0.0 for k in row] for b, row in enumerate(ids.tolist())],
                           dtype=torch.float64)
    total = (weights * D).sum()
    return total if reduction == "sum" else total / max(int((ids >= 0).sum()), 1)
