"""The SOD step weights as a per-token Python loop (docs/math.md, the paper's Eq. 7, literally).

This is how a trainer computes the weights when it walks each rollout token by token: plain Python
loops over rows and tokens, a step closed when the response mask drops to 0, the step's mean
``|old_logp - teacher_logp|`` recorded, and the weight of step k the running product
``prod_{u<k} (d_u + eps) / (d_{u+1} + eps)`` capped at ``1 + delta`` (the cap applied to the output only).
It is written from docs/math.md, not copied from the authors' code.  Tests use it as an independent oracle of
:func:`sod_kernels.sod_step_weights`, and ``benchmarks/policy.py`` times it as the baseline.

Inputs are Python lists (``tensor.tolist()``) so that the loop measures the algorithm, not the per-element
overhead of indexing tensors (which would make the baseline another ~10x slower).
"""

from __future__ import annotations

import torch

DEFAULT_EPSILON = 1e-6
DEFAULT_DELTA = 0.2


def authors_row_weights(old_logprobs: list[float], teacher_logprobs: list[float], mask: list[int],
                        epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA) -> list[float]:
    """Token weights of one row (0.0 outside steps) by a loop over its tokens."""
    T = len(mask)
    weights = [0.0] * T
    step_means: list[float] = []
    step_spans: list[tuple[int, int]] = []
    start = -1
    total = 0.0
    for t in range(T + 1):
        inside = t < T and mask[t] != 0
        if inside:
            if start < 0:
                start, total = t, 0.0
            total += abs(old_logprobs[t] - teacher_logprobs[t])
        elif start >= 0:
            step_means.append(total / (t - start))
            step_spans.append((start, t))
            start = -1
    product = 1.0
    for k, (begin, end) in enumerate(step_spans):
        if k == 0:
            w = 1.0
        else:
            product *= (step_means[k - 1] + epsilon) / (step_means[k] + epsilon)
            w = min(product, 1.0 + delta)
        for t in range(begin, end):
            weights[t] = w
    return weights


def authors_step_weights(old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, response_mask: torch.Tensor,
                         epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA) -> torch.Tensor:
    """``[B, T]`` float64 token weights, looping over rows and tokens (0 outside steps)."""
    old, teacher, mask = old_logprobs.tolist(), teacher_logprobs.tolist(), response_mask.tolist()
    rows = [authors_row_weights(o, t, m, epsilon, delta) for o, t, m in zip(old, teacher, mask)]
    return torch.tensor(rows, dtype=torch.float64).reshape(response_mask.shape)


def authors_sod_advantages(grpo_advantages: torch.Tensor, old_logprobs: torch.Tensor,
                           teacher_logprobs: torch.Tensor, response_mask: torch.Tensor, coef: float = 1.0,
                           epsilon: float = DEFAULT_EPSILON, delta: float = DEFAULT_DELTA) -> torch.Tensor:
    """``[B, T]`` float64 ``A = A_grpo m + coef w (teacher - old) m``, token by token."""
    old, teacher, mask = old_logprobs.tolist(), teacher_logprobs.tolist(), response_mask.tolist()
    grpo = grpo_advantages.tolist()
    out = []
    for b, (o, t, m) in enumerate(zip(old, teacher, mask)):
        w = authors_row_weights(o, t, m, epsilon, delta)
        out.append([(grpo[b] + coef * w[i] * (t[i] - o[i])) if m[i] else 0.0 for i in range(len(m))])
    return torch.tensor(out, dtype=torch.float64).reshape(response_mask.shape)
