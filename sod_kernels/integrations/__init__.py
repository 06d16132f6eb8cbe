"""Integrations with training frameworks; each module imports its framework, this package imports none.

- :mod:`sod_kernels.integrations.trl`: ``SODDistillationTrainer``, TRL's on-policy ``DistillationTrainer``
  with the step-weighted fused loss (needs ``trl``).
- :mod:`sod_kernels.integrations.verl`: drop-ins for the SOD authors' verl code path (step weights and
  advantages on a ``DataProto``-like batch; actor log-probs and PPO loss from hidden states). Needs only
  torch: it works on any object with verl's batch layout.
"""
