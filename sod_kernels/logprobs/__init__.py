"""Sampled-token log-probs (``fused_token_logprobs``), the PPO policy loss on them (``fused_sod_policy_loss``)
and the student's top-k log-probs (``fused_topk_logprobs``)."""
