"""The C++ epilogue kernels (sod_kernels.core.cpu_native: KL statistics, token log-prob statistics and gradient)
against the PyTorch epilogues they replace, their dispatch from cpu_epilogue.run, the switch and the fallback,
and fused_sod_loss, fused_token_logprobs and fused_sod_policy_loss with and without them."""

from __future__ import annotations

import warnings

import pytest
import torch

from reference import ref_token_logprobs
from sod_kernels import fused_sod_loss, fused_sod_policy_loss, fused_token_logprobs
from sod_kernels.core import cpu_epilogue, cpu_native
from tests.helpers import dense_problem

TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


def _blocks(C, V, dtype, seed, ld=None, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    ld = ld or V
    xs = torch.randn(C, ld, generator=g, dtype=dtype) * scale
    xt = torch.randn(C, ld, generator=g, dtype=dtype) * scale
    bs, bt = torch.randn(V, generator=g, dtype=dtype), torch.randn(V, generator=g, dtype=dtype)
    return xs, xt, bs, bt


def _scalars(dtype, temperature):
    return torch.tensor(1.0 / temperature, dtype=dtype), torch.tensor(1.0, dtype=dtype), torch.tensor(1.0, dtype=dtype)


@pytest.fixture(autouse=True)
def compiled_epilogues(monkeypatch):
    """The suite runs the CPU epilogues eagerly (tests/conftest.py); the kernel belongs to the compiled path."""
    monkeypatch.setenv(cpu_epilogue.ENV_COMPILE, "1")


@pytest.fixture
def lib():
    built = cpu_native.library()
    if built is None:   # pragma: no cover - every machine that runs torch.compile on the CPU builds it
        pytest.fail(f"the C++ kernel did not build here: {cpu_native._broken}")
    return built


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("forward_kl", [False, True])
@pytest.mark.parametrize("C,V,ld", [(1, 1, None), (3, 15, None), (5, 16, None), (7, 17, 40), (37, 1003, None),
                                    (64, 4099, 4101)])
def test_kernel_matches_the_pytorch_epilogue(lib, C, V, ld, dtype, forward_kl):
    xs, xt, bs, bt = _blocks(C, V, dtype, seed=C * V, ld=ld)
    xs, xt = xs[:, :V], xt[:, :V]                 # a row stride above V where ld is given: views like the blocks
    inv_temp, scap, tcap = _scalars(dtype, 0.7)
    ref_blocks = (xs.clone(), xt.clone())
    expected = cpu_epilogue.kl_stats(*ref_blocks, bs, bt, inv_temp, scap, tcap, forward_kl, False, False)
    got = cpu_native.kl_stats(lib, xs, xt, bs, bt, float(inv_temp), forward_kl)
    for a, b in zip(got, expected):
        assert a.dtype == dtype and a.shape == (C,)
        assert float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) < TOL[dtype]
    for a, b in zip((xs, xt), ref_blocks):       # the blocks the gradient epilogue reads
        assert float((a - b).abs().max()) < TOL[dtype] * 8


def test_kernel_is_bitwise_repeatable(lib):
    xs, xt, bs, bt = _blocks(33, 2000, torch.float32, seed=1)
    runs = []
    for _ in range(3):
        a, b = xs.clone(), xt.clone()
        runs.append(cpu_native.kl_stats(lib, a, b, bs, bt, 1.0, False) + (a, b))
    for other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], other))


def test_extreme_logits_stay_finite(lib):
    xs, xt, bs, bt = _blocks(4, 300, torch.float32, seed=2, scale=3e4)
    D, lse_s, lse_t, centre, sum_s, sum_t = cpu_native.kl_stats(lib, xs, xt, bs * 0, bt * 0, 1.0, False)
    assert all(bool(torch.isfinite(x).all()) for x in (D, lse_s, lse_t, centre, sum_s, sum_t))
    assert bool((D >= -1e-3).all()) and bool((sum_s >= 1).all())


def test_run_dispatches_to_the_kernel_only_without_caps(lib, monkeypatch):
    calls = []
    real = cpu_native.kl_stats
    monkeypatch.setattr(cpu_native, "kl_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    xs, xt, bs, bt = _blocks(6, 50, torch.float32, seed=3)
    inv_temp, scap, tcap = _scalars(torch.float32, 1.0)
    cpu_epilogue.run("kl_stats", xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, False, False, rows=6)
    assert calls == [1]
    cpu_epilogue.run("kl_stats", xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, True, False, rows=6)
    assert calls == [1]                           # a soft-cap: the compiled epilogue
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    cpu_epilogue.run("kl_stats", xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, False, False, rows=6)
    assert calls == [1]


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("1", True), ("Yes", True), ("", True)])
def test_switch(value, enabled, monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_NATIVE, value)
    assert cpu_native.native_enabled() is enabled


def test_bad_switch_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "maybe")
    with pytest.raises(ValueError, match=cpu_native.ENV_NATIVE):
        cpu_native.library()


def test_a_failed_build_warns_once_and_the_epilogue_runs_compiled(monkeypatch):
    monkeypatch.setattr(cpu_native, "_library", [])
    monkeypatch.setattr(cpu_native, "_broken", [])

    def no_compiler():
        raise OSError("no C++ compiler")
    monkeypatch.setattr(cpu_native, "_build", no_compiler)
    xs, xt, bs, bt = _blocks(6, 70, torch.float64, seed=4)
    inv_temp, scap, tcap = _scalars(torch.float64, 1.3)
    ref = cpu_epilogue.kl_stats(xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, False, False)
    with pytest.warns(RuntimeWarning, match="CPU kernels"):
        got = cpu_epilogue.run("kl_stats", xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, False,
                               False, rows=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # once only
        cpu_epilogue.run("kl_stats", xs.clone(), xt.clone(), bs, bt, inv_temp, scap, tcap, False, False, False,
                         rows=6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_fused_sod_loss_with_and_without_the_kernel(divergence, monkeypatch):
    N, V = 45, 517
    (sh, sw, th, tw, _, _), _ = dense_problem(1, N, 12, 20, V, V, torch.float64, seed=9, bias=False, scale=2.0)
    ids = torch.arange(N)[None] // 7

    def run():
        a, b = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        loss = fused_sod_loss(a, b, th, tw, step_ids=ids, divergence=divergence, temperature=0.8)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    _same_with_and_without(run, "kl_stats", monkeypatch)


def _same_with_and_without(run, kernel: str, monkeypatch) -> None:
    """``run()`` (a loss and its gradients) with the C++ kernels off, then on, where ``kernel`` must run: the same
    numbers to float64 rounding."""
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    without = run()
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "1")
    calls = []
    real = getattr(cpu_native, kernel)
    monkeypatch.setattr(cpu_native, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    with_kernel = run()
    assert calls                                  # the kernel ran
    for a, b in zip(with_kernel, without):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------------- token log-prob kernels
def _logprob_block(C, V, dtype, seed, ld=None, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(C, ld or V, generator=g, dtype=dtype) * scale)[:, :V]
    b = torch.randn(V, generator=g, dtype=dtype)
    rows = [torch.randn(C, generator=g, dtype=dtype) for _ in range(2)] + [torch.rand(C, generator=g, dtype=dtype)]
    return x, b, torch.randint(0, V, (C,), generator=g), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("C,V,ld", [(1, 1, None), (3, 15, None), (5, 16, None), (7, 17, 40), (37, 1003, None),
                                    (64, 4099, 4101)])
def test_logprob_stats_kernel_matches_the_pytorch_epilogue(lib, C, V, ld, dtype, with_entropy, keep):
    x, b, _, _ = _logprob_block(C, V, dtype, seed=C + V, ld=ld)
    inv_temp, cap, _ = _scalars(dtype, 0.7)
    ref_x = x.clone()
    expected = cpu_epilogue.logprob_stats(ref_x, b, inv_temp, cap, False, with_entropy, keep)
    before = x.clone()
    got = cpu_native.logprob_stats(lib, x, b, float(inv_temp), with_entropy, keep)
    assert (got[2] is None) is (not with_entropy)
    for a, e in zip(got, expected):
        if e is None:
            continue
        assert a.dtype == dtype and a.shape == (C,)
        assert float(((a - e).abs() / e.abs().clamp_min(1.0)).max()) < TOL[dtype]
    if keep:                                       # x <- exp(z - M), what token_loss_grad reads
        assert float((x - ref_x).abs().max()) < TOL[dtype] * 8
    else:                                          # read only: the block may be kept for the backward
        assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("C,V,ld", [(1, 1, None), (3, 15, None), (7, 17, 40), (37, 1003, None), (64, 4099, 4101)])
def test_logprob_grad_kernel_matches_the_pytorch_epilogue(lib, C, V, ld, dtype, with_entropy):
    x, b, y, (scale, scale_h, ent) = _logprob_block(C, V, dtype, seed=3 * C + V, ld=ld)
    inv_temp, cap, _ = _scalars(dtype, 1.3)
    lse = cpu_epilogue.logprob_stats(x.clone(), b, inv_temp, cap, False, False, False)[0]
    ref_x = x.clone()
    cpu_epilogue.logprob_grad(ref_x, b, inv_temp, cap, lse, y, scale, scale_h, ent, False, with_entropy)
    cpu_native.logprob_grad(lib, x, b, float(inv_temp), lse, y, scale, scale_h, ent, with_entropy)
    assert float((x - ref_x).abs().max()) < TOL[dtype]
    if not with_entropy:                           # rows of scale * (onehot - p) sum to 0
        assert float((x.sum(1) / scale.abs().clamp_min(1e-3)).abs().max()) < TOL[dtype] * V


def test_logprob_kernels_are_bitwise_repeatable(lib):
    x, b, y, (scale, scale_h, ent) = _logprob_block(29, 2000, torch.float32, seed=5)
    stats = [cpu_native.logprob_stats(lib, x.clone(), b, 0.9, True, False) for _ in range(3)]
    grads = []
    for _ in range(3):
        g = x.clone()
        cpu_native.logprob_grad(lib, g, b, 0.9, stats[0][0], y, scale, scale_h, ent, True)
        grads.append(g)
    assert all(torch.equal(a, c) for other in stats[1:] for a, c in zip(stats[0], other))
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_run_dispatches_the_logprob_kernels_only_without_caps(lib, monkeypatch):
    calls = []
    for name in ("logprob_stats", "logprob_grad"):
        real = getattr(cpu_native, name)
        monkeypatch.setattr(cpu_native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name)
                            or _real(*a, **k))
    x, b, y, (scale, scale_h, ent) = _logprob_block(6, 50, torch.float32, seed=6)
    inv_temp, cap, _ = _scalars(torch.float32, 1.0)
    lse = cpu_epilogue.run("logprob_stats", x.clone(), b, inv_temp, cap, False, False, False, rows=6)[0]
    cpu_epilogue.run("logprob_grad", x.clone(), b, inv_temp, cap, lse, y, scale, scale_h, ent, False, False, rows=6)
    assert calls == ["logprob_stats", "logprob_grad"]
    cpu_epilogue.run("logprob_stats", x.clone(), b, inv_temp, cap * 5, True, False, False, rows=6)
    cpu_epilogue.run("logprob_grad", x.clone(), b, inv_temp, cap * 5, lse, y, scale, scale_h, ent, True, False,
                     rows=6)
    assert len(calls) == 2                         # soft-capped: the compiled epilogues


@pytest.mark.parametrize("entropy", [False, True])
def test_fused_token_logprobs_with_the_kernels_matches_the_reference(entropy, monkeypatch):
    g = torch.Generator().manual_seed(11)
    N, H, V = 70, 24, 701
    h0, w0, b0 = (torch.randn(N, H, generator=g, dtype=torch.float64),
                  torch.randn(V, H, generator=g, dtype=torch.float64) / 3, torch.randn(V, generator=g,
                                                                                        dtype=torch.float64))
    y = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    calls = []
    real = cpu_native.logprob_grad
    monkeypatch.setattr(cpu_native, "logprob_grad", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (h0, w0, b0)]
        out = fn(*ins)
        lp, ent = out if isinstance(out, tuple) else (out, None)
        loss = (lp * up).sum() + (0.3 * ent.sum() if ent is not None else 0)
        loss.backward()
        return [lp.detach()] + [t.grad for t in ins]

    got = grads(lambda h, w, b: fused_token_logprobs(h, w, y, bias=b, temperature=0.8, chunk_size=16,
                                                     return_entropy=entropy))
    assert calls                                   # the C++ gradient kernel ran
    if entropy:   # the reference has no entropy: compare with the kernels off (the compiled PyTorch epilogues)
        monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
        want = grads(lambda h, w, b: fused_token_logprobs(h, w, y, bias=b, temperature=0.8, chunk_size=16,
                                                          return_entropy=True))
    else:
        want = grads(lambda h, w, b: ref_token_logprobs(h, w, y, b, 0.8))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)


def test_fused_sod_policy_loss_with_and_without_the_kernels(monkeypatch):
    g = torch.Generator().manual_seed(12)
    B, T, H, V = 2, 23, 16, 389
    h0 = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w0 = torch.randn(V, H, generator=g, dtype=torch.float64) / 3
    y = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 6.0
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.8).long()

    def run():
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss = fused_sod_policy_loss(h, w, y, old, adv, mask)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    _same_with_and_without(run, "logprob_stats", monkeypatch)
