"""The CPU products on the thread pool (sod_kernels.core.cpu_products): vocabulary tiles and fold groups against
float64 products, bitwise repeatability, the thread count restored, errors, fork, and the passes end to end."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from sod_kernels import fused_sod_loss, fused_token_logprobs
from sod_kernels.core import cpu_native, cpu_products

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(params=["native", "pool"])
def three_workers(request, monkeypatch):
    """Tiles for three workers whatever this machine has, small enough that odd sizes get many; run by the C++
    kernels on torch's threads ("native") or by the Python pool."""
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "1" if request.param == "native" else "0")
    monkeypatch.setenv(cpu_products.ENV_POOL, "1")
    monkeypatch.setattr(cpu_products, "workers", lambda: 3)
    monkeypatch.setattr(cpu_products, "MIN_TILE_COLUMNS", 7)
    monkeypatch.setattr(cpu_products, "TILE_COLUMNS", 64)
    return 3


def _close(actual, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    assert float((actual.double() - expected).abs().max() / scale) < TOL[dtype]


@pytest.mark.parametrize("vocab", [1, 6, 7, 8, 301, 1027])
def test_tiles_and_groups_cover_the_vocabulary(vocab, three_workers):
    for split in (cpu_products.column_tiles(vocab, 3), cpu_products.fold_groups(vocab, 33, 17, 4, 3)):
        assert split[0][0] == 0 and split[-1][1] == vocab
        assert all(a < b for a, b in split)
        assert all(split[i][1] == split[i + 1][0] for i in range(len(split) - 1))
        if len(split) > 1:
            assert min(b - a for a, b in split) >= cpu_products.MIN_TILE_COLUMNS
    tiles = cpu_products.column_tiles(vocab, 3)
    if vocab >= cpu_products.TILES_PER_WORKER * 3 * cpu_products.MIN_TILE_COLUMNS:
        assert len(tiles) >= cpu_products.TILES_PER_WORKER * 3


def test_one_worker_is_one_tile_and_partials_are_capped(monkeypatch):
    assert cpu_products.column_tiles(151936, 1) == [(0, 151936)]
    assert cpu_products.fold_groups(151936, 512, 2048, 4, 1) == [(0, 151936)]
    monkeypatch.setattr(cpu_products, "PARTIAL_BYTES", 3 * 512 * 2048 * 4)
    assert len(cpu_products.fold_groups(151936, 512, 2048, 4, 16)) == 4   # three partials + the output rows
    assert len(cpu_products.column_tiles(32000, 2)) >= 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,hidden", [(1, 5, 3), (33, 301, 17), (64, 1027, 40)])
def test_logits_into_matches_float64(rows, vocab, hidden, dtype, three_workers):
    g = torch.Generator().manual_seed(rows * vocab)
    pairs = []
    for width in (hidden, hidden + 5):
        h = torch.randn(rows, width, generator=g, dtype=dtype)
        w = torch.randn(vocab, width, generator=g, dtype=dtype)
        buf = torch.full((rows, vocab + 3), float("nan"), dtype=dtype)   # row stride > V: a view like the blocks
        pairs.append((h, w, buf))
    cpu_products.logits_into([(h, w, buf[:, :vocab]) for h, w, buf in pairs])
    for h, w, buf in pairs:
        _close(buf[:, :vocab], h.double() @ w.double().T, dtype)
        assert torch.isnan(buf[:, vocab:]).all()     # nothing written past the view


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_fold_matches_float64(need, dtype, three_workers):
    g = torch.Generator().manual_seed(7)
    C, V, H = 37, 1027, 19
    d_logits = torch.randn(C, V, generator=g, dtype=dtype)
    hidden = torch.randn(C, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    prior_w = torch.randn(V, H, generator=g, dtype=dtype)
    prior_b = torch.randn(V, generator=g, dtype=dtype)
    d_hidden = torch.full((C, H), float("nan"), dtype=dtype) if need[0] else None
    d_weight = prior_w.clone() if need[1] else None
    d_bias = prior_b.clone() if need[2] else None
    cpu_products.fold(d_logits, hidden, weight, d_hidden, d_weight, d_bias)
    dl = d_logits.double()
    if need[0]:
        _close(d_hidden, dl @ weight.double(), dtype)
    if need[1]:
        _close(d_weight, prior_w.double() + dl.T @ hidden.double(), dtype)
    if need[2]:
        _close(d_bias, prior_b.double() + dl.sum(0), dtype)


def test_products_are_bitwise_repeatable(three_workers):
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(50, 24, generator=g), torch.randn(1500, 24, generator=g)
    outs = []
    for _ in range(3):
        out = torch.empty(50, 1500)
        cpu_products.logits_into([(h, w, out)])
        d_hidden, d_weight = torch.empty(50, 24), torch.zeros(1500, 24)
        cpu_products.fold(out, h, w, d_hidden, d_weight, None)
        outs.append((out, d_hidden, d_weight))
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_thread_count_restored_also_after_an_error(three_workers):
    before = torch.get_num_threads()
    h, w = torch.randn(4, 3), torch.randn(300, 3)
    cpu_products.logits_into([(h, w, torch.empty(4, 300))])
    assert torch.get_num_threads() == before

    def boom(_):
        raise RuntimeError("tile failed")
    with pytest.raises(RuntimeError, match="tile failed"):
        cpu_products.run_tasks(boom, [0, 1, 2], 3)
    assert torch.get_num_threads() == before
    assert _count_in_new_thread() == before


def test_workers_are_single_threaded_and_no_other_count_changes(three_workers):
    before = torch.get_num_threads()
    seen = []
    pool = cpu_products._executor(4)          # a new pool (four workers): built, then the global count restored
    for f in [pool.submit(torch.get_num_threads) for _ in range(12)]:
        seen.append(f.result())
    assert seen == [1] * 12
    assert torch.get_num_threads() == before
    assert _count_in_new_thread() == before


def test_a_replaced_pool_still_serves_its_caller(three_workers):
    """A caller holding the pool while another thread count replaces it can still run its tasks."""
    old = cpu_products._executor(3)
    new = cpu_products._executor(2)
    assert new is not old and cpu_products._executor(2) is new
    assert old.submit(lambda: 41 + 1).result(timeout=30) == 42


def test_workers_never_record_a_graph(three_workers):
    h = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(400, 4, requires_grad=True)
    out = torch.empty(5, 400)
    with torch.no_grad():       # the caller's no_grad does not reach the pool's threads: each task sets its own
        cpu_products.logits_into([(h, w, out)])
    _close(out, h.detach().double() @ w.detach().double().T, torch.float32)


def test_concurrent_callers_restore_the_thread_count(three_workers):
    """Two Python threads running products at once: the count is torch's own again when both are done."""
    import threading

    before = torch.get_num_threads()
    h, w = torch.randn(64, 32), torch.randn(3000, 32)
    errors = []

    def caller():
        try:
            for _ in range(5):
                out = torch.empty(64, 3000)
                cpu_products.logits_into([(h, w, out)])
                _close(out, h.double() @ w.double().T, torch.float32)
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=caller) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.get_num_threads() == before
    assert _count_in_new_thread() == before


def test_overlapping_callers_leaving_in_any_order_restore_the_thread_count(three_workers):
    """Caller A enters, B enters, A leaves, B leaves: B must not restore the 1 that A had set."""
    import threading

    before = torch.get_num_threads()
    b_entered, a_done = threading.Event(), threading.Event()

    def task_a(_):
        assert b_entered.wait(30)

    def task_b(_):
        b_entered.set()
        assert a_done.wait(30)

    def caller_a():
        cpu_products.run_tasks(task_a, [0, 1], 3)
        a_done.set()
    ta = threading.Thread(target=caller_a)
    tb = threading.Thread(target=cpu_products.run_tasks, args=(task_b, [0, 1], 3))
    ta.start()
    tb.start()
    ta.join(60)
    tb.join(60)
    assert a_done.is_set()
    assert torch.get_num_threads() == before
    assert _count_in_new_thread() == before     # what a thread started afterwards gets (torch's global count)


def _count_in_new_thread() -> int:
    import threading

    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("no", False), ("1", True), ("ON", True)])
def test_env_switch(value, enabled, monkeypatch):
    monkeypatch.setenv(cpu_products.ENV_POOL, value)
    assert cpu_products.pool_enabled() is enabled
    if not enabled:
        assert cpu_products.workers() == 1


def test_many_threads_keep_one_product(monkeypatch):
    monkeypatch.setenv(cpu_products.ENV_POOL, "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(cpu_products.MAX_POOL_THREADS + 1)
        assert cpu_products.workers() == 1
        torch.set_num_threads(2)
        assert cpu_products.workers() == 2
        torch.set_num_threads(1)
        assert cpu_products.workers() == 1
    finally:
        torch.set_num_threads(before)


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(cpu_products.ENV_POOL, "sometimes")
    with pytest.raises(ValueError, match=cpu_products.ENV_POOL):
        cpu_products.workers()


def _child_products(queue):
    h, w = torch.ones(3, 2), torch.ones(2000, 2)
    out = torch.empty(3, 2000)
    cpu_products.logits_into([(h, w, out)])
    queue.put(float(out.sum()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_its_own_pool(three_workers, monkeypatch):
    # the Python pool (the C++ tiles run on OpenMP threads, which GNU OpenMP cannot use in a forked child, as for
    # any of torch's own multi-threaded ops: fork before using them, or use the "spawn" start method)
    monkeypatch.setenv(cpu_native.ENV_NATIVE, "0")
    cpu_products.logits_into([(torch.ones(3, 2), torch.ones(2000, 2), torch.empty(3, 2000))])   # pool exists
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_products, args=(queue,))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == 3 * 2000 * 2.0


def test_passes_agree_with_and_without_the_pool(monkeypatch):
    """fused_sod_loss (fp64: to rounding) and fused_token_logprobs with the pool (three workers, many tiles)
    and without it."""
    g = torch.Generator().manual_seed(11)
    N, V, Hs, Ht = 70, 1031, 24, 40
    sh = torch.randn(N, Hs, generator=g, dtype=torch.float64)
    sw = torch.randn(V, Hs, generator=g, dtype=torch.float64) * 0.3
    th = torch.randn(N, Ht, generator=g, dtype=torch.float64)
    tw = torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.3
    ids = torch.arange(N)[None] // 9
    y = torch.randint(0, V, (N,), generator=g)

    def run():
        a, b = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        loss = fused_sod_loss(a[None], b, th[None], tw, step_ids=ids, chunk_size=32)
        lp = fused_token_logprobs(a, b, y)
        (loss + lp.sum()).backward()
        return loss.detach(), lp.detach(), a.grad, b.grad

    monkeypatch.setenv(cpu_products.ENV_POOL, "0")
    plain = run()
    monkeypatch.setenv(cpu_products.ENV_POOL, "1")
    monkeypatch.setattr(cpu_products, "workers", lambda: 3)
    monkeypatch.setattr(cpu_products, "MIN_TILE_COLUMNS", 16)
    pooled = run()
    for a, b in zip(pooled, plain):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
