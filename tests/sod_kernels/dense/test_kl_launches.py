"""The dense single pass's kernel diet: launches per row chunk, no host synchronisation inside the pass, and the
results it gives (float64 reference, in-kernel step weights against the torch formula, bitwise reproducibility).

Launches are counted with :class:`benchmarks.launches.LaunchCounter` (kernels stubbed: tensor operations that launch
a kernel on a GPU plus Triton launches) on a call with ``N`` chunks and on the same call with ``2 N`` chunks (twice
the rows, the same chunk size): the difference over ``N`` is what one more chunk costs, whatever the per-call setup.
The d(weight) fold is set to two chunks (hidden size 32: the fold buffer may hold two 16-row chunks), so its product
is counted at its amortized share.  Budget per chunk (contiguous rows): two logit products, the statistics kernel,
(JSD: its partial sums kernel,) the row-finish kernel, the d(logits) kernel, the d(hidden) product, and per fold of
two chunks the d(weight) product (+ the d(bias) product).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.launches import LaunchCounter
from reference import ref_fused_sod_loss
from sod_kernels import fused_sod_loss
from sod_kernels.dense import triton_backend
from sod_kernels.steps.finish import single_pass_plan
from tests.conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
MAX_LAUNCHES_PER_CHUNK = 8
GATHERS_PER_CHUNK = 2  # rows that are not contiguous: one gather of hidden rows per model

# name -> fused_sod_loss options (the launch cases and the exactness cases)
CASES = {
    "kl": dict(step_divergence="kl"),
    "sampled": dict(step_divergence="sampled"),
    "none": dict(step_divergence="none"),
    "token_weights": dict(token_weights=True),
    "forward_kl-hard": dict(divergence="forward_kl", hard_loss_weight=0.5),
    "jsd": dict(divergence="jsd", beta=0.3),
    "jsd-sampled-hard": dict(divergence="jsd", beta=0.7, step_divergence="sampled", hard_loss_weight=0.4),
    "kl-bias-softcap": dict(bias=True, student_softcap=3.0, teacher_softcap=4.0),
    "jsd-bias-hard": dict(divergence="jsd", beta=0.5, bias=True, hard_loss_weight=1.0),
}


def _options(case: str, lead, device, generator):
    kw = dict(CASES[case])
    bias = kw.pop("bias", False)
    if kw.pop("token_weights", False):
        kw["token_weights"] = torch.rand(lead, generator=generator).to(device)
    return kw, bias


def _launch_inputs(rows_per_seq: int, *, seqs: int = 2, vocab: int = 64, hidden: int = 32, contiguous: bool = True):
    g = torch.Generator().manual_seed(0)
    sh = torch.randn(seqs, rows_per_seq, hidden, generator=g, requires_grad=True)
    sw = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_()
    sb = torch.randn(vocab, generator=g).requires_grad_()
    th, tw = torch.randn(seqs, rows_per_seq, hidden + 4, generator=g), torch.randn(vocab, hidden + 4, generator=g)
    tb = torch.randn(vocab, generator=g)
    step_ids = (torch.arange(rows_per_seq) // 8).expand(seqs, rows_per_seq).clone()  # 8-row steps
    if not contiguous:  # the last row of every step is not distilled: 7-row steps, rows not arange(N)
        step_ids[:, 7::8] = -1
    y = torch.randint(0, vocab, (seqs, rows_per_seq), generator=g)
    return sh, sw, sb, th, tw, tb, step_ids, y


def _count(case: str, rows_per_seq: int, chunk_size: int, monkeypatch, contiguous: bool = True):
    """``(launches, syncs of the whole call, syncs inside single_pass_loss)`` of one forward (kernels stubbed)."""
    sh, sw, sb, th, tw, tb, step_ids, y = _launch_inputs(rows_per_seq, contiguous=contiguous)
    kw, bias = _options(case, step_ids.shape, "cpu", torch.Generator().manual_seed(1))
    inside = []
    real = triton_backend.single_pass_loss

    def instrumented(*args, **kwargs):
        before = counter.syncs
        res = real(*args, **kwargs)
        inside.append(counter.syncs - before)
        return res

    monkeypatch.setattr(triton_backend, "single_pass_loss", instrumented)
    with LaunchCounter(stub=True) as counter:
        fused_sod_loss(sh, sw, th, tw, step_ids=step_ids, target_ids=y, backend="triton", chunk_size=chunk_size,
                       check_inputs=False, student_bias=sb if bias else None, teacher_bias=tb if bias else None, **kw)
    assert inside, "the single pass did not run"
    return counter.launches, counter.syncs, sum(inside)


@pytest.mark.parametrize("case", list(CASES))
def test_launches_per_chunk_and_no_sync_inside_the_pass(case, monkeypatch):
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", "32")  # d(weight) folded every 2 chunks of 16 rows
    chunk, rows = 16, 32  # 2 sequences x 32 rows: 4 chunks; x 64 rows: 8 chunks
    small, syncs_small, inside_small = _count(case, rows, chunk, monkeypatch)
    large, syncs_large, inside_large = _count(case, 2 * rows, chunk, monkeypatch)
    per_chunk = (large - small) / 4
    assert per_chunk <= MAX_LAUNCHES_PER_CHUNK, (case, per_chunk)
    assert inside_small == inside_large == 0, (case, inside_small, inside_large)
    assert syncs_small == syncs_large, (case, syncs_small, syncs_large)


@pytest.mark.parametrize("case", ["kl", "jsd-sampled-hard"])
def test_rows_that_are_not_contiguous_add_only_the_gathers(case, monkeypatch):
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", "28")
    chunk, rows = 14, 32  # 7-row steps: chunks of 2 steps
    small, syncs_small, inside_small = _count(case, rows, chunk, monkeypatch, contiguous=False)
    large, syncs_large, inside_large = _count(case, 2 * rows, chunk, monkeypatch, contiguous=False)
    per_chunk = (large - small) / 4
    assert per_chunk <= MAX_LAUNCHES_PER_CHUNK + GATHERS_PER_CHUNK, (case, per_chunk)
    assert inside_small == inside_large == 0 and syncs_small == syncs_large


# ------------------------------------------------------------------------------------------------- results
B, T, HS, HT, V, VT = 3, 14, 10, 12, 67, 70
MASK = torch.tensor([[1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1],
                     [0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0],
                     [1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1]])
ALL_STEPS = (torch.arange(T) // 4).expand(B, T).clone()  # every row distilled: contiguous rows


def _problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(B, T, HS, generator=g, dtype=torch.float64)
    sw = torch.randn(V, HS, generator=g, dtype=torch.float64) * 2.0 / HS ** 0.5
    th = torch.randn(B, T, HT, generator=g, dtype=torch.float64)
    tw = torch.randn(VT, HT, generator=g, dtype=torch.float64) * 2.0 / HT ** 0.5
    sb = torch.randn(V, generator=g, dtype=torch.float64)
    tb = torch.randn(VT, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    return [x.to(dtype).to(DEVICE) for x in (sh, sw, th, tw, sb, tb)], y.to(DEVICE)


def _run(case, rows, chunk_size, seed=0):
    (sh, sw, th, tw, sb, tb), y = _problem(seed)
    kw, bias = _options(case, (B, T), DEVICE, torch.Generator().manual_seed(seed + 7))
    leaves = [x.detach().clone().requires_grad_() for x in ((sh, sw, sb) if bias else (sh, sw))]
    steps = {"step_ids": ALL_STEPS.to(DEVICE)} if rows == "all" else {"response_mask": MASK.to(DEVICE)}
    loss = fused_sod_loss(leaves[0], leaves[1], th, tw, target_ids=y, student_bias=leaves[2] if bias else None,
                          teacher_bias=tb if bias else None, epsilon=1e-3, delta=0.25, coef=0.8, backend="triton",
                          chunk_size=chunk_size, **steps, **kw)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves], (sh, sw, th, tw, sb, tb), y, kw, bias, steps


@pytest.mark.parametrize("rows", ["masked", "all"])
@pytest.mark.parametrize("case", list(CASES))
def test_single_pass_matches_the_float64_reference(case, rows, monkeypatch):
    """Chunks of several steps, sequences spanning chunks (their first step's mean read from the means buffer),
    the fold over several chunks; loss and gradients against float64 autograd (SPEC 9: 1e-5 / 1e-4)."""
    calls = []
    real = triton_backend.single_pass_loss
    monkeypatch.setattr(triton_backend, "single_pass_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("SOD_KERNELS_FOLD_ROWS", "12")
    loss, grads, (sh, sw, th, tw, sb, tb), y, kw, bias, steps = _run(case, rows, chunk_size=9)
    assert calls, "the single pass did not run"
    up = lambda x: x.detach().double().cpu()  # noqa: E731
    ref_leaves = [up(x).requires_grad_() for x in ((sh, sw, sb) if bias else (sh, sw))]
    ref_kw = {k: (up(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if "token_weights" in ref_kw:
        ref_kw["step_divergence"] = "none"
    ref_loss, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], up(th), up(tw),
                                     **{k: v.cpu() for k, v in steps.items()}, target_ids=y.cpu(),
                                     student_bias=ref_leaves[2] if bias else None,
                                     teacher_bias=up(tb) if bias else None,
                                     epsilon=1e-3, delta=0.25, coef=0.8, **ref_kw)
    ref_loss.backward()
    assert torch.allclose(loss.double().cpu(), ref_loss.detach(), rtol=1e-5, atol=1e-7), (loss, ref_loss)
    for got, want in zip(grads, ref_leaves):
        err = float((got.double().cpu() - want.grad).norm()) / max(float(want.grad.norm()), 1e-30)
        assert err < 1e-4, (case, err)


@pytest.mark.parametrize("case", ["kl", "jsd-sampled-hard"])
def test_single_pass_is_bitwise_reproducible(case):
    first, second = _run(case, "masked", 9), _run(case, "masked", 9)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampled", [False, True])
def test_in_kernel_step_weights_equal_the_torch_formula(sampled):
    """The row-finish kernel's step weights (prefix sums, the means buffer) against InPassStepWeights.chunk_weights
    called per chunk (the path of a plain callable), on the same chunks."""
    (sh, sw, th, tw, _, _), y = _problem(3)
    ids = torch.where(MASK.to(DEVICE) > 0, torch.cumsum(MASK.to(DEVICE), 1) // 3, -1)  # steps of <= 3 tokens
    # make step ids start at 0 and never skip in each row (the resolved form the plan expects)
    ids = torch.where(ids >= 0, ids - ids.masked_fill(ids < 0, 10**6).amin(1, keepdim=True), -1)
    row_index = torch.nonzero(ids.reshape(-1) >= 0).squeeze(1)

    def run(wrap):
        chunks, weights = single_pass_plan(ids, row_index, None, "sampled" if sampled else "kl", 1e-3, 0.25, 7, V, 4)
        p = triton_backend.KLProblem.build(sh.reshape(B * T, HS), sw, None, th.reshape(B * T, HT), tw, None,
                                           row_index, y.reshape(-1), "reverse_kl", 1.0)
        fn = (lambda a, b, D, s: weights(a, b, D, s)) if wrap else weights  # noqa: E731
        return triton_backend.single_pass_loss(p, chunks, fn, coef=1.0, normalizer=float(row_index.numel()),
                                               need_hidden=True, need_weight=True, need_bias=False,
                                               sampled_signal=sampled)

    fused, torch_formula = run(False), run(True)
    assert torch.allclose(fused.loss, torch_formula.loss, rtol=1e-6, atol=0)
    for a, b in zip(fused.grads[:2], torch_formula.grads[:2]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_statistics_grid_fills_the_gpu():
    """The statistics kernels' split counts (kernels.balanced_splits): at the headline chunk (512 rows of V = 151936
    in 2048-column blocks) at least 4 waves of the resident programs, equal programs (75 blocks = 15 x 5), and every
    split non-empty for other shapes."""
    from sod_kernels.dense import kernels

    resident = 132 * kernels.KL_STATS_PROGRAMS_PER_SM
    per, splits = kernels._balanced(512, 75, resident)
    assert (per, splits) == (5, 15) and 512 * splits / resident >= kernels.STATS_MIN_WAVES
    for rows, blocks in ((1, 75), (256, 75), (1024, 16), (4096, 16), (16, 1), (512, 2), (8192, 3)):
        for pps in (kernels.KL_STATS_PROGRAMS_PER_SM, 3):
            per, splits = kernels._balanced(rows, blocks, 132 * pps)
            assert 1 <= splits <= kernels.STATS_MAX_SPLITS and (splits - 1) * per < blocks <= splits * per


def test_jsd_partials_read_statistics_with_another_split_count(monkeypatch):
    """On a GPU the JSD's partial sums kernel may split the vocabulary differently from the statistics kernel whose
    partials it merges (3 vs 6 resident programs per SM): forced here (3 JSD splits, 2 statistics splits)."""
    from sod_kernels.dense import jsd_kernels

    (sh, sw, th, tw, _, _), y = _problem(5)
    rows = torch.arange(B * T, device=DEVICE)

    def run():
        p = triton_backend.KLProblem.build(sh.reshape(B * T, HS), sw, None, th.reshape(B * T, HT), tw, None, rows,
                                           y.reshape(-1), "jsd", 1.0, beta=0.4)
        return triton_backend.single_pass_loss(p, [(0, 17), (17, B * T)], lambda a, b, D, s: torch.ones_like(D),
                                               coef=1.0, normalizer=float(B * T), need_hidden=True, need_weight=True,
                                               need_bias=False)

    same = run()
    real = jsd_kernels.balanced_splits

    def three_splits(n_rows, vocab, device, programs_per_sm=3):
        block, _, _ = real(n_rows, vocab, device, programs_per_sm)
        blocks = -(-vocab // block)
        per = -(-blocks // 3)
        return block, per * block, -(-blocks // per)

    monkeypatch.setattr(jsd_kernels, "balanced_splits", three_splits)
    other = run()
    assert torch.allclose(same.D, other.D, rtol=1e-5, atol=1e-7)
    assert torch.allclose(same.loss, other.loss, rtol=1e-5)
    for a, b in zip(same.grads[:2], other.grads[:2]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
