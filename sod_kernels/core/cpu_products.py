"""The CPU single passes' matrix products, split into vocabulary tiles and shared out on a small pool of threads.

The products are nine tenths of a CPU pass's time (per chunk of ``C`` rows: the logit blocks ``x = h W^T`` of
each model, then ``d(hidden) = d(logits) W`` and ``d(weight) += d(logits)^T h``).  One ``torch.mm`` per product
splits its work statically over torch's threads: when another process takes one core for a while, the whole
product waits for the thread on that core.  Here each product is cut into vocabulary tiles (columns of ``x``,
rows of ``W``) that the pool's workers take one after the other, each tile a single-threaded product: a slowed
worker takes fewer tiles, so a shared machine costs the pass less, and a calm one the same.

Where the C++ kernels of :mod:`sod_kernels.core.cpu_native` are available (float32 / float64), the tiles run on
torch's own OpenMP threads instead, dynamically scheduled, each tile one BLAS call (MKL runs single-threaded
inside the parallel region): no extra threads and no Python per tile; it measured faster than both the pool
and one ``torch.mm`` (per 512-row chunk of logit products at V = 32000: 130 ms against 137 ms and 143 ms calm,
168 ms against 201 ms and 233 ms with one core taken).  Otherwise a pool of Python threads runs them:

- :func:`logits_into` writes ``out[:, a:b] = h W[a:b]^T`` tile by tile (every model's tiles in one queue);
- :func:`fold` forms ``d(hidden) = sum_g d(logits)[:, g] W[g]`` over ``P`` fixed contiguous vocabulary groups
  (group ``0`` straight into the output rows, the others into ``[C, H]`` partials added in group order) and
  ``d(weight)[g] += d(logits)[:, g]^T h``, ``d(bias)[g] += colsum`` per group.

Results depend on the tiles, which depend only on ``V`` and the thread count: bitwise the same run to run.
Machines where torch runs more than :data:`MAX_POOL_THREADS` threads keep one multi-threaded product per matrix
product (measured on 2 threads only; with many workers the Python side of each task would start to count).
The pool's workers are single-threaded (their own torch thread count is 1); the caller's count, and that of
any other thread, stays torch's, and the epilogues between the products use it as usual.  With one thread, or
``SOD_KERNELS_CPU_POOL=0`` (``off``/``false``/``no``), every product is one plain ``torch.mm`` as before.
A process forked while the pool exists starts a fresh pool in the child.

Knows no loss: plain products of the blocks it is given.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import cpu_native
from .runtime import env_switch

ENV_POOL = "SOD_KERNELS_CPU_POOL"
TILES_PER_WORKER = 8        # logit tiles per worker (at least), so a slowed worker hands work to the others
TILE_COLUMNS = 4096         # ... and at most this many vocabulary columns per logit tile
MIN_TILE_COLUMNS = 512      # never narrower than this (the products keep their efficiency)
GROUPS_PER_WORKER = 4       # d(hidden) / d(weight) groups per worker
PARTIAL_BYTES = 32 << 20    # the d(hidden) partials of one fold, at most
MAX_POOL_THREADS = 8        # above this many torch threads the products stay single multi-threaded torch.mm calls:
                            # the pool is measured on small machines, and each task holds the GIL briefly

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def pool_enabled() -> bool:
    """Whether products are shared out on the pool: ``SOD_KERNELS_CPU_POOL`` unset or not ``0``/``off``/
    ``false``/``no``.  Any other value than those and ``1``/``on``/``true``/``yes`` is a ``ValueError``."""
    return env_switch(ENV_POOL)


def workers() -> int:
    """The pool's size for the next product: torch's thread count when the pool is enabled and that count is at
    most :data:`MAX_POOL_THREADS`; else 1 (each product one ``torch.mm`` with torch's threads)."""
    if not pool_enabled():
        return 1
    threads = torch.get_num_threads()
    return threads if 1 < threads <= MAX_POOL_THREADS else 1


def _single_threaded_worker() -> None:
    # torch's count is per thread once a thread has used it (initialised lazily from a process-wide value):
    # initialise it here, then make this worker's products single-threaded (OpenMP and MKL alike)
    torch.get_num_threads()
    torch.set_num_threads(1)


def _executor(n: int) -> ThreadPoolExecutor:
    """The pool of ``n`` single-threaded workers, built when first needed or when ``n`` changes (a replaced pool
    is not shut down: a concurrent caller may still be using it; its idle threads end when it is collected).
    Building it starts all ``n`` threads at once and then restores the process-wide thread count that setting
    the workers' own count also wrote (threads started later, and the caller, keep torch's count)."""
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers != n:
            threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sod_kernels_cpu",
                                      initializer=_single_threaded_worker)
            all_started = threading.Barrier(n, timeout=60)
            for f in [pool.submit(all_started.wait) for _ in range(n)]:   # none idle: each submit starts a thread
                f.result()
            torch.set_num_threads(threads)
            _pool, _pool_workers = pool, n
        return _pool


def _forget_pool_in_child() -> None:
    # the parent's worker threads do not exist in a forked child (and the lock may have been held by one of the
    # parent's threads at the fork): a new lock, and a new pool on first use there
    global _pool, _pool_workers, _lock
    _pool, _pool_workers, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _no_grad(fn: Callable) -> Callable:
    def task(arg):
        with torch.no_grad():   # grad mode is per thread: the workers' products never record a graph
            fn(arg)
    return task


def run_tasks(fn: Callable, args: Sequence, n: int) -> None:
    """``fn(a)`` for every ``a`` in ``args`` on the pool's ``n`` single-threaded workers (inline when ``n == 1``
    or one task); an exception in a task is re-raised here.  Nothing changes the caller's thread count."""
    if n <= 1 or len(args) <= 1:
        for a in args:
            fn(a)
        return
    for _ in _executor(n).map(_no_grad(fn), args):
        pass


def column_tiles(vocab: int, n_workers: int) -> list[tuple[int, int]]:
    """The logit products' vocabulary tiles ``[(a, b), ...]`` covering ``[0, vocab)``: at least
    :data:`TILES_PER_WORKER` per worker and at most :data:`TILE_COLUMNS` wide, never narrower than
    :data:`MIN_TILE_COLUMNS` (one tile with one worker)."""
    if n_workers <= 1 or vocab <= MIN_TILE_COLUMNS:
        return [(0, vocab)]
    count = max(TILES_PER_WORKER * n_workers, math.ceil(vocab / TILE_COLUMNS))
    count = max(min(count, vocab // MIN_TILE_COLUMNS), 1)
    return _even_splits(vocab, count)


def fold_groups(vocab: int, rows: int, hidden: int, elem: int, n_workers: int) -> list[tuple[int, int]]:
    """The fold's vocabulary groups: :data:`GROUPS_PER_WORKER` per worker, at least :data:`MIN_TILE_COLUMNS`
    wide, and few enough that the ``d(hidden)`` partials (``groups - 1`` of ``[rows, hidden]``) stay within
    :data:`PARTIAL_BYTES`."""
    if n_workers <= 1 or vocab <= MIN_TILE_COLUMNS:
        return [(0, vocab)]
    count = min(GROUPS_PER_WORKER * n_workers, vocab // MIN_TILE_COLUMNS)
    count = min(count, 1 + PARTIAL_BYTES // max(rows * hidden * elem, 1))
    return _even_splits(vocab, max(count, 1))


def _even_splits(total: int, count: int) -> list[tuple[int, int]]:
    edges = [total * i // count for i in range(count + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _native(n: int, dtype: torch.dtype, *tensors: torch.Tensor | None):
    """The C++ library when the tiles can run on torch's own OpenMP threads (see the module docstring), else None."""
    if n <= 1 or not cpu_native.native_enabled() or not cpu_native.products_supported(dtype, *tensors):
        return None
    return cpu_native.library()


def logits_into(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """``out = h W^T`` for each ``(h [C, H], W [V, H], out [C, V])`` of ``products`` (same dtype, CPU, ``out``
    with unit column stride), by vocabulary tiles on torch's threads (the C++ kernel) or on the pool."""
    n = workers()
    tiles = [column_tiles(w.shape[0], n) for _, w, _ in products]
    if all(len(t) == 1 for t in tiles):          # one tile per product: the plain product
        for h, w, out in products:
            torch.mm(h, w.T, out=out)
        return
    lib = _native(n, products[0][0].dtype, *(t for p in products for t in p))
    if lib is not None:
        for (h, w, out), t in zip(products, tiles):
            cpu_native.tiled_logits(lib, h, w, out, len(t))
        return

    def tile(task):
        h, w, out, a, b = task
        torch.mm(h, w[a:b].T, out=out[:, a:b])

    run_tasks(tile, [(h, w, out, a, b) for (h, w, out), t in zip(products, tiles) for a, b in t], n)


def fold(d_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, d_hidden: torch.Tensor | None,
         d_weight: torch.Tensor | None, d_bias: torch.Tensor | None) -> None:
    """Fold one chunk's ``d(logits) [C, V]``: ``d_hidden [C, H] = d(logits) W`` (written), ``d_weight [V, H] +=
    d(logits)^T hidden`` and ``d_bias [V] += column sums`` (added); each None is skipped.  ``hidden [C, H]``,
    ``weight [V, H]``, all in one dtype."""
    C, V = d_logits.shape
    n = workers()
    groups = fold_groups(V, C, weight.shape[1], weight.element_size(), n) if C else [(0, V)]
    contiguous = all(t is None or t.is_contiguous() for t in (d_hidden, d_weight, d_bias))
    lib = _native(n, d_logits.dtype, d_logits, hidden, weight) if len(groups) > 1 and contiguous else None
    if lib is not None:
        cpu_native.tiled_fold(lib, d_logits, hidden, weight, d_hidden, d_weight, d_bias, len(groups))
        return
    if len(groups) == 1:
        if d_hidden is not None:
            torch.mm(d_logits, weight, out=d_hidden)
        if d_weight is not None:
            d_weight.addmm_(d_logits.T, hidden)
        if d_bias is not None:
            d_bias += d_logits.sum(0)
        return
    partials = (torch.empty(len(groups) - 1, C, weight.shape[1], dtype=weight.dtype)
                if d_hidden is not None else None)

    def group(j):
        a, b = groups[j]
        g = d_logits[:, a:b]
        if d_hidden is not None:
            torch.mm(g, weight[a:b], out=d_hidden if j == 0 else partials[j - 1])
        if d_weight is not None:
            d_weight[a:b].addmm_(g.T, hidden)
        if d_bias is not None:
            d_bias[a:b] += g.sum(0)

    run_tasks(group, list(range(len(groups))), n)
    if partials is not None:
        for p in partials:      # fixed order: bitwise the same run to run
            d_hidden += p
