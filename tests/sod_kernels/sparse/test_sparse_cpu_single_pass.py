"""The CPU single pass of fused_sparse_sod_loss (memory="fast" on CPU tensors, sod_kernels/sparse/cpu_backend.py).

Exactness against the float64 reference (reference/sparse_reference.py: loss and the hidden / weight / bias
gradients) for every divergence (reverse / forward KL, JSD with beta 0.3), k < V and k = V, temperatures,
soft-caps, biases, the hard-label term with the sampled token listed or not, every weighting, several chunks and
masked tokens, in float32 and float64; which path runs when (the single pass makes one logit product per chunk);
bitwise reproducibility; the compiled epilogue against the eager one and the reference; the eager fallback.
The suite runs the epilogues eagerly (tests/conftest.py); the tests using the ``compiled`` fixture compile them.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import ref_sparse_sod_loss
from sod_kernels import fused_sparse_sod_loss
from sod_kernels.core import cpu_epilogue
from sod_kernels.sparse import cpu_backend, torch_backend
from tests.helpers import PathCounter, step_masks

LOSS_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
MASK = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 0]])


def _problem(lead, H, V, k, dtype, seed, *, bias=True, target="mixed"):
    """``([hidden, weight, bias], ids [.., k], logprobs [.., k] float32, target_ids)``: the teacher's top-k of a
    random distribution; ``target``: ``"listed"`` (every sampled token among the ids), ``"unlisted"`` (none;
    needs ``k < V``) or ``"mixed"``."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    sh = torch.randn(*lead, H, generator=g, dtype=f64)
    sw = torch.randn(V, H, generator=g, dtype=f64) * 2.0 / H ** 0.5
    sb = torch.randn(V, generator=g, dtype=f64) if bias else None
    logp = torch.log_softmax(torch.randn(*lead, V, generator=g, dtype=f64) * 2.0, dim=-1)
    ids = logp.topk(k, dim=-1).indices
    a = logp.gather(-1, ids).float()
    listed_y = ids.gather(-1, torch.randint(0, k, (*lead, 1), generator=g)).squeeze(-1)
    if target == "listed" or k == V:
        y = listed_y
    else:
        listed = torch.zeros(*lead, V, dtype=torch.bool).scatter(-1, ids, True)
        y = torch.rand(*lead, V, generator=g).masked_fill(listed, -1.0).argmax(-1)
        if target == "mixed":
            y = torch.where(torch.rand(lead, generator=g) < 0.5, listed_y, y)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return [cast(x) for x in (sh, sw, sb)], ids, a, y


def _rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    norm = float(ref.norm())
    return float((got - ref).norm()) if norm < 1e-12 else float((got - ref).norm()) / norm


class _Paths(PathCounter):
    """Counts the calls of the CPU single pass and of the two-pass forward."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch, cpu_backend, torch_backend, "sparse_forward")

    @property
    def taken(self):
        return self.single, self.two_pass


def _compare(mask, inputs, ids, a, y, dtype, *, token_weights=None, **options):
    """The fused loss and its gradients (hidden, weight, bias) against the float64 reference."""
    sh, sw, sb = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (sh, sw) + ((sb,) if sb is not None else ())]
    kw = dict(target_ids=y, epsilon=1e-4, delta=0.25, coef=0.7, **options)
    loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask, student_bias=leaves[2] if sb is not None else None,
                                 token_weights=token_weights, backend="torch", **kw)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    kw.pop("memory", None)
    kw.pop("chunk_size", None)
    if kw.get("step_divergence") is None:
        kw["step_divergence"] = "none" if token_weights is not None else "kl"
    ref, _ = ref_sparse_sod_loss(ref_leaves[0], ref_leaves[1], ids, a, mask,
                                 student_bias=ref_leaves[2] if sb is not None else None,
                                 token_weights=None if token_weights is None else token_weights.double(), **kw)
    assert loss.dtype == dtype
    assert torch.allclose(loss.double(), ref.detach(), rtol=LOSS_TOL[dtype], atol=LOSS_TOL[dtype])
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        if want.norm() == 0:
            assert bool((got == 0).all())
        else:
            assert _rel(got, want) < GRAD_TOL[dtype]
    return loss.detach(), grads


# ------------------------------------------------------------------------------------------- exactness
CASES = [
    # divergence, k, temperature, softcap, bias, hard weight, sampled token, weighting, chunk_size
    ("reverse_kl", 5, 1.0, None, True, 0.0, "mixed", "kl", 5),
    ("forward_kl", 5, 0.7, None, False, 0.0, "mixed", "sampled", 6),
    ("jsd", 5, 1.3, 2.5, True, 0.0, "mixed", "none", 3),
    ("reverse_kl", 29, 0.8, 2.0, True, 0.6, "listed", "token_weights", 4),     # k = V: no tail bucket
    ("forward_kl", 29, 1.0, None, True, 0.4, "listed", "kl", 7),
    ("jsd", 29, 0.6, 3.0, False, 0.9, "listed", "sampled", 9),
    ("reverse_kl", 8, 1.0, 1.5, True, 0.8, "unlisted", "sampled", 5),
    ("forward_kl", 8, 1.4, 2.0, True, 0.5, "unlisted", "none", 2),
    ("jsd", 3, 0.9, None, True, 0.7, "unlisted", "kl", None),
    ("jsd", 8, 1.0, 1.5, True, 1.1, "mixed", "token_weights", 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence,k,temperature,softcap,bias,hard,target,weighting,chunk", CASES)
def test_single_pass_matches_the_reference(monkeypatch, dtype, divergence, k, temperature, softcap, bias, hard, target,
                                           weighting, chunk):
    """Every case runs the single pass (chunks of at most ``chunk`` rows; the steps of MASK are at most 5 rows
    long, the chunk sizes below 5 only with weights known per token) and matches the reference."""
    inputs, ids, a, y = _problem(tuple(MASK.shape), 6, 29, k, dtype, seed=k + len(divergence), bias=bias,
                                 target=target)
    token_weights = None
    if weighting == "token_weights":
        token_weights = torch.rand(MASK.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * 2
    paths = _Paths(monkeypatch)
    _compare(MASK, inputs, ids, a, y, dtype, token_weights=token_weights, divergence=divergence, beta=0.3,
             step_divergence=None if weighting == "token_weights" else weighting, temperature=temperature,
             student_softcap=softcap, hard_loss_weight=hard, chunk_size=chunk)
    assert paths.taken == (1, 0)


@given(mask=step_masks(max_rows=3, max_len=30, max_steps=6), H=st.integers(1, 9), V=st.integers(2, 40),
       k_frac=st.floats(0.0, 1.0), divergence=st.sampled_from(["reverse_kl", "forward_kl", "jsd"]),
       weighting=st.sampled_from(["kl", "sampled", "none", "token_weights"]),
       reduction=st.sampled_from(["token_mean", "sum"]), temperature=st.sampled_from([1.0, 0.6, 1.7]),
       bias=st.booleans(), softcap=st.sampled_from([None, 1.5]), hard=st.sampled_from([0.0, 0.7]),
       dtype=st.sampled_from([torch.float32, torch.float64]), chunk=st.sampled_from([None, 1, 4, 16]),
       seed=st.integers(0, 2**31 - 1))
def test_property_against_the_reference(mask, H, V, k_frac, divergence, weighting, reduction, temperature, bias,
                                        softcap, hard, dtype, chunk, seed):
    """Random masks (no step, one-token steps, empty batches), sizes, options and chunkings: whichever path runs
    (the single pass, or two passes where a step is longer than ``chunk``), the reference's loss and gradients."""
    if int(mask.sum()) == 0:
        return   # nothing distilled: covered by tests/sod_kernels/sparse/test_sparse_teacher.py
    k = max(1, min(V, round(k_frac * V)))
    inputs, ids, a, y = _problem(tuple(mask.shape), H, V, k, dtype, seed, bias=bias)
    token_weights = None
    if weighting == "token_weights":
        token_weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2
    _compare(mask, inputs, ids, a, y, dtype, token_weights=token_weights, divergence=divergence, beta=0.3,
             step_divergence=None if weighting == "token_weights" else weighting, reduction=reduction,
             temperature=temperature, student_softcap=softcap, hard_loss_weight=hard, chunk_size=chunk)


def test_single_pass_equals_the_two_pass_path(monkeypatch):
    """memory="fast" (one pass) and memory="low" (two passes) agree to float64 rounding, JSD + hard term + cap."""
    inputs, ids, a, y = _problem(tuple(MASK.shape), 7, 31, 6, torch.float64, seed=3)
    paths = _Paths(monkeypatch)
    results = []
    for memory in ("fast", "low"):
        results.append(_compare(MASK, inputs, ids, a, y, torch.float64, divergence="jsd", beta=0.3,
                                hard_loss_weight=0.5, student_softcap=2.0, temperature=0.8, memory=memory,
                                step_divergence="sampled", chunk_size=5))
    assert paths.taken == (1, 1)
    (l1, g1), (l2, g2) = results
    assert abs(float(l1 - l2)) < 1e-13 and all(_rel(a_, b_) < 1e-12 for a_, b_ in zip(g1, g2))


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (False, False, True)])
def test_only_the_wanted_gradients_are_formed(monkeypatch, wanted):
    """One leaf at a time (the others frozen): the single pass forms only that gradient, equal to memory="low"."""
    inputs, ids, a, y = _problem(tuple(MASK.shape), 6, 30, 5, torch.float64, seed=7)
    paths = _Paths(monkeypatch)
    grads = []
    for memory in ("fast", "low"):
        leaves = [x.detach().clone().requires_grad_(w) for x, w in zip(inputs, wanted)]
        fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, MASK, target_ids=y, student_bias=leaves[2],
                              hard_loss_weight=0.3, memory=memory).backward()
        assert [x.grad is not None for x in leaves] == list(wanted)
        grads.append(next(x.grad for x in leaves if x.grad is not None))
    assert paths.taken == (1, 1)
    assert _rel(grads[0], grads[1]) < 1e-12


def test_16_bit_inputs_compute_in_float32():
    (sh, sw, sb), ids, a, y = _problem((12,), 16, 50, 6, torch.float64, seed=2)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1])
    leaves = [x.to(torch.bfloat16).requires_grad_() for x in (sh, sw)]
    loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask, target_ids=y, hard_loss_weight=0.3)
    loss.backward()
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref, _ = ref_sparse_sod_loss(ref_leaves[0], ref_leaves[1], ids, a, mask, target_ids=y, hard_loss_weight=0.3)
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.dtype == torch.bfloat16 and _rel(got.grad, want.grad) < 2e-2


# ------------------------------------------------------------------------------------------- path selection
def _call(monkeypatch, mask, **options):
    paths = _Paths(monkeypatch)
    (sh, sw, _), ids, a, y = _problem(tuple(mask.shape), 8, 40, 5, torch.float32, 0, bias=False)
    h = sh.requires_grad_(options.pop("grad", True))
    out = fused_sparse_sod_loss(h, sw, ids, a, mask, target_ids=y, backend=options.pop("backend", "torch"),
                                **options)
    if out.requires_grad:
        out.sum().backward()
    return paths.taken


def test_single_pass_is_the_default_on_cpu(monkeypatch):
    for options in ({}, {"backend": "auto"}, {"step_divergence": "sampled"}, {"step_divergence": "none"},
                    {"reduction": "sum"}, {"token_weights": torch.rand(MASK.shape)}, {"chunk_size": 5},
                    {"divergence": "jsd", "hard_loss_weight": 0.5}):
        assert _call(monkeypatch, MASK, **options) == (1, 0), options


def test_two_passes_where_the_single_pass_does_not_apply(monkeypatch):
    assert _call(monkeypatch, MASK, memory="low") == (0, 1)
    assert _call(monkeypatch, MASK, memory="low", hard_loss_weight=0.5, divergence="jsd") == (0, 1)
    assert _call(monkeypatch, MASK, reduction="none") == (0, 1)
    assert _call(monkeypatch, MASK, grad=False) == (0, 1)                   # forward only
    assert _call(monkeypatch, MASK, chunk_size=3) == (0, 1)                 # a step of 4 rows is longer
    assert _call(monkeypatch, MASK, chunk_size=3, step_divergence="none") == (1, 0)   # no steps to respect
    assert _call(monkeypatch, MASK * 0) == (0, 1)                           # nothing distilled


def test_chunks_grow_to_hold_a_step_up_to_the_largest_chunk(monkeypatch):
    mask = torch.ones(1, 100, dtype=torch.int64)
    # 40 columns x 4 bytes: the default chunk holds 32 rows, the largest 64 or 128.
    monkeypatch.setattr(cpu_backend, "CPU_CHUNK_BYTES", 32 * 40 * 4)
    monkeypatch.setattr(cpu_backend, "CPU_MAX_CHUNK_BYTES", 128 * 40 * 4)
    assert _call(monkeypatch, mask) == (1, 0)                               # one step of 100 rows: grows to 100
    monkeypatch.setattr(cpu_backend, "CPU_MAX_CHUNK_BYTES", 64 * 40 * 4)
    assert _call(monkeypatch, mask) == (0, 1)                               # longer than the largest chunk


class _Record(TorchDispatchMode):
    """Every op's name and its outputs' sizes while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t.numel()))
        return out

    def count(self, *names) -> int:
        return sum(1 for name, _ in self.ops if any(name.startswith(f"aten.{n}.") for n in names))


def test_one_logit_product_per_chunk_and_chunk_sized_blocks(monkeypatch):
    """The single pass makes three matrix products per chunk (the logits, d(hidden), d(weight)): the logits are
    never recomputed, as the two-pass path (memory="low") does.  No tensor reaches N x V (here larger than every
    input)."""
    N, V, H, k = 96, 1000, 8, 7
    monkeypatch.setattr(cpu_backend, "CPU_CHUNK_BYTES", 16 * V * 4)  # 16 rows per chunk: 6 chunks
    (sh, sw, sb), ids, a, y = _problem((N,), H, V, k, torch.float32, 4)
    step_ids = torch.arange(N) // 8
    counts = []
    for memory in ("fast", "low"):
        leaves = [x.detach().clone().requires_grad_() for x in (sh, sw, sb)]
        with _Record() as rec:
            fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, step_ids=step_ids, target_ids=y, student_bias=leaves[2],
                                  hard_loss_weight=0.4, memory=memory,
                                  chunk_size=None if memory == "fast" else 16).backward()
        counts.append(rec.count("mm", "addmm", "addmm_"))
        if memory == "fast":
            sizes = [n for _, n in rec.ops]
            assert 16 * V <= max(sizes) <= 16 * V + H * V
    assert counts == [3 * 6, 4 * 6]   # two passes over 16-row chunks: the logits once more per chunk


def test_bitwise_reproducible():
    inputs, ids, a, y = _problem(tuple(MASK.shape), 10, 37, 5, torch.float32, seed=10)

    def run(**options):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, MASK, target_ids=y, student_bias=leaves[2],
                                     chunk_size=6, **options)
        loss.backward()
        return [loss.detach()] + [x.grad for x in leaves]

    for options in ({}, {"step_divergence": "sampled", "divergence": "jsd", "beta": 0.3, "hard_loss_weight": 0.5,
                         "student_softcap": 2.0}):
        for x, z in zip(run(**options), run(**options)):
            assert torch.equal(x, z)


def test_second_backward_is_refused_and_upstream_gradient_scales():
    (sh, sw, _), ids, a, y = _problem((2, 9), 5, 30, 4, torch.float32, 1, bias=False)
    mask = torch.ones(2, 9, dtype=torch.int64)
    h = sh.requires_grad_()
    loss = fused_sparse_sod_loss(h, sw, ids, a, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
    g1 = h.grad.clone()
    h.grad = None
    (fused_sparse_sod_loss(h, sw, ids, a, mask) * -2.5).backward()
    assert torch.allclose(h.grad, -2.5 * g1, rtol=1e-6, atol=1e-8)


def test_stats_match_the_two_pass_path():
    inputs, ids, a, y = _problem(tuple(MASK.shape), 6, 30, 4, torch.float64, seed=5)
    runs = [fused_sparse_sod_loss(inputs[0].requires_grad_(), inputs[1], ids, a, MASK, target_ids=y, memory=memory,
                                  step_divergence="sampled", return_stats=True) for memory in ("fast", "low")]
    for field in ("loss", "token_divergence", "token_weights", "step_divergence", "step_weights"):
        assert torch.allclose(getattr(runs[0], field).detach(), getattr(runs[1], field).detach(), rtol=1e-12,
                              atol=1e-14), field


# --------------------------------------------------------------------------------- compiled epilogue
@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    monkeypatch.setattr(cpu_epilogue, "_broken", [])
    monkeypatch.setattr(cpu_backend, "_broken", [])
    if not cpu_epilogue.compile_enabled():
        pytest.skip("torch.compile is not supported here")


COMPILED_CASES = [
    # the default variant (float32, no cap) and a float64 capped variant with the JSD and the hard term
    (torch.float32, dict(divergence="reverse_kl", step_divergence="kl")),
    (torch.float64, dict(divergence="jsd", beta=0.3, student_softcap=2.0, hard_loss_weight=0.6,
                         step_divergence="sampled")),
]


@pytest.mark.parametrize("dtype,options", COMPILED_CASES)
def test_compiled_epilogue_matches_eager_and_the_reference(compiled, monkeypatch, dtype, options):
    mask = torch.tensor([[0] + [1] * 20 + [0, 0] + [1] * 13 + [0] * 3 + [1] * 30 + [0],
                         [1] * 9 + [0] + [1] * 40 + [0] * 8 + [1] * 12])
    inputs, ids, a, y = _problem(tuple(mask.shape), 24, 333, 9, dtype, seed=11)
    options = dict(options, temperature=0.8, chunk_size=48)

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        loss = fused_sparse_sod_loss(leaves[0], leaves[1], ids, a, mask, target_ids=y, student_bias=leaves[2],
                                     **options)
        loss.backward()
        return [loss.detach()] + [x.grad for x in leaves]

    paths = _Paths(monkeypatch)
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "0")
    eager = run()
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    first, second = run(), run()
    assert paths.taken == (3, 0)
    assert "tail_stats" in cpu_backend._compiled and not cpu_backend._broken
    for x, z in zip(first, second):          # compiled runs are bitwise reproducible
        assert torch.equal(x, z)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for x, z in zip(first, eager):           # compiled and eager agree to rounding
        assert _rel(x, z) < tol
    _compare(mask, inputs, ids, a, y, dtype, **options)   # and the reference (compiled)


def test_compiled_epilogue_is_not_recompiled_per_call_or_chunk(compiled):
    from torch._dynamo.utils import counters

    (sh, sw, _), _, _, _ = _problem((45,), 24, 333, 6, torch.float32, 3, bias=False)
    ids = torch.arange(6).repeat(45, 1)
    a = torch.full((45, 6), -2.5)
    mask = torch.ones(45, dtype=torch.int64)
    h = sh.requires_grad_()
    fused_sparse_sod_loss(h, sw, ids, a, mask, step_divergence="none", chunk_size=20).backward()  # warm
    before = dict(counters["stats"])
    for V, chunk in ((333, 7), (250, 9)):   # other chunk sizes and vocabularies: the same variant
        fused_sparse_sod_loss(h, sw[:V].contiguous(), ids, a, mask, step_divergence="none",
                              chunk_size=chunk).backward()
    assert counters["stats"].get("unique_graphs", 0) == before.get("unique_graphs", 0)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")
    monkeypatch.setattr(cpu_epilogue, "_broken", [])
    monkeypatch.setattr(cpu_backend, "_broken", [])
    monkeypatch.setattr(cpu_backend, "_compiled", {})

    def broken_compile(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken_compile)
    (sh, sw, _), ids, a, _ = _problem((12,), 5, 30, 4, torch.float32, 1, bias=False)
    mask = torch.ones(12, dtype=torch.int64)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        got = fused_sparse_sod_loss(sh, sw.requires_grad_(), ids, a, mask)
    assert cpu_backend._broken
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "0")
    assert torch.equal(got.detach(), fused_sparse_sod_loss(sh, sw, ids, a, mask).detach())
