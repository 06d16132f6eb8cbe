"""Every bad-input class of SPEC section 8 raises ValueError/TypeError naming the argument."""

import numpy as np
import pytest
import torch

from sod_kernels import (SODLoss, fused_sod_loss, grpo_advantages, sod_advantages, sod_policy_inputs,
                         sod_step_statistics, sod_step_weights, step_ids_from_mask, step_weights_from_divergence)
from sod_kernels.core.validation import (check_binary_mask, check_finite_number, check_lm_head, check_positive,
                                     check_same_device)
from sod_kernels.steps import resolve_step_ids

B, T, HS, HT, V = 2, 7, 5, 6, 11


def _inputs(**over):
    g = torch.Generator().manual_seed(1)
    args = dict(student_hidden=torch.randn(B, T, HS, generator=g), student_weight=torch.randn(V, HS, generator=g),
                teacher_hidden=torch.randn(B, T, HT, generator=g), teacher_weight=torch.randn(V + 2, HT, generator=g),
                response_mask=torch.tensor([[0, 1, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1, 1]]))
    args.update(over)
    return args


def _call(backend="torch", **over):
    args = _inputs(**{k: v for k, v in over.items() if k in _inputs()})
    kwargs = {k: v for k, v in over.items() if k not in _inputs()}
    return fused_sod_loss(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
                          args.pop("teacher_weight"), args.pop("response_mask"), backend=backend, **kwargs)


def test_valid_call_works():
    assert torch.isfinite(_call())


@pytest.mark.parametrize("over, exc, words", [
    (dict(teacher_hidden=torch.randn(B, T + 1, HT)), ValueError, "teacher_hidden"),
    (dict(response_mask=torch.ones(B, T + 1)), ValueError, "response_mask"),
    (dict(student_weight=torch.randn(V, HS + 1)), ValueError, "student_weight"),
    (dict(teacher_weight=torch.randn(V + 2, HT - 1)), ValueError, "teacher_weight"),
    (dict(teacher_weight=torch.randn(V - 1, HT)), ValueError, "teacher_weight"),
    (dict(response_mask=torch.full((B, T), 2)), ValueError, "response_mask"),
    (dict(response_mask=torch.full((B, T), 0.5)), ValueError, "response_mask"),
    (dict(student_hidden=torch.ones(B, T, HS, dtype=torch.int64)), TypeError, "student_hidden"),
    (dict(teacher_hidden=torch.ones(B, T, HT, dtype=torch.int32)), TypeError, "teacher_hidden"),
    (dict(student_hidden=[[0.0]]), TypeError, "student_hidden"),
    (dict(student_weight=torch.randn(V, HS, dtype=torch.float64)), TypeError, "student_weight"),
    (dict(epsilon=0.0), ValueError, "epsilon"),
    (dict(epsilon=-1e-3), ValueError, "epsilon"),
    (dict(delta=-0.1), ValueError, "delta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(step_divergence="mean"), ValueError, "step_divergence"),
    (dict(reduction="mean"), ValueError, "reduction"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(step_divergence="sampled"), ValueError, "target_ids"),
    (dict(target_ids=torch.full((B, T), V)), ValueError, "target_ids"),
    (dict(target_ids=torch.full((B, T), -1)), ValueError, "target_ids"),
    (dict(target_ids=torch.zeros(B, T)), TypeError, "target_ids"),
    (dict(student_bias=torch.zeros(V + 1)), ValueError, "student_bias"),
    (dict(coef=float("inf")), ValueError, "coef"),
])
def test_bad_inputs_name_the_argument(over, exc, words):
    with pytest.raises(exc, match=words):
        _call(**over)


def test_mask_and_step_ids_exclusive():
    a = _inputs()
    with pytest.raises(ValueError, match="response_mask and step_ids"):
        fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"], a["teacher_weight"],
                       a["response_mask"], step_ids=step_ids_from_mask(a["response_mask"]))
    with pytest.raises(ValueError, match="response_mask and step_ids"):
        fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"], a["teacher_weight"])


@pytest.mark.parametrize("ids, words", [
    ([[0, 0, 2, 2, -1, -1, -1]] * 2, "skip"),       # skips step 1
    ([[1, 1, -1, 2, -1, -1, -1]] * 2, "start at 0"),  # does not start at 0
    ([[0, 1, 1, 0, -1, -1, -1]] * 2, "decrease"),   # decreases
    ([[0, -2, 1, 1, -1, -1, -1]] * 2, "-1"),         # below -1
])
def test_bad_step_ids(ids, words):
    a = _inputs()
    with pytest.raises(ValueError, match=f"step_ids.*{words}|{words}.*"):
        fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"], a["teacher_weight"],
                       step_ids=torch.tensor(ids))
    with pytest.raises(TypeError, match="step_ids"):
        fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"], a["teacher_weight"],
                       step_ids=torch.tensor(ids, dtype=torch.float32))


def test_step_ids_may_leave_gaps_inside_a_step():
    a = _inputs()
    ids = torch.tensor([[0, -1, 0, 1, 1, -1, 2], [-1, -1, -1, -1, -1, -1, -1]])
    assert torch.isfinite(fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"],
                                         a["teacher_weight"], step_ids=ids))


def test_different_devices_are_rejected():
    meta = torch.randn(V + 2, HT, device="meta")
    with pytest.raises(ValueError, match="same device"):
        _call(teacher_weight=meta)


def test_nan_hidden_states_do_not_give_a_finite_loss():
    h = torch.randn(B, T, HS)
    h[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        _call(student_hidden=h)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(backend="triton")


def test_module_rejects_unknown_options():
    with pytest.raises(TypeError, match="reductio"):
        SODLoss(reductio="sum")


def test_helpers_validate():
    with pytest.raises(ValueError, match="response_mask"):
        step_ids_from_mask(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="response_mask"):
        step_ids_from_mask(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        sod_step_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="epsilon"):
        sod_step_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), epsilon=0)
    with pytest.raises(ValueError, match="delta"):
        sod_step_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), delta=-1)
    with pytest.raises(TypeError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="grpo_advantages"):
        sod_advantages(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3))


# ------------------------------------------------------------- step_ids dtypes, non-tensors, LM heads
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.uint16, torch.uint32])
def test_unsigned_step_ids_are_rejected(dtype):
    ids = torch.tensor([[0, 0, -1, 1, 1, -1, -1]] * 2)
    bad = ids.clamp(min=0).to(dtype) if dtype == torch.bool else ids.to(dtype)  # uint: -1 wraps around
    with pytest.raises(TypeError, match="step_ids must have a signed integer dtype"):
        resolve_step_ids(None, bad, (2, 7))
    with pytest.raises(TypeError, match="step_ids must have a signed integer dtype"):
        step_weights_from_divergence(torch.rand(2, 7), bad)
    a = _inputs()
    with pytest.raises(TypeError, match="step_ids must have a signed integer dtype"):
        fused_sod_loss(a["student_hidden"], a["student_weight"], a["teacher_hidden"], a["teacher_weight"],
                       step_ids=bad)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64])
def test_signed_step_ids_are_accepted(dtype):
    ids = torch.tensor([[0, 0, -1, 1, 1, -1, -1]] * 2, dtype=dtype)
    assert resolve_step_ids(None, ids, (2, 7)).tolist() == ids.long().tolist()


def _not_tensor_cases():
    B, T = 2, 5
    s, t, m = -torch.rand(B, T), -torch.rand(B, T), torch.ones(B, T, dtype=torch.int64)
    r, g = torch.ones(B), torch.zeros(B, dtype=torch.int64)
    ids = step_ids_from_mask(m)
    return [
        ("response_mask", lambda x: step_ids_from_mask(x), m),
        ("student_logprobs", lambda x: sod_step_weights(x, t, m), s),
        ("teacher_logprobs", lambda x: sod_step_statistics(s, x, m), t),
        ("response_mask", lambda x: sod_step_weights(s, t, x), m),
        ("token_signal", lambda x: step_weights_from_divergence(x, ids), s),
        ("step_ids", lambda x: step_weights_from_divergence(s, x), ids),
        ("step_ids", lambda x: resolve_step_ids(None, x, (B, T)), ids),
        ("rewards", lambda x: grpo_advantages(x, g), r),
        ("group_ids", lambda x: grpo_advantages(r, x), g),
        ("grpo_advantages", lambda x: sod_advantages(x, s, t, m), r),
        ("rewards", lambda x: sod_policy_inputs(x, g, s, t, m), r),
        ("group_ids", lambda x: sod_policy_inputs(r, x, s, t, m), g),
        ("old_logprobs", lambda x: sod_policy_inputs(r, g, x, t, m), s),
        ("response_mask", lambda x: sod_policy_inputs(r, g, s, t, x), m),
        ("b", lambda x: check_same_device(a=s, b=x), s),
        ("mask", lambda x: check_binary_mask(x, "mask"), m),
    ]


@pytest.mark.parametrize("case", range(len(_not_tensor_cases())))
@pytest.mark.parametrize("convert", [lambda x: x.numpy(), lambda x: x.tolist()], ids=["numpy", "list"])
def test_non_tensor_inputs_name_the_argument(case, convert):
    name, call, value = _not_tensor_cases()[case]
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        call(convert(value))


def test_numbers_may_be_numpy_scalars():
    assert check_positive(np.float32(0.5), "epsilon") == 0.5
    assert check_finite_number(np.int64(3), "coef") == 3.0
    with pytest.raises(TypeError, match="epsilon"):
        check_positive(np.bool_(True), "epsilon")
    with pytest.raises(TypeError, match="epsilon"):
        check_positive(torch.tensor(0.5), "epsilon")


def _head(H=4, V=6, N=3):
    return torch.randn(N, H), torch.randn(V, H), torch.zeros(V)


@pytest.mark.parametrize("change, exc, words", [
    (dict(weight=torch.randn(0, 4), bias=torch.zeros(0)), ValueError, "head_weight must have at least one vocabulary"),
    (dict(weight=torch.randn(0, 4), bias=None), ValueError, "head_weight must have at least one vocabulary"),
    (dict(hidden=torch.randn(3, 0), weight=torch.randn(6, 0)), ValueError, "hidden size H >= 1"),
    (dict(hidden=torch.randn(2, 3, 0), weight=torch.randn(6, 0)), ValueError, "head_weight and head_hidden"),
    (dict(weight=torch.randn(6, 5)), ValueError, "head_hidden's last dimension"),
    (dict(weight=torch.randn(6, 4, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(hidden=torch.ones(3, 4, dtype=torch.int64)), TypeError, "head_hidden must be a floating"),
    (dict(hidden=torch.randn(4)), ValueError, "head_hidden must be 2-D or 3-D"),
    (dict(weight=np.zeros((6, 4))), TypeError, "head_weight must be a torch.Tensor"),
    (dict(bias=torch.zeros(7)), ValueError, "head_bias must have shape"),
    (dict(bias=torch.zeros(6, dtype=torch.int64)), TypeError, "head_bias"),
])
def test_check_lm_head(change, exc, words):
    hidden, weight, bias = _head()
    args = dict(hidden=hidden, weight=weight, bias=bias)
    args.update(change)
    with pytest.raises(exc, match=words):
        check_lm_head(args["hidden"], args["weight"], args["bias"], hidden_name="head_hidden",
                      weight_name="head_weight", bias_name="head_bias")


def test_check_lm_head_accepts_valid_heads():
    for hidden, weight, bias in [_head(), _head(H=1, V=1), (torch.randn(2, 3, 4), torch.randn(6, 4), None)]:
        check_lm_head(hidden, weight, bias, hidden_name="h", weight_name="w", bias_name="b")
