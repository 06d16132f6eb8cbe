"""The documented precision of the reverse-KL gradient (docs/math.md, section 5) against float64: about one
float32 ulp of the largest logit per token, up to ten when the teacher's logits are as large; the loss value
exact. The lm_head is the identity, so the hidden-state gradient is dL/dz_s."""

import math

import pytest
import torch

import sod_kernels
from tests.sod_kernels.test_execution_contract import BACKENDS, _device


def reverse_kl_sum(z_s, z_t):
    log_s, log_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    return (log_s.exp() * (log_s - log_t)).sum()


def ulp(x: float) -> float:
    return 2.0 ** (math.frexp(x)[1] - 24)  # float32 spacing at |x|


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("student_std,teacher_std,ulps", [(3.0, 3.0, 4), (3000.0, 10.0, 2), (3000.0, 3000.0, 16)])
def test_reverse_kl_logit_gradient_error_is_a_few_ulps_of_the_largest_logit(backend, student_std, teacher_std,
                                                                               ulps):
    dev = _device(backend)
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(64, 64, generator=g) * student_std
    z_t = torch.randn(64, 64, generator=g) * teacher_std
    exact = z_s.double().requires_grad_()
    loss64 = reverse_kl_sum(exact, z_t.double())
    loss64.backward()
    z = z_s.to(dev).requires_grad_()
    eye = torch.eye(64, device=dev)
    loss = sod_kernels.fused_sod_loss(z[None], eye, z_t.to(dev)[None], eye, torch.ones(1, 64, dtype=torch.int64,
                                      device=dev), step_divergence="none", reduction="sum", backend=backend)
    loss.backward()
    assert abs(loss.item() - loss64.item()) <= 1e-6 * abs(loss64.item())
    error = (z.grad.double().cpu() - exact.grad).abs().max().item()
    largest = max(z_s.abs().max().item(), z_t.abs().max().item() if teacher_std >= student_std else 0.0)
    assert error <= ulps * ulp(largest), (error, ulp(largest))
