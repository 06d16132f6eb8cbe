"""Kernel launches and host synchronisations of a call, counted on any machine (no GPU needed).

On a GPU every tensor operation that computes something is at least one kernel launch (a few microseconds
of launch latency and a gap on the stream), and every Triton ``kernel[grid](...)`` is one; a host
synchronisation (``.item()``, ``bool(t)``, ``nonzero``) stalls the CPU until the GPU has caught up.  This
module counts both while a function runs on CPU tensors:

- tensor operations through a ``TorchDispatchMode``: every aten operation except those that only make views,
  allocate or read metadata (which launch nothing on a GPU);
- Triton launches by wrapping the ``run`` of Triton's kernel classes (compiled, interpreted and autotuned);
  with ``stub=True`` the kernels are not executed at all (their outputs keep whatever the buffers held), so
  the count is fast even where Triton would run through its interpreter;
- synchronisations: ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``int()``, ``float()`` of a tensor),
  ``nonzero``, ``masked_select``, ``unique`` and ``repeat_interleave`` without an output size, and
  ``Tensor.tolist``.

Usage::

    with LaunchCounter(stub=True) as count:
        loss = fused_sod_loss(...)
    print(count.launches, count.syncs, count.by_op.most_common(10))

``python -m benchmarks.launches`` prints the counts per chunk of the single-pass losses at a small size.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations that launch no kernel on a GPU: views, allocations, metadata.
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "as_strided", "slice", "select", "t", "transpose", "permute", "expand",
    "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow", "diagonal", "unfold",
    "lift_fresh", "_reshape_alias", "resize_", "set_", "sym_size", "sym_stride", "sym_numel", "is_same_size",
    "_has_compatible_shallow_copy_type", "view_as", "numpy_T", "movedim", "_to_copy_view", "record_stream",
}
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
          "unique_dim", "nonzero_static_fallback"}


def _op_name(func) -> str:
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class LaunchCounter(TorchDispatchMode):
    """Counts launching tensor operations (``by_op``), Triton launches (``by_kernel``) and host syncs."""

    def __init__(self, *, stub: bool = True):
        super().__init__()
        self.stub = stub
        self.by_op: Counter = Counter()
        self.by_kernel: Counter = Counter()
        self.sync_ops: Counter = Counter()
        self._patched: list = []

    # ------------------------------------------------------------------------------ tensor operations
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        if name in _SYNCS or (name == "repeat_interleave" and "output_size" not in (kwargs or {})):
            self.sync_ops[name] += 1
        if name not in _NO_KERNEL and name != "_local_scalar_dense":
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    # --------------------------------------------------------------------------------- Triton kernels
    def _patch_triton(self) -> None:
        try:
            from triton.runtime import autotuner, interpreter, jit
        except ImportError:  # no Triton: nothing to count
            return
        counter = self

        def wrap(cls, attr="run"):
            original = getattr(cls, attr)

            def run(self_, *args, **kwargs):
                if kwargs.get("warmup"):
                    return original(self_, *args, **kwargs)
                fn = getattr(self_, "fn", self_)
                name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "kernel")
                counter.by_kernel[name] += 1
                if counter.stub:
                    return None
                with _Paused(counter):
                    return original(self_, *args, **kwargs)

            setattr(cls, attr, run)
            self._patched.append((cls, attr, original))

        wrap(jit.JITFunction)
        wrap(interpreter.InterpretedFunction)
        wrap(autotuner.Autotuner)
        if hasattr(autotuner, "Heuristics"):
            wrap(autotuner.Heuristics)

    def __enter__(self):
        self._patch_triton()
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter.sync_ops["tolist"] += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        for cls, attr, original in reversed(self._patched):
            setattr(cls, attr, original)
        self._patched.clear()
        return out

    @property
    def launches(self) -> int:
        """Tensor operations that launch a kernel plus Triton launches."""
        return sum(self.by_op.values()) + sum(self.by_kernel.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_ops.values())


class _Paused:
    """Leaves the counting mode while a real (interpreted) kernel runs, so its internals are not counted."""

    def __init__(self, mode: LaunchCounter):
        self.mode = mode

    def __enter__(self):
        self._ctx = torch.utils._python_dispatch._disable_current_modes()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------------------------------ report
def _inputs(n: int, steps: int, vocab: int, hs: int, ht: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g, requires_grad=True)
    sw = (torch.randn(vocab, hs, generator=g) / hs ** 0.5).requires_grad_()
    th, tw = torch.randn(n, ht, generator=g), torch.randn(vocab, ht, generator=g) / ht ** 0.5
    step_ids = torch.arange(n) // (n // steps)
    y = torch.randint(0, vocab, (n,), generator=g)
    return sh, sw, th, tw, step_ids, y


def single_pass_counts(case: str, *, n: int = 1024, steps: int = 8, vocab: int = 4096, hidden: int = 32,
                       chunk_size: int = 256) -> dict:
    """Launches and syncs of one forward (the single pass) of a loss on the Triton backend, kernels stubbed:
    ``{"case", "chunks", "launches", "per_chunk", "setup", "syncs", "by_op", "by_kernel"}`` for ``n`` tokens;
    ``per_chunk`` is the marginal cost of a chunk (the same call on ``2 n`` tokens, twice the chunks, minus this
    one, per added chunk) and ``setup`` what the call costs besides its chunks.  ``case``: ``"kl"``,
    ``"token_weights"``, ``"policy"``, ``"sparse"``."""
    small = _count(case, n=n, steps=steps, vocab=vocab, hidden=hidden, chunk_size=chunk_size)
    large = _count(case, n=2 * n, steps=2 * steps, vocab=vocab, hidden=hidden, chunk_size=chunk_size)
    per_chunk = (large["launches"] - small["launches"]) / max(large["chunks"] - small["chunks"], 1)
    return {**small, "per_chunk": round(per_chunk, 1),
            "setup": round(small["launches"] - per_chunk * small["chunks"], 1)}


def _count(case: str, *, n: int, steps: int, vocab: int, hidden: int, chunk_size: int) -> dict:
    from sod_kernels import fused_sod_loss, fused_sod_policy_loss, fused_sparse_sod_loss

    sh, sw, th, tw, step_ids, y = _inputs(n, steps, vocab, hidden, hidden + 16)
    common = dict(backend="triton", chunk_size=chunk_size, check_inputs=False)
    chunks = -(-n // chunk_size)
    if case == "kl":
        call = lambda: fused_sod_loss(sh, sw, th, tw, step_ids=step_ids, **common)  # noqa: E731
    elif case == "token_weights":
        w = torch.rand(n)
        call = lambda: fused_sod_loss(sh, sw, th, tw, step_ids=step_ids, token_weights=w, **common)  # noqa: E731
    elif case == "policy":
        old, adv = torch.full((n,), -8.0), torch.randn(n)
        mask = torch.ones(n)
        call = lambda: fused_sod_policy_loss(sh, sw, y, old, adv, mask, **common)  # noqa: E731
    elif case == "sparse":
        k = 16
        ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(n)])
        lp = torch.log_softmax(torch.randn(n, k + 1), -1)[:, :k]
        call = lambda: fused_sparse_sod_loss(sh, sw, ids, lp, step_ids=step_ids, **common)  # noqa: E731
    else:
        raise ValueError(f"unknown case {case!r}")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # lets backend="triton" take CPU tensors; the kernels are stubbed anyway
    try:
        with LaunchCounter(stub=True) as count:
            call()
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return {"case": case, "chunks": chunks, "launches": count.launches, "syncs": count.syncs,
            "by_op": dict(count.by_op.most_common()), "by_kernel": dict(count.by_kernel),
            "sync_ops": dict(count.sync_ops)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="kl,token_weights,policy,sparse")
    parser.add_argument("--verbose", action="store_true", help="list the operations of each case")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for case in args.cases.split(","):
        r = single_pass_counts(case)
        print(f"{case:14s} chunks {r['chunks']:3d}  launches {r['launches']:5d}  per chunk {r['per_chunk']:6.1f}  "
              f"setup {r['setup']:6.1f}  syncs {r['syncs']} {r['sync_ops'] if r['syncs'] else ''}")
        if args.verbose:
            print("   ", r["by_kernel"], r["by_op"])


if __name__ == "__main__":
    main()
