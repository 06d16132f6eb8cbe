"""FSDP2 helpers: 2 gloo ranks on CPU, data parallel (each rank its own batch), the student and the frozen
teacher sharded with ``fully_shard``; the sharded gradients must equal the single-process gradient of the
ranks' mean loss (FSDP averages over ranks), on fresh random inputs.  Where CUDA exists, the same on NCCL
ranks, one GPU a rank (at most 2; one GPU runs one rank)."""

from __future__ import annotations

import datetime
import random
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sod_kernels import fused_sod_loss, fused_token_logprobs
from sod_kernels.fsdp import fsdp_forward, full_weight

VOCAB, WIDTH = 37, 8
RANK_DEVICE = torch.device("cpu")  # under NCCL the rank's GPU (set by _worker); models and data are moved there


class Toy(nn.Module):
    """Embedding, a two-layer body and an lm_head; ``forward`` returns the final hidden states."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids):
        return self.body(self.emb(ids)) * 1.0  # not a view: FSDP's backward hook stays on the output


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _shard(model: Toy, mesh, head_unit: bool) -> None:
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.body, mesh=mesh)
    if head_unit:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _data(seed: int, world: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (world, 2, 9), generator=g, device="cpu")
    mask = (torch.rand(world, 2, 9, generator=g, device="cpu") < 0.7).long()
    mask[..., :2] = 1
    return ids.to(RANK_DEVICE), mask.to(RANK_DEVICE)


def check(rank: int, world: int, seed: int, head_unit: bool, mesh) -> None:
    """One training step of the SOD loss and one of a log-prob objective, sharded vs single process."""
    student, teacher = Toy(seed).to(RANK_DEVICE), Toy(seed + 1).to(RANK_DEVICE)
    ref_student, ref_teacher = Toy(seed).to(RANK_DEVICE), Toy(seed + 1).to(RANK_DEVICE)
    _shard(student, mesh, head_unit)
    _shard(teacher, mesh, head_unit)
    teacher.requires_grad_(False)
    ids, mask = _data(seed + 2, world)
    with torch.no_grad():
        teacher_hidden = teacher(ids[rank])
    teacher_weight = full_weight(teacher.lm_head.weight)
    assert type(teacher_weight) is torch.Tensor and teacher_weight.shape == (VOCAB, WIDTH)
    hidden = student(ids[rank])
    owner = student.lm_head if head_unit else student
    loss = fsdp_forward(owner, lambda m, h: fused_sod_loss(h, student.lm_head.weight, teacher_hidden, teacher_weight,
                                                           mask[rank]), hidden)
    loss.backward()
    ref = sum(fused_sod_loss(ref_student(ids[r]), ref_student.lm_head.weight, ref_teacher(ids[r]).detach(),
                             ref_teacher.lm_head.weight, mask[r]) for r in range(world)) / world
    ref.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert abs(float(total) / world - float(ref)) <= 1e-5 * float(ref)
    for (name, p), (_, q) in zip(student.named_parameters(), ref_student.named_parameters()):
        assert _rel(p.grad.full_tensor(), q.grad) <= 1e-5, (rank, head_unit, name)

    # A second objective: the sampled tokens' log-probs (the policy-gradient form), after zeroing the gradients.
    student.zero_grad(set_to_none=True)
    ref_student.zero_grad(set_to_none=True)
    y = torch.roll(ids, -1, dims=-1)
    hidden = student(ids[rank])
    logp = fsdp_forward(owner, lambda m: fused_token_logprobs(hidden, student.lm_head.weight, y[rank]))
    (-logp.mean()).backward()
    ref_lp = sum(-fused_token_logprobs(ref_student(ids[r]), ref_student.lm_head.weight, y[r]).mean()
                 for r in range(world)) / world
    ref_lp.backward()
    for (name, p), (_, q) in zip(student.named_parameters(), ref_student.named_parameters()):
        assert _rel(p.grad.full_tensor(), q.grad) <= 1e-5, (rank, head_unit, "logprobs", name)


def check_hf(rank: int, world: int, seed: int, mesh) -> None:
    """A tiny transformers model (tied head, decoder layers and root sharded): the body through
    ``sod_kernels.hf.final_hidden_states`` (which calls the body, not the root's forward) and the head, each
    inside ``fsdp_forward`` of the root."""
    from torch.distributed.fsdp import fully_shard

    from sod_kernels.hf import final_hidden_states, lm_head
    from tests.hf_helpers import qwen3

    model, ref = qwen3(VOCAB, tie=True, seed=seed).to(RANK_DEVICE), qwen3(VOCAB, tie=True, seed=seed).to(RANK_DEVICE)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids, _ = _data(seed + 3, world)
    y = torch.roll(ids, -1, dims=-1)
    hidden = fsdp_forward(model, lambda m: final_hidden_states(m, ids[rank]))
    logp = fsdp_forward(model, lambda m: fused_token_logprobs(hidden, lm_head(m).weight, y[rank]))
    (-logp.mean()).backward()
    ref_loss = sum(-fused_token_logprobs(final_hidden_states(ref, ids[r]), lm_head(ref).weight, y[r]).mean()
                   for r in range(world)) / world
    ref_loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad.full_tensor(), q.grad) <= 1e-5, (rank, "hf", name)


def _worker(rank: int, world: int, init_file: str, seed: int, backend: str) -> None:
    global RANK_DEVICE
    from torch.distributed.device_mesh import init_device_mesh
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    torch.set_num_threads(1)
    options = {}
    if backend == "nccl":  # one GPU a rank
        RANK_DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(RANK_DEVICE)
        options["device_id"] = RANK_DEVICE
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), **options)
    try:
        mesh = init_device_mesh(RANK_DEVICE.type, (world,))
        check(rank, world, seed, head_unit=True, mesh=mesh)    # the head is its own unit
        check(rank, world, seed, head_unit=False, mesh=mesh)   # the head belongs to the root unit
        check_hf(rank, world, seed, mesh)
        # Without the helper, the head of its own unit is a sharded DTensor outside its forward.
        student = Toy(seed).to(RANK_DEVICE)
        _shard(student, mesh, head_unit=True)
        ids = torch.zeros(1, 3, dtype=torch.long, device=RANK_DEVICE)
        hidden = student(ids)
        with pytest.raises(RuntimeError, match="DTensor"):
            fused_token_logprobs(hidden, student.lm_head.weight, ids)
    finally:
        dist.destroy_process_group()


def _run(world: int, backend: str, tmp_path, monkeypatch) -> None:
    seed = random.randrange(1 << 30)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    try:
        mp.spawn(_worker, args=(world, str(tmp_path / "store"), seed, backend), nprocs=world, join=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the seed
        raise AssertionError(f"FSDP2 check failed ({backend}, {world} ranks, seed {seed}): {exc}") from exc


def test_fsdp_helpers_match_single_process(tmp_path, monkeypatch):
    _run(2, "gloo", tmp_path, monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a CUDA GPU")
def test_fsdp_helpers_on_nccl(tmp_path, monkeypatch):
    _run(min(torch.cuda.device_count(), 2), "nccl", tmp_path, monkeypatch)


def test_without_fsdp_the_helpers_are_plain_calls():
    head = nn.Linear(4, 6, bias=False)
    hidden = torch.randn(3, 4)
    y = torch.tensor([0, 5, 2])
    out = fsdp_forward(head, lambda m, h: fused_token_logprobs(h, m.weight, y), hidden)
    assert torch.equal(out, fused_token_logprobs(hidden, head.weight, y))
    w = full_weight(head.weight)
    assert w.data_ptr() == head.weight.data_ptr() and not w.requires_grad
    with pytest.raises(TypeError, match="fn must be callable"):
        fsdp_forward(head, "loss")
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        fsdp_forward(object(), lambda m: m)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        full_weight([1.0])
