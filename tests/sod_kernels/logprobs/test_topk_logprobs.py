"""fused_topk_logprobs: exact top-k log-probs per position, ties to the lowest id, chunked (no N x V)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference import ref_topk_logprobs
from reference.sod_reference import ref_logits
from sod_kernels import fused_topk_logprobs
from sod_kernels.logprobs import topk
from tests.conftest import HAS_CUDA

DEVICE = "cuda" if HAS_CUDA else "cpu"
LOGPROB_ATOL = 2e-5   # float32 logits and log-sum-exp against float64


@settings(max_examples=40)
@given(lead=st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 0)]), H=st.integers(1, 40), V=st.integers(1, 300),
       k_frac=st.floats(0.0, 1.0), bias=st.booleans(), temperature=st.sampled_from([1.0, 0.5, 2.5]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
       chunk_size=st.sampled_from([None, 1, 3, 16]), seed=st.integers(0, 2**31 - 2))
def test_matches_the_reference(lead, H, V, k_frac, bias, temperature, dtype, chunk_size, seed):
    """Random logits have no exact ties; float32 vs float64 can only swap entries within rounding of each
    other, so the check is: the returned log-probs are the reference's at the returned ids, sorted, and no
    unreturned id beats the k-th one by more than rounding."""
    k = max(1, min(V, round(k_frac * V)))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 3 / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    ids, lp = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), k, bias=None if b is None else b.to(DEVICE),
                                  temperature=temperature, chunk_size=chunk_size)
    assert ids.shape == (*lead, k) and lp.shape == (*lead, k)
    assert ids.dtype == torch.int64 and lp.dtype == torch.float32
    ids, lp = ids.cpu(), lp.cpu()
    logp = torch.log_softmax((h.double() @ w.double().T + (0 if b is None else b.double())) / temperature, dim=-1)
    assert torch.allclose(lp.double(), logp.gather(-1, ids), atol=LOGPROB_ATOL, rtol=0)
    assert (lp[..., 1:] <= lp[..., :-1]).all()
    assert (ids.sort(dim=-1).values[..., 1:] != ids.sort(dim=-1).values[..., :-1]).all()
    rest = logp.scatter(-1, ids, float("-inf")).amax(dim=-1) if k < V else None
    if rest is not None and lp.numel():
        assert (rest <= lp[..., -1].double() + LOGPROB_ATOL).all()
    ref_ids, ref_lp = ref_topk_logprobs(h.double(), w.double(), k, None if b is None else b.double(), temperature)
    assert torch.allclose(lp.double(), ref_lp, atol=LOGPROB_ATOL, rtol=0)


@settings(max_examples=15)
@given(lead=st.sampled_from([(1,), (9,), (3, 5)]), H=st.integers(1, 13), V=st.integers(2, 97),
       k_frac=st.floats(0.0, 1.0), bias=st.booleans(), temperature=st.sampled_from([1.0, 0.7, 2.5]),
       softcap=st.sampled_from([0.5, 2.0, 7.5]), memory=st.sampled_from(["fast", "low"]),
       chunk_size=st.sampled_from([None, 1, 4]), seed=st.integers(0, 2**31 - 2))
def test_softcap_matches_the_reference(lead, H, V, k_frac, bias, temperature, softcap, memory, chunk_size, seed):
    """Raw logits of several caps: the capped top-k are the float64 reference's (the log-probs at the returned
    ids, and nothing unreturned beats the k-th by more than rounding)."""
    k = max(1, min(V, round(k_frac * V)))
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, H, generator=g) * 4
    w = torch.randn(V, H, generator=g) * 3 / H ** 0.5
    b = torch.randn(V, generator=g) if bias else None
    ids, lp = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), k, bias=None if b is None else b.to(DEVICE),
                                  temperature=temperature, chunk_size=chunk_size, softcap=softcap, memory=memory)
    ids, lp = ids.cpu(), lp.cpu()
    hd, wd, bd = h.double(), w.double(), None if b is None else b.double()
    ref_ids, ref_lp = ref_topk_logprobs(hd, wd, k, bd, temperature, softcap=softcap)
    assert torch.allclose(lp.double(), ref_lp, atol=LOGPROB_ATOL, rtol=0)
    logp = torch.log_softmax(ref_logits(hd, wd, bd, temperature, softcap=softcap), dim=-1)
    assert torch.allclose(lp.double(), logp.gather(-1, ids), atol=LOGPROB_ATOL, rtol=0)
    assert (ids.sort(dim=-1).values[..., 1:] != ids.sort(dim=-1).values[..., :-1]).all()
    if k < V:
        rest = logp.scatter(-1, ids, float("-inf")).amax(dim=-1)
        assert (rest <= lp[..., -1].double() + LOGPROB_ATOL).all()


def test_softcap_changes_the_result():
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(11, 7, generator=g) * 5, torch.randn(29, 7, generator=g)
    _, capped = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), 6, softcap=1.5)
    _, plain = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), 6)
    assert (capped.cpu() - plain.cpu()).abs().max() > 0.5
    assert (capped.cpu() >= -2 * 1.5 - torch.log(torch.tensor(29.0)) - 1e-5).all()  # capped logit range


def test_memory_modes_agree_exactly(monkeypatch):
    """A small low-memory budget (the minimum 16-row chunks) against one whole chunk: same ids, same
    log-probs, with ties (small-integer logits) and a soft-cap."""
    N, H, V, k = 53, 5, 31, 7
    monkeypatch.setattr(topk, "LOW_MEMORY_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(7)
    h = torch.randint(-2, 3, (N, H), generator=g).float().to(DEVICE)
    w = torch.randint(-1, 2, (V, H), generator=g).float().to(DEVICE)
    for softcap in (None, 3.0):
        low = fused_topk_logprobs(h, w, k, softcap=softcap, memory="low", temperature=0.9)
        fast = fused_topk_logprobs(h, w, k, softcap=softcap, memory="fast", temperature=0.9)
        whole = fused_topk_logprobs(h, w, k, softcap=softcap, chunk_size=N, temperature=0.9)
        ref_ids, ref_lp = ref_topk_logprobs(h.cpu().double(), w.cpu().double(), k, None, 0.9, softcap=softcap)
        for ids, lp in (low, fast):
            assert torch.equal(ids, whole[0])
            torch.testing.assert_close(lp, whole[1], rtol=0, atol=1e-6)
        assert torch.equal(low[0].cpu(), ref_ids)
        assert torch.allclose(low[1].cpu().double(), ref_lp, atol=1e-5, rtol=0)


def test_low_memory_keeps_its_chunks_under_the_budget(monkeypatch):
    N, H, V = 200, 6, 64
    monkeypatch.setattr(topk, "LOW_MEMORY_CHUNK_BYTES", 32 * V * topk.BYTES_PER_ENTRY)  # 32-row chunks
    h, w = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    recorder = _RecordSizes()
    with recorder:
        ids, lp = fused_topk_logprobs(h, w, 3, memory="low")
    assert recorder.largest <= 32 * V * 8  # one 32-row chunk's int64 keys
    assert recorder.largest < N * V * 4
    ref_ids, ref_lp = fused_topk_logprobs(h, w, 3, chunk_size=N)
    assert torch.equal(ids, ref_ids) and torch.allclose(lp, ref_lp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value,error,match", [(0.0, ValueError, "softcap must be a finite number > 0"),
                                               (-1.0, ValueError, "softcap"), (float("inf"), ValueError, "softcap"),
                                               ("2", TypeError, "softcap must be a number")])
def test_bad_softcap(value, error, match):
    with pytest.raises(error, match=match):
        fused_topk_logprobs(torch.randn(3, 4), torch.randn(11, 4), 2, softcap=value)


@pytest.mark.parametrize("value", ["slow", "LOW", None, 1])
def test_bad_memory(value):
    with pytest.raises(ValueError, match="memory must be one of 'fast', 'low'"):
        fused_topk_logprobs(torch.randn(3, 4), torch.randn(11, 4), 2, memory=value)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
def test_ties_go_to_the_lowest_id(chunk_size):
    """Small-integer logits (exact in float32) tie often: the order is exactly the reference's
    (largest first, equal values by ascending id), whatever the chunking."""
    g = torch.Generator().manual_seed(1)
    h = torch.randint(-2, 3, (23, 4), generator=g).float()
    w = torch.randint(-1, 2, (40, 4), generator=g).float()
    w[7] = 0.0  # logits exactly 0: with a -0.0 in a row, -0.0 and +0.0 still tie
    h[0] = -0.0
    for k in (1, 9, 40):
        ids, lp = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), k, chunk_size=chunk_size)
        ref_ids, ref_lp = ref_topk_logprobs(h.double(), w.double(), k)
        assert torch.equal(ids.cpu(), ref_ids)
        assert torch.allclose(lp.cpu().double(), ref_lp, atol=1e-6, rtol=0)


def test_whole_vocabulary_is_a_sorted_log_softmax():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(2, 3, 8, generator=g), torch.randn(17, 8, generator=g)
    ids, lp = fused_topk_logprobs(h.to(DEVICE), w.to(DEVICE), 17, temperature=0.9)
    full = torch.log_softmax(h @ w.T / 0.9, dim=-1)
    assert torch.equal(ids.cpu().sort(dim=-1).values, torch.arange(17).expand(2, 3, 17))
    assert torch.allclose(lp.cpu().exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(lp.cpu(), full.gather(-1, ids.cpu()), atol=1e-5)


def test_no_gradient_and_requires_grad_inputs_accepted():
    h = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(11, 6, requires_grad=True)
    ids, lp = fused_topk_logprobs(h, w, 3)
    assert not lp.requires_grad and not ids.requires_grad


class _RecordSizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunks_never_hold_tokens_x_vocabulary():
    N, H, V = 512, 8, 500
    h, w = torch.randn(N, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    recorder = _RecordSizes()
    with recorder:
        ids, _ = fused_topk_logprobs(h, w, 4, chunk_size=16)
    assert recorder.largest <= 16 * V * 8  # one chunk's int64 keys
    assert recorder.largest < N * V * 4 // 8
    assert torch.equal(ids, fused_topk_logprobs(h, w, 4)[0])


@pytest.mark.parametrize("k,error,match", [(0, ValueError, "1 <= k"), (12, ValueError, "1 <= k"),
                                           (2.0, TypeError, "k must be an int"), (True, TypeError, "k must be")])
def test_bad_k(k, error, match):
    with pytest.raises(error, match=match):
        fused_topk_logprobs(torch.randn(3, 4), torch.randn(11, 4), k)


def test_bad_inputs():
    h, w = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match="hidden"):
        fused_topk_logprobs(torch.randn(3, 5), w, 2)
    with pytest.raises(ValueError, match="bias"):
        fused_topk_logprobs(h, w, 2, bias=torch.randn(10))
    with pytest.raises(ValueError, match="temperature"):
        fused_topk_logprobs(h, w, 2, temperature=0)
    with pytest.raises(TypeError, match="dtype"):
        fused_topk_logprobs(h.double(), w, 2)
    with pytest.raises(ValueError, match="NaN"):
        fused_topk_logprobs(torch.full((3, 4), float("nan")), w, 2)
