"""The experimental dual-GEMM single pass (``fused_sod_loss(..., impl="dual_gemm")``) under the Triton interpreter:
loss, D and gradients against the float64 reference, routing of what it does not support to the default path,
argument errors, determinism.  Small odd sizes (tl.dot is slow under the interpreter): 37-token rows, V = 301
(10 tiles of 32 columns in 3 splits), Hs = 40 / Ht = 56 (K steps of 16 with a masked tail)."""

import pytest
import torch

from reference import ref_fused_sod_loss
from reference.sod_reference import ref_saturated_reverse_kl
from sod_kernels import SODLoss, fused_sod_loss
from sod_kernels.dense import dual_gemm
from tests.helpers import dense_problem, relative_error

V, VT = 301, 305


def _mask(B, T, seed, many_steps=True):
    """0/1 mask with masked prompt/tool tokens; ``many_steps``: short steps, else one step per row."""
    g = torch.Generator().manual_seed(seed)
    if many_steps:
        mask = (torch.rand(B, T, generator=g) < 0.65).to(torch.int64)
    else:
        mask = torch.zeros(B, T, dtype=torch.int64)
        for b in range(B):
            a = int(torch.randint(0, 5, (1,), generator=g))
            mask[b, a: T - int(torch.randint(0, 4, (1,), generator=g))] = 1
    mask[:, 0] = 0
    return mask


def _run(impl, inputs, mask, y, **options):
    sh, sw, th, tw, sb, tb = inputs
    leaves = [x.detach().requires_grad_() for x in (sh, sw, sb)]
    stats = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2], teacher_bias=tb, target_ids=y,
                           backend="triton", return_stats=True, impl=impl, **options)
    grads = torch.autograd.grad(stats.loss, leaves)
    return stats, grads


def _reference(inputs, mask, y, **options):
    sh, sw, th, tw, sb, tb = [x.detach().double() for x in inputs]
    leaves = [x.requires_grad_() for x in (sh, sw, sb)]
    loss, ref = ref_fused_sod_loss(leaves[0], leaves[1], th, tw, mask, student_bias=leaves[2], teacher_bias=tb,
                                   target_ids=y, **options)
    return loss, ref, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("dtype, divergence, step_divergence, hard, many_steps, Ht", [
    (torch.float32, "reverse_kl", "kl", 0.0, True, 56),
    (torch.float32, "forward_kl", "sampled", 0.3, True, 48),
    (torch.float32, "reverse_kl", "none", 0.5, False, 56),
    (torch.bfloat16, "reverse_kl", "kl", 0.0, False, 56),
    (torch.bfloat16, "forward_kl", "kl", 0.2, True, 56),
    (torch.float16, "reverse_kl", "sampled", 0.0, True, 56),
])
def test_matches_float64_reference(dtype, divergence, step_divergence, hard, many_steps, Ht):
    B, T = 2, 37
    seed = int(torch.randint(0, 2**31 - 1, (1,)))  # fresh inputs each run; the seed is in every failure message
    inputs, y = dense_problem(B, T, 40, Ht, V, VT, dtype, seed=seed)
    mask = _mask(B, T, seed=seed + 1, many_steps=many_steps)
    options = dict(divergence=divergence, step_divergence=step_divergence, hard_loss_weight=hard, temperature=0.8,
                   coef=0.7, epsilon=1e-4)
    chunk = {"chunk_size": 16} if many_steps else {}
    stats, grads = _run("dual_gemm", inputs, mask, y, **options, **chunk)
    ref_loss, ref, ref_grads = _reference(inputs, mask, y, **options)
    assert stats.loss.dtype == torch.float32
    # The loss and D come from exact float32 statistics (as on the default path).
    assert relative_error(stats.loss.detach(), ref_loss.detach()) < 1e-5, seed
    assert relative_error(stats.token_divergence, ref["token_divergence"].detach()) < 1e-5, seed
    assert torch.allclose(stats.token_weights.double(), ref["token_weights"], rtol=1e-4, atol=1e-5), seed
    # d(logits) goes through the 16-bit (fp16) stored arrays: ~1e-4 instead of 1e-7 for float32 inputs.
    tol = 5e-4 if dtype == torch.float32 else 2e-2
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert relative_error(g, r) < tol, seed


def test_bf16_storage_and_option(monkeypatch):
    B, T = 1, 37
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    inputs, y = dense_problem(B, T, 40, 56, V, VT, torch.float32, seed=seed)
    mask = _mask(B, T, seed=seed + 1)
    options = dict(divergence="reverse_kl", step_divergence="kl")
    monkeypatch.setenv(dual_gemm.STORE_ENV, "bf16")
    stats, grads = _run("dual_gemm", inputs, mask, y, **options)
    ref_loss, _, ref_grads = _reference(inputs, mask, y, **options)
    assert relative_error(stats.loss.detach(), ref_loss.detach()) < 1e-5, seed
    errors = [relative_error(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errors) < 1e-2, (seed, errors)
    monkeypatch.setenv(dual_gemm.STORE_ENV, "fp8")
    with pytest.raises(ValueError, match="SOD_KERNELS_DUAL_GEMM_STORE"):
        _run("dual_gemm", inputs, mask, y, **options)


def _count_dual(monkeypatch):
    calls = []
    real = dual_gemm.single_pass_loss

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(dual_gemm, "single_pass_loss", counted)
    return calls


@pytest.mark.parametrize("options", [
    dict(divergence="jsd", beta=0.4),
    dict(student_softcap=5.0),
    dict(teacher_softcap=4.0),
    dict(reduction="none"),
])
def test_unsupported_calls_run_the_default_path(monkeypatch, options):
    inputs, y = dense_problem(1, 9, 16, 24, 40, 40, torch.float32, seed=2)
    mask = _mask(1, 9, seed=3)
    calls = _count_dual(monkeypatch)
    sh, sw, th, tw, sb, tb = inputs
    out = {}
    for impl in ("default", "dual_gemm"):
        leaf = sh.detach().requires_grad_()
        loss = fused_sod_loss(leaf, sw, th, tw, mask, student_bias=sb, teacher_bias=tb, backend="triton", impl=impl,
                              **options)
        out[impl] = (loss, torch.autograd.grad(loss.sum(), leaf)[0])
    assert not calls
    assert torch.equal(out["default"][0], out["dual_gemm"][0]) and torch.equal(out["default"][1], out["dual_gemm"][1])


@pytest.mark.parametrize("wide", [False, True])
def test_supported_call_runs_the_dual_gemm_pass(monkeypatch, wide):
    from sod_kernels.dense import dual_gemm_kernels

    monkeypatch.setattr(dual_gemm_kernels, "FORCE_WIDE", wide)  # 64-bit offsets (large heads) give the same values
    inputs, y = dense_problem(1, 9, 16, 24, 40, 40, torch.float32, seed=2)
    calls = _count_dual(monkeypatch)
    stats, grads = _run("dual_gemm", inputs, _mask(1, 9, seed=3), y)
    assert calls == [1]
    default, default_grads = _run("default", inputs, _mask(1, 9, seed=3), y)
    assert relative_error(stats.loss.detach(), default.loss.detach()) < 1e-6
    assert all(relative_error(g, r) < 1e-3 for g, r in zip(grads, default_grads))


def test_bad_impl_errors():
    inputs, _ = dense_problem(1, 5, 8, 8, 20, 20, torch.float32, seed=0)
    sh, sw, th, tw, _, _ = inputs
    mask = torch.ones(1, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="impl"):
        fused_sod_loss(sh, sw, th, tw, mask, impl="fast")
    with pytest.raises(ValueError, match="impl='dual_gemm' needs the Triton backend"):
        fused_sod_loss(sh, sw, th, tw, mask, impl="dual_gemm", backend="torch")
    with pytest.raises(ValueError, match="memory='fast'"):
        fused_sod_loss(sh, sw, th, tw, mask, impl="dual_gemm", backend="triton", memory="low")
    with pytest.raises(ValueError, match="impl"):
        SODLoss(impl="dual-gemm")
    with pytest.raises(ValueError, match="impl='dual_gemm' needs the Triton backend"):
        SODLoss(impl="dual_gemm", backend="torch")


def test_module_form_and_determinism():
    inputs, y = dense_problem(1, 21, 40, 56, V, VT, torch.bfloat16, seed=11)
    mask = _mask(1, 21, seed=4)
    sh, sw, th, tw, sb, tb = inputs
    runs = []
    for _ in range(2):
        leaf = sw.detach().requires_grad_()
        loss = SODLoss(impl="dual_gemm", backend="triton")(sh, leaf, th, tw, mask, target_ids=y, student_bias=sb,
                                                            teacher_bias=tb)
        runs.append((loss, torch.autograd.grad(loss, leaf)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_empty_batch_gives_zero():
    inputs, _ = dense_problem(2, 7, 16, 24, 40, 40, torch.float32, seed=1)
    sh, sw, th, tw, _, _ = inputs
    leaves = [sh.detach().requires_grad_(), sw.detach().requires_grad_()]
    loss = fused_sod_loss(leaves[0], leaves[1], th, tw, torch.zeros(2, 7, dtype=torch.int64), backend="triton",
                          impl="dual_gemm")
    assert loss.item() == 0.0
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("student_std,teacher_std,ulps", [(3000.0, 10.0, 2), (3000.0, 3000.0, 16)])
def test_saturated_softmax_gradient_as_precise_as_the_default(student_std, teacher_std, ulps):
    """Logits of magnitude 1e4 (SPEC-style saturated softmaxes): the stored differences are centred per tile on
    their p_s-weighted mean, so the entries that carry the probability are stored almost exactly and the
    gradient keeps the default path's bound (a few float32 ulps of the largest logit); identity lm_head."""
    import math

    z_s, z_t, loss64, grad64 = ref_saturated_reverse_kl(student_std, teacher_std)
    z = z_s.clone().requires_grad_()
    eye = torch.eye(64)
    loss = fused_sod_loss(z[None], eye, z_t[None], eye, torch.ones(1, 64, dtype=torch.int64), step_divergence="none",
                          reduction="sum", backend="triton", impl="dual_gemm")
    loss.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-6 * abs(loss64.item())
    largest = max(z_s.abs().max().item(), z_t.abs().max().item() if teacher_std >= student_std else 0.0)
    error = (z.grad.double() - grad64).abs().max().item()
    assert error <= ulps * 2.0 ** (math.frexp(largest)[1] - 24)
