"""Random inputs shared by the tests: masks with prompt/tool/padding zeros and many step shapes."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def step_masks(draw, max_rows: int = 4, max_len: int = 90, max_steps: int = 40):
    """A [B, T] 0/1 mask built from explicit runs: a prompt, then alternating steps and tool outputs, then
    padding; rows with no step, single-token steps and a batch with no step at all all occur."""
    B = draw(st.integers(0, max_rows))
    T = draw(st.integers(1, max_len))
    rows = []
    for _ in range(B):
        row = [0] * draw(st.integers(0, min(T, 8)))
        steps = draw(st.integers(0, max_steps))
        for _ in range(steps):
            row += [1] * draw(st.integers(1, 6))
            row += [0] * draw(st.integers(1, 4))
        rows.append((row + [0] * T)[:T])
    return torch.tensor(rows, dtype=torch.int64).reshape(B, T)


def random_mask(B: int, T: int, p: float = 0.6, generator=None) -> torch.Tensor:
    return (torch.rand(B, T, generator=generator) < p).to(torch.int64)
