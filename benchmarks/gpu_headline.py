"""The GPU comparison in one process, most important first: ``python -m benchmarks.gpu_headline --out DIR``.

Order (every result is written to ``DIR/gpu-headline.json`` and ``.md`` as soon as it exists, so a run cut
short still reports what it measured):

1. the bf16 matrix-product rate and the cuBLAS floor of one pass (the four products of the headline size);
2. the headline distillation loss (N = 16384, V = 151936, Hs = 1024, Ht = 2560, bf16), every method:
   ``fused_sod_loss`` fast path with "kl" step weights, with ``token_weights``, with "none", the low-memory
   mode, the forward alone (no gradient), Liger's ``LigerFusedLinearJSDLoss`` compiled and eager (unweighted
   reverse KL: it has no step weights), naive PyTorch eager and compiled; worst-case inputs, then LM-like;
3. the policy-gradient form (N = 16384, H = 1024, V = 151936): ``fused_sod_policy_loss``,
   ``fused_token_logprobs`` (forward + backward, forward alone, with entropy), naive PyTorch eager and
   compiled, Liger's fused linear cross-entropy (the same FLOPs); the step helpers against the authors'
   per-token loop on CUDA tensors;
4. tuning at the headline size: how many chunks one d(weight) product folds (1, 2, 4) and the chunk size,
   how the fold runs (``SOD_KERNELS_FOLD_IMPL``: cuBLAS ``addmm``, the Triton fold kernel, a transposed
   accumulator; each in the whole pass and one fold alone), the experimental dual-GEMM pass
   (``impl="dual_gemm"``, fp16 and bf16 storage), the JSD, the hard-label term, the low-memory mode's rows and
   block budget, logit soft-capping, and the sparse teacher at k = 64 (``fused_topk_logprobs``,
   ``fused_sparse_sod_loss``);
5. determinism (two identical calls, bitwise) and accuracy at the full vocabulary against a float64
   reference on a row subset;
6. sweeps over N and V (ours and Liger compiled) until the deadline.

``--only floors,headline,policy,tuning,determinism,sweeps`` runs a subset (in that order).

Time: ``triton.testing.do_bench`` median (gradients dropped between runs).  Memory: peak
``torch.cuda.max_memory_allocated`` during one iteration minus what was allocated before it (inputs held;
gradients dropped first), so a method's gradient outputs count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HEADLINE = dict(N=16384, V=151936, Hs=1024, Ht=2560)
# --smoke: the same code paths on tiny sizes (CPU with TRITON_INTERPRET=1, or a GPU), to check the script.
SMOKE = dict(N=96, V=300, Hs=32, Ht=48)
GIB = 1 << 30
REP_MS = 300
DEVICE = "cuda"
SMOKE_RUN = False


class Recorder:
    """Accumulates result rows and rewrites the JSON and Markdown after each one."""

    def __init__(self, out: Path, deadline: float):
        self.out, self.deadline, self.start = out, deadline, time.time()
        self.data = {"environment": environment(), "rows": [], "notes": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - (time.time() - self.start)

    def add(self, section: str, **row) -> dict:
        row = {"section": section, **row}
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()
        return row

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print("note:", text, flush=True)
        self.save()

    def save(self) -> None:
        (self.out / "gpu-headline.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "gpu-headline.md").write_text(markdown(self.data))


def environment() -> dict:
    import triton
    env = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "commit": os.environ.get("SOD_GIT_COMMIT", "unknown"),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        env["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001 - optional peer
        env["liger_kernel"] = None
    return env


def timed_ms(fn, rep: int = REP_MS) -> float:
    """Median milliseconds of ``fn``: do_bench on a GPU, a few perf_counter runs on a CPU (smoke runs)."""
    if DEVICE != "cuda":
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def bench(step, grads) -> dict:
    """Median milliseconds and extra peak memory of one call of ``step``."""
    def drop():
        for g in grads:
            g.grad = None

    drop()
    step()  # warm-up: compiles
    if DEVICE != "cuda":
        drop()
        return {"ms": round(timed_ms(lambda: (drop(), step())), 3)}
    torch.cuda.synchronize()
    drop()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    drop()
    from triton.testing import do_bench
    ms = do_bench(step, warmup=25, rep=REP_MS, grad_to_none=grads, return_mode="median")
    drop()
    return {"ms": round(ms, 3), "extra_gib": round(extra / GIB, 3)}


def guarded(rec: Recorder, section: str, name: str, fn, **meta) -> dict | None:
    """Run one measurement; an exception (OOM included) becomes a row with its error."""
    if rec.left() < 5:
        rec.add(section, method=name, skipped="deadline", **meta)
        return None
    try:
        row = rec.add(section, method=name, **meta, **fn())
    except Exception as exc:  # noqa: BLE001 - a failed case is a result
        row = rec.add(section, method=name, error=f"{type(exc).__name__}: {str(exc)[:300]}", **meta)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def sizes() -> dict:
    return SMOKE if SMOKE_RUN else HEADLINE


# ------------------------------------------------------------------------------------------- sections
def floors(rec: Recorder) -> None:
    def rate():
        n = 256 if SMOKE_RUN else 8192
        a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        ms = timed_ms(lambda: a @ b.T, rep=200)
        return {"ms": round(ms, 3), "tflops": round(2 * n ** 3 / ms / 1e9, 1)}

    guarded(rec, "floor", "bf16 matmul 8192^3", rate)
    N, V, Hs, Ht = (sizes()[k] for k in ("N", "V", "Hs", "Ht"))

    def products():
        g = torch.Generator(device=DEVICE).manual_seed(0)
        r = lambda *s: torch.randn(*s, device=DEVICE, generator=g).to(torch.bfloat16)  # noqa: E731
        hs, ht, ws, wt, dl = r(N, Hs), r(N, Ht), r(V, Hs), r(V, Ht), r(N, V)
        t = {name: timed_ms(fn, rep=200) for name, fn in (
            ("student_logits", lambda: hs @ ws.T), ("teacher_logits", lambda: ht @ wt.T),
            ("d_hidden", lambda: dl @ ws), ("d_weight", lambda: dl.T @ hs))}
        return {"ms": round(sum(t.values()), 3), **{k: round(v, 3) for k, v in t.items()}}

    guarded(rec, "floor", "cuBLAS floor (4 products)", products, **sizes())


def distill_methods(x, family: str):
    """``{name: (step, grads)}`` of every distillation method on inputs ``x`` (benchmarks.inputs)."""
    from sod_kernels import fused_sod_loss
    from .methods import liger_installed, make_step

    sh, sw, th, tw = x.student_hidden.unsqueeze(0), x.student_weight, x.teacher_hidden.unsqueeze(0), x.teacher_weight
    ids = x.step_ids
    weights = torch.rand(ids.shape, device=ids.device, generator=torch.Generator(device=DEVICE).manual_seed(1))
    grads = [x.student_hidden, x.student_weight]

    def ours(**kw):
        def step():
            fused_sod_loss(sh, sw, th, tw, step_ids=ids, backend="triton", check_inputs=False, **kw).backward()
        return step

    def forward_only():
        with torch.no_grad():
            fused_sod_loss(sh, sw, th, tw, step_ids=ids, backend="triton", check_inputs=False)

    methods = {
        "ours fast, kl weights (fwd+bwd)": (ours(), grads),
        "ours fast, token_weights (fwd+bwd)": (ours(token_weights=weights), grads),
        "ours fast, none (fwd+bwd)": (ours(step_divergence="none"), grads),
        "ours low-memory, kl (fwd+bwd)": (ours(memory="low"), grads),
        "ours forward only (no grad)": (forward_only, []),
    }
    for peer in ("liger_compiled", "liger", "naive_compiled", "naive"):
        if peer.startswith("liger") and not liger_installed():
            continue
        methods[f"{peer} (fwd+bwd)"] = (make_step(peer, x, "fwd_bwd"), grads)
    return methods


def headline(rec: Recorder, family: str, names=None) -> None:
    from .inputs import make_inputs

    N, V, Hs, Ht = (sizes()[k] for k in ("N", "V", "Hs", "Ht"))
    x = make_inputs(family, N, V, Hs, Ht, dtype=torch.bfloat16, device=DEVICE, seed=0)
    for name, (step, grads) in distill_methods(x, family).items():
        if names is None or any(name.startswith(n) for n in names):
            guarded(rec, f"headline {family}", name, lambda: bench(step, grads), **sizes())
    del x


def tuning(rec: Recorder) -> None:
    """What the next kernel changes hinge on, on worst-case inputs: how many chunks one d(weight) product
    folds (``SOD_KERNELS_FOLD_ROWS``), the chunk size (the 512-row plan against 256- and 1024-row chunks), how
    the fold runs (``SOD_KERNELS_FOLD_IMPL``: addmm, the Triton fold kernel, a transposed accumulator; the
    headline fwd+bwd and one 1024-row fold alone), the generalized JSD and the hard-label term, logit
    soft-capping, and the sparse teacher (k = 64)."""
    from sod_kernels import fused_sod_loss, fused_sparse_sod_loss, fused_topk_logprobs
    from .inputs import make_inputs

    N, V, Hs, Ht = (sizes()[k] for k in ("N", "V", "Hs", "Ht"))
    x = make_inputs("worst_case", N, V, Hs, Ht, dtype=torch.bfloat16, device=DEVICE, seed=0)
    sh, sw, th, tw = x.student_hidden.unsqueeze(0), x.student_weight, x.teacher_hidden.unsqueeze(0), x.teacher_weight
    grads = [x.student_hidden, x.student_weight]

    def ours(**kw):
        return lambda: fused_sod_loss(sh, sw, th, tw, step_ids=x.step_ids, backend="triton", check_inputs=False,
                                      **kw).backward()

    for fold in (512, 1024, 2048):
        os.environ["SOD_KERNELS_FOLD_ROWS"] = str(fold)
        try:
            for chunk in (None, 256):
                label = "512-row plan" if chunk is None else f"chunk_size={chunk}"
                guarded(rec, "tuning", f"ours fast, kl: d(weight) folds >= {fold} rows, {label}",
                        lambda: bench(ours(chunk_size=chunk), grads), **sizes())
        finally:
            os.environ.pop("SOD_KERNELS_FOLD_ROWS", None)
    from sod_kernels.core.chunks import DEFAULT_FOLD_ROWS, FOLD_IMPLS, _accumulate_product

    def fold_alone(impl: str) -> dict:
        """One d(weight) fold of DEFAULT_FOLD_ROWS bf16 rows into the float32 accumulator, as ``impl`` runs it
        (the headline pass makes N / DEFAULT_FOLD_ROWS of them), and its distance to addmm's."""
        gen = torch.Generator(device=DEVICE).manual_seed(2)
        dl = torch.randn(fold_k, V, device=DEVICE, generator=gen).to(torch.bfloat16)
        h = torch.randn(fold_k, Hs, device=DEVICE, generator=gen).to(torch.bfloat16)
        ref = torch.zeros(V, Hs, device=DEVICE)
        _accumulate_product(ref, dl.T, h)
        if impl == "transposed":
            acc = torch.zeros(Hs, V, device=DEVICE)
            fold = lambda: _accumulate_product(acc, h.T, dl)  # noqa: E731
        elif impl == "triton":
            from sod_kernels.core.fold_kernels import fold_into
            acc = torch.zeros(V, Hs, device=DEVICE)
            fold = lambda: fold_into(acc, dl, h)  # noqa: E731
        else:
            acc = torch.zeros(V, Hs, device=DEVICE)
            fold = lambda: _accumulate_product(acc, dl.T, h)  # noqa: E731
        fold()
        got = acc.T if impl == "transposed" else acc
        rel = float((got - ref).norm() / ref.norm())
        ms = timed_ms(fold, rep=200)
        return {"ms": round(ms, 3), "per_headline_ms": round(ms * N / fold_k, 2),
                "rel_diff_to_addmm": f"{rel:.1e}"}

    fold_k = min(DEFAULT_FOLD_ROWS, N)
    previous_impl = os.environ.get("SOD_KERNELS_FOLD_IMPL")
    try:
        for impl in FOLD_IMPLS:
            os.environ["SOD_KERNELS_FOLD_IMPL"] = impl
            guarded(rec, "tuning", f"ours fast, kl: SOD_KERNELS_FOLD_IMPL={impl}", lambda: bench(ours(), grads),
                    **sizes())
            guarded(rec, "tuning", f"d(weight) fold alone, {fold_k} rows: {impl}",
                    lambda: fold_alone(impl), **sizes())
    finally:
        if previous_impl is None:
            os.environ.pop("SOD_KERNELS_FOLD_IMPL", None)
        else:
            os.environ["SOD_KERNELS_FOLD_IMPL"] = previous_impl
    dual_gemm_rows(rec, sh, sw, th, tw, x.step_ids, grads)
    for beta in (0.5,):
        guarded(rec, "tuning", f"ours fast, jsd beta={beta}",
                lambda: bench(ours(divergence="jsd", beta=beta), grads), **sizes())
    guarded(rec, "tuning", "ours fast, kl + hard_loss_weight=0.5",
            lambda: bench(ours(target_ids=x.target_ids.unsqueeze(0), hard_loss_weight=0.5), grads), **sizes())
    from sod_kernels.dense import triton_backend as td
    default_low = (td.LOW_MEMORY_ROWS, td.LOW_MEMORY_CHUNK_BYTES)
    try:
        for rows, budget_mib in ((default_low[0], default_low[1] >> 20), (2 * default_low[0], 2 * (default_low[1] >> 20))):
            td.LOW_MEMORY_ROWS, td.LOW_MEMORY_CHUNK_BYTES = rows, budget_mib << 20
            guarded(rec, "tuning", f"ours low-memory, kl: {rows} rows, {budget_mib} MiB blocks",
                    lambda: bench(ours(memory="low"), grads), **sizes())
    finally:
        td.LOW_MEMORY_ROWS, td.LOW_MEMORY_CHUNK_BYTES = default_low
    guarded(rec, "tuning", "ours fast, kl, student_softcap=30 teacher_softcap=30",
            lambda: bench(ours(student_softcap=30.0, teacher_softcap=30.0), grads), **sizes())
    with torch.no_grad():
        ids, logprobs = fused_topk_logprobs(x.teacher_hidden, x.teacher_weight, 64)
    guarded(rec, "tuning", "fused_topk_logprobs k=64 (teacher, no grad)",
            lambda: {"ms": round(timed_ms(lambda: fused_topk_logprobs(x.teacher_hidden, x.teacher_weight, 64)), 3)},
            **sizes())
    guarded(rec, "tuning", "fused_sparse_sod_loss k=64, kl weights (fwd+bwd)",
            lambda: bench(lambda: fused_sparse_sod_loss(sh, sw, ids[None], logprobs[None], step_ids=x.step_ids,
                                                        check_inputs=False).backward(), grads), **sizes())
    del x, ids, logprobs


def dual_gemm_rows(rec: Recorder, sh, sw, th, tw, step_ids, grads) -> None:
    """The experimental dual-GEMM single pass (``impl="dual_gemm"``: both logit tiles and the exact statistics in
    one Triton kernel per chunk, 16-bit stored arrays for the gradient), headline fwd+bwd with "kl" step weights,
    fp16 and bf16 storage; compare with "ours fast, kl weights (fwd+bwd)" of the same run."""
    from sod_kernels import fused_sod_loss

    def step():
        fused_sod_loss(sh, sw, th, tw, step_ids=step_ids, backend="triton", check_inputs=False,
                       impl="dual_gemm").backward()

    for store in ("fp16", "bf16"):
        os.environ["SOD_KERNELS_DUAL_GEMM_STORE"] = store
        try:
            guarded(rec, "tuning", f"ours fast, kl, impl=dual_gemm ({store} stored differences)",
                    lambda: bench(step, grads), **sizes())
        finally:
            os.environ.pop("SOD_KERNELS_DUAL_GEMM_STORE", None)


def launches(rec: Recorder) -> None:
    """Kernel launches per chunk and host syncs of each single pass (counted with the kernels stubbed, on CPU
    tensors: the count does not depend on the device; seconds)."""
    from .launches import single_pass_counts

    for case in ("kl", "token_weights", "policy", "sparse"):
        guarded(rec, "launches", case, lambda case=case: {k: v for k, v in single_pass_counts(case).items()
                                                          if k in ("chunks", "launches", "per_chunk", "setup", "syncs")})


def determinism_and_accuracy(rec: Recorder) -> None:
    from sod_kernels import fused_sod_loss, fused_sod_policy_loss
    from .inputs import make_inputs

    N, V, Hs, Ht = (64 if SMOKE_RUN else 4096), sizes()["V"], sizes()["Hs"], sizes()["Ht"]
    x = make_inputs("lm_like", N, V, Hs, Ht, dtype=torch.bfloat16, device=DEVICE, seed=3)
    sh, sw, th, tw = x.student_hidden.unsqueeze(0), x.student_weight, x.teacher_hidden.unsqueeze(0), x.teacher_weight

    def run(**kw):
        x.zero_grads()
        loss = fused_sod_loss(sh, sw, th, tw, step_ids=x.step_ids, backend="triton", **kw)
        loss.backward()
        return loss.detach().clone(), x.student_hidden.grad.clone(), x.student_weight.grad.clone()

    for kw in ({}, {"memory": "low"}, {"reduction": "sum", "divergence": "forward_kl"}):
        def check(kw=kw):
            a, b = run(**kw), run(**kw)
            return {"bitwise_equal": all(torch.equal(p, q) for p, q in zip(a, b))}
        guarded(rec, "determinism", f"fused_sod_loss {kw or 'default'}", check, N=N, V=V)

    def policy_check():
        y = x.target_ids.unsqueeze(0)
        old = torch.zeros_like(y, dtype=torch.float32) - 5.0
        adv = torch.randn(y.shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
        mask = torch.ones_like(y)
        out = []
        for _ in range(2):
            x.zero_grads()
            loss = fused_sod_policy_loss(sh, sw, y, old, adv, mask, backend="triton")
            loss.backward()
            out.append((loss.detach().clone(), x.student_hidden.grad.clone(), x.student_weight.grad.clone()))
        return {"bitwise_equal": all(torch.equal(p, q) for p, q in zip(*out))}

    guarded(rec, "determinism", "fused_sod_policy_loss", policy_check, N=N, V=V)

    def accuracy(divergence):
        rows = 32 if SMOKE_RUN else 512
        h, t = x.student_hidden[:rows].detach(), x.teacher_hidden[:rows].detach()
        ids = x.step_ids[:, :rows]
        hs = h.clone().requires_grad_()
        ws = sw.detach().clone().requires_grad_()
        loss = fused_sod_loss(hs.unsqueeze(0), ws, t.unsqueeze(0), tw, step_ids=ids, divergence=divergence,
                              backend="triton")
        loss.backward()
        from reference import ref_fused_sod_loss
        hd, wd = h.double().requires_grad_(), sw.detach().double().requires_grad_()
        ref, _ = ref_fused_sod_loss(hd.unsqueeze(0), wd, t.double().unsqueeze(0), tw.detach().double(),
                                    step_ids=ids, divergence=divergence)
        ref.backward()
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
        return {"loss_rel_err": abs(float(loss) - float(ref)) / abs(float(ref)),
                "d_hidden_rel_err": rel(hs.grad, hd.grad), "d_weight_rel_err": rel(ws.grad, wd.grad)}

    for divergence in ("reverse_kl", "forward_kl"):
        guarded(rec, "accuracy vs float64", f"fused_sod_loss {divergence}, bf16, 512 rows", lambda: accuracy(divergence),
                V=V)
    del x


def policy(rec: Recorder) -> None:
    from sod_kernels import fused_sod_policy_loss, fused_token_logprobs
    from sod_kernels.logprobs.policy_loss import ppo_dual_clip

    N, V, H = sizes()["N"], sizes()["V"], sizes()["Hs"]
    g = torch.Generator(device=DEVICE).manual_seed(5)
    h = (torch.randn(N, H, device=DEVICE, generator=g)).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device=DEVICE, generator=g) * 3 / H ** 0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device=DEVICE, generator=g)
    with torch.no_grad():
        old = fused_token_logprobs(h, w, y) + 0.05 * torch.randn(N, device=DEVICE, generator=g)
    adv = torch.randn(N, device=DEVICE, generator=g)
    mask = torch.ones(N, device=DEVICE, dtype=torch.int64)
    grads = [h, w]

    def naive_policy(h, w):
        logp = torch.log_softmax((h @ w.T).float(), -1).gather(1, y[:, None]).squeeze(1)
        return ppo_dual_clip(logp, old, adv, 0.2, 0.28, 3.0)[0].mean()

    compiled = naive_policy if SMOKE_RUN else torch.compile(naive_policy)
    cases = {
        "fused_sod_policy_loss (fwd+bwd)": lambda: fused_sod_policy_loss(h, w, y, old, adv, mask,
                                                                         check_inputs=False).backward(),
        "fused_token_logprobs (fwd+bwd)": lambda: fused_token_logprobs(h, w, y, check_inputs=False).sum().backward(),
        "fused_token_logprobs + entropy (fwd+bwd)": lambda: sum(
            t.sum() for t in fused_token_logprobs(h, w, y, return_entropy=True, check_inputs=False)).backward(),
        "naive policy loss (fwd+bwd)": lambda: naive_policy(h, w).backward(),
        "naive policy loss compiled (fwd+bwd)": lambda: compiled(h, w).backward(),
    }
    for name, fn in cases.items():
        guarded(rec, "policy headline", name, lambda fn=fn: bench(fn, grads), N=N, H=H, V=V)

    def fwd_only():
        with torch.no_grad():
            fused_token_logprobs(h, w, y, check_inputs=False)

    guarded(rec, "policy headline", "fused_token_logprobs (forward only)", lambda: bench(fwd_only, []), N=N, H=H, V=V)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        flce = LigerFusedLinearCrossEntropyLoss()
        guarded(rec, "policy headline", "Liger fused linear cross-entropy (fwd+bwd)",
                lambda: bench(lambda: flce(w, h, y).backward(), grads), N=N, H=H, V=V)
    except ImportError as exc:
        rec.note(f"Liger fused linear cross-entropy not measured: {exc}")
    del h, w
    step_helpers(rec)


def per_token_loop(old: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, epsilon=1e-6, delta=0.2):
    """The authors' trainer's way: a Python loop over tokens of CUDA tensors, each ``.item()`` a sync."""
    B, T = mask.shape
    weights = torch.zeros(B, T, device=mask.device)
    for b in range(B):
        means, spans, start, total = [], [], -1, 0.0
        for t in range(T + 1):
            inside = t < T and mask[b, t].item() != 0
            if inside:
                if start < 0:
                    start, total = t, 0.0
                total += abs(old[b, t].item() - teacher[b, t].item())
            elif start >= 0:
                means.append(total / (t - start))
                spans.append((start, t))
                start = -1
        product = 1.0
        for k, (begin, end) in enumerate(spans):
            if k:
                product *= (means[k - 1] + epsilon) / (means[k] + epsilon)
            weights[b, begin:end] = 1.0 if k == 0 else min(product, 1.0 + delta)
    return weights


def step_helpers(rec: Recorder) -> None:
    from sod_kernels import sod_step_weights

    B, T = (2, 64) if SMOKE_RUN else (4, 1024)
    g = torch.Generator(device=DEVICE).manual_seed(9)
    old = -torch.rand(B, T, device=DEVICE, generator=g) * 3
    teacher = old + 0.3 * torch.randn(B, T, device=DEVICE, generator=g)
    mask = (torch.rand(B, T, device=DEVICE, generator=g) > 0.3).long()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def vectorised():
        fast = sod_step_weights(old, teacher, mask, check_inputs=False)
        slow = per_token_loop(old, teacher, mask)
        return {"ms": round(timed_ms(lambda: sod_step_weights(old, teacher, mask, check_inputs=False), rep=100), 3),
                "max_abs_diff_vs_loop": float((fast.float() - slow.float()).abs().max())}

    def loop():
        sync()
        t0 = time.perf_counter()
        per_token_loop(old, teacher, mask)
        sync()
        return {"ms": round((time.perf_counter() - t0) * 1e3, 1)}

    guarded(rec, "step helpers (CUDA tensors)", "sod_step_weights", vectorised, B=B, T=T)
    guarded(rec, "step helpers (CUDA tensors)", "per-token loop with .item() (the authors' trainer)", loop, B=B, T=T)


def sweeps(rec: Recorder) -> None:
    from .inputs import make_inputs

    Hs, Ht = sizes()["Hs"], sizes()["Ht"]
    grid = ((64, 300), (128, 200)) if SMOKE_RUN else ((4096, 151936), (32768, 151936), (16384, 32000), (16384, 128256))
    for N, V in grid:
        if rec.left() < 30:
            rec.note(f"sweep N={N} V={V} skipped: deadline")
            continue
        x = make_inputs("worst_case", N, V, Hs, Ht, dtype=torch.bfloat16, device=DEVICE, seed=N + V)
        methods = distill_methods(x, "worst_case")
        for name in ("ours fast, kl weights (fwd+bwd)", "liger_compiled (fwd+bwd)"):
            step, grads = methods[name]
            guarded(rec, "sweep", name, lambda: bench(step, grads), N=N, V=V, Hs=Hs, Ht=Ht)
        del x, methods


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [f"# GPU comparison: {env['device']}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, liger-kernel {env['liger_kernel']}, "
             f"commit {env['commit']}. bf16 inputs. Time: do_bench median; memory: peak allocated during one "
             "iteration minus what was allocated before it (inputs held, gradient outputs counted).", ""]
    section = None
    for row in data["rows"]:
        if row["section"] != section:
            section = row["section"]
            lines += ["", f"## {section}", "", "| method | result |", "|---|---|"]
        rest = {k: v for k, v in row.items() if k not in ("section", "method")}
        lines.append(f"| {row['method']} | {', '.join(f'{k}={v}' for k, v in rest.items())} |")
    if data["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu-headline"))
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for everything")
    parser.add_argument("--skip-sweeps", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (floors, headline, policy, "
                        "launches, tuning, determinism, sweeps); default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script (CPU: needs "
                        "TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    global DEVICE, SMOKE_RUN
    SMOKE_RUN = args.smoke
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    if DEVICE == "cpu" and not args.smoke:
        raise SystemExit("benchmarks.gpu_headline needs a CUDA device (or --smoke with TRITON_INTERPRET=1)")
    rec = Recorder(Path(args.out), args.deadline)
    # The order is the order of importance: a run cut short by its deadline keeps the headline comparison, the
    # launch counts and the switches (fold depth, chunk plan, JSD, hard term) first.
    sections = [("headline worst_case", lambda r: headline(r, "worst_case")), ("launches", launches),
                ("tuning", tuning), ("policy", policy), ("floors", floors),
                ("headline lm_like", lambda r: headline(r, "lm_like", names=("ours fast, kl", "ours fast, token",
                                                                              "liger_compiled"))),
                ("determinism and accuracy", determinism_and_accuracy)]
    if not args.skip_sweeps:
        sections.append(("sweeps", sweeps))
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        known = {name.split()[0] for name, _ in sections}
        if not set(wanted) <= known:
            parser.error(f"--only: unknown section(s) {sorted(set(wanted) - known)}; known: {sorted(known)}")
        sections = [(name, fn) for name, fn in sections if name.split()[0] in wanted]
    for name, section in sections:
        try:
            section(rec)
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            rec.note(f"section {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
    rec.note(f"total {time.time() - rec.start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
