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


def dense_problem(B, T, Hs, Ht, V, Vt, dtype, seed, bias=True, scale=1.0):
    """``([sh, sw, th, tw, sb, tb], y)``: a student/teacher pair drawn in float64 and cast to ``dtype`` (teacher
    vocabulary ``Vt >= V``; biases None without ``bias``; logits of std about ``scale``), sampled tokens ``y``."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    sh = torch.randn(B, T, Hs, generator=g, dtype=f64)
    sw = torch.randn(V, Hs, generator=g, dtype=f64) * scale / Hs ** 0.5
    th = torch.randn(B, T, Ht, generator=g, dtype=f64)
    tw = torch.randn(Vt, Ht, generator=g, dtype=f64) * scale / Ht ** 0.5
    sb = torch.randn(V, generator=g, dtype=f64) if bias else None
    tb = torch.randn(Vt, generator=g, dtype=f64) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return [cast(x) for x in (sh, sw, th, tw, sb, tb)], y


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``|got - ref| / |ref|`` in float64 (Frobenius norms; a zero reference counts as 1e-30)."""
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


class PathCounter:
    """Counts how often each of two backend functions ran while a test calls a loss: ``single`` (the single
    pass ``single_module.single_pass_loss``) and ``two_pass`` (``two_pass_module.<two_pass_name>``, the forward
    of the recomputing path), both still doing their work."""

    def __init__(self, monkeypatch, single_module, two_pass_module, two_pass_name: str):
        self.single = self.two_pass = 0
        single, forward = single_module.single_pass_loss, getattr(two_pass_module, two_pass_name)

        def count_single(*a, **k):
            self.single += 1
            return single(*a, **k)

        def count_two_pass(*a, **k):
            self.two_pass += 1
            return forward(*a, **k)

        monkeypatch.setattr(single_module, "single_pass_loss", count_single)
        monkeypatch.setattr(two_pass_module, two_pass_name, count_two_pass)


def dense_cpu_paths(monkeypatch) -> PathCounter:
    """A :class:`PathCounter` of fused_sod_loss on CPU tensors: the CPU single pass or the two-pass tile sweep."""
    from sod_kernels.dense import cpu_backend, torch_backend

    return PathCounter(monkeypatch, cpu_backend, torch_backend, "divergence_forward")
