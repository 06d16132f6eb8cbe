"""fused_sod_loss with divergence="jsd" and hard_loss_weight end to end on the Triton backend (under the
interpreter on CPU, on the GPU where there is one): every execution path (the single pass, the two passes of
reduction="none" and of steps longer than a chunk, memory="low") against the float64 reference, loss and the
student's gradients; the beta = 0 / 1 identities through the public function."""

from __future__ import annotations

import pytest
import torch

from reference import ref_fused_sod_loss
from sod_kernels import fused_sod_loss
from tests.sod_kernels.test_execution_contract import BACKENDS, _device

B, T, HS, HT, V, VT = 2, 11, 12, 20, 71, 75


def _problem(seed: int, device):
    g = torch.Generator().manual_seed(seed)
    sh, th = torch.randn(B, T, HS, generator=g), torch.randn(B, T, HT, generator=g)
    sw, tw = torch.randn(V, HS, generator=g) / HS ** 0.5 * 2, torch.randn(VT, HT, generator=g) / HT ** 0.5 * 2
    sb, tb = torch.randn(V, generator=g) * 0.1, torch.randn(VT, generator=g) * 0.1
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :2] = 0
    mask[0, 6:8] = 0          # row 0: two steps
    mask[1, 9:] = 0           # row 1: one step, then padding
    return [x.to(device) for x in (sh, sw, sb, th, tw, tb, y, mask)]


CASES = [
    dict(divergence="jsd", beta=0.3),
    dict(divergence="jsd", beta=0.7, hard_loss_weight=0.4, temperature=0.8),
    dict(divergence="jsd", beta=0.5, student_softcap=3.0, teacher_softcap=4.0, step_divergence="sampled"),
    dict(divergence="reverse_kl", hard_loss_weight=0.6),
    dict(divergence="forward_kl", hard_loss_weight=0.2, step_divergence="none"),
]
PATHS = [dict(), dict(memory="low"), dict(reduction="none"), dict(chunk_size=4)]   # chunk 4 < a step: two passes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("path", range(len(PATHS)))
def test_matches_the_reference(backend, case, path):
    device = _device(backend)
    sh, sw, sb, th, tw, tb, y, mask = _problem(17 + case, device)
    options = {**CASES[case], **PATHS[path]}
    leaves = [x.clone().requires_grad_() for x in (sh, sw, sb)]
    loss = fused_sod_loss(leaves[0], leaves[1], th, tw, mask, target_ids=y, student_bias=leaves[2],
                          teacher_bias=tb, coef=0.9, backend=backend, **options)
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (sh, sw, sb)]
    ref_options = {k: v for k, v in options.items() if k not in ("memory", "chunk_size")}
    ref, _ = ref_fused_sod_loss(ref_leaves[0], ref_leaves[1], th.double().cpu(), tw.double().cpu(), mask.cpu(),
                                target_ids=y.cpu(), student_bias=ref_leaves[2], teacher_bias=tb.double().cpu(),
                                coef=0.9, **ref_options)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(loss.detach().double().cpu(), ref.detach(), rtol=2e-5, atol=2e-6)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_and_one_are_the_kls_exactly(backend):
    device = _device(backend)
    sh, sw, sb, th, tw, tb, y, mask = _problem(5, device)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        a = fused_sod_loss(sh, sw, th, tw, mask, divergence="jsd", beta=beta, backend=backend, return_stats=True)
        b = fused_sod_loss(sh, sw, th, tw, mask, divergence=kl, backend=backend, return_stats=True)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.token_divergence, b.token_divergence)
