"""The SOD loss with the lm_heads sharded by vocabulary across ranks (a column-parallel lm_head).

    torchrun --standalone --nproc-per-node=2 examples/vocab_parallel_torchrun.py          # CPU ranks, gloo
    torchrun --standalone --nproc-per-node=2 examples/vocab_parallel_torchrun.py --cuda   # one GPU per rank, NCCL

Every rank builds the same toy problem from a seed (in a real run: the same batch and the replicated trunk's
hidden states), keeps its own rows of the student's and the teacher's lm_head, and trains its shard and the
(replicated) hidden states for a few steps.  Rank 0 prints the loss next to the single-process loss of the
full heads, and every rank checks that its hidden states stayed identical to the others' (each rank gets the
full hidden-state gradient: ``reduce_hidden_grad=True``).
"""

import argparse
import os

import torch
import torch._dynamo  # noqa: F401  (see the note in main)
import torch.distributed as dist

from sod_kernels import fused_sod_loss, vocab_parallel_sod_loss


def shard_bounds(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """``(first id, rows)`` of ``rank``'s contiguous shard; the first ``vocab % world`` ranks get one more row."""
    base, extra = divmod(vocab, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank with NCCL (default: CPU with gloo)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    # torch._dynamo (which the first optimizer imports) keeps references to the process groups that exist when
    # it is imported, so a group created before that import outlives destroy_process_group, its gloo threads
    # run into interpreter shutdown and the process can abort at exit.  Importing it first (above) avoids that.
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)

    B, T, Hs, Ht, V = 2, 24, 32, 48, 1001  # V need not divide by the number of ranks
    g = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(B, T, Hs, generator=g).to(device).requires_grad_()  # stands for the trunk output
    student_head = torch.randn(V, Hs, generator=g).div_(Hs ** 0.5).to(device)
    teacher_hidden = torch.randn(B, T, Ht, generator=g).to(device)
    teacher_head = torch.randn(V, Ht, generator=g).div_(Ht ** 0.5).to(device)
    mask = torch.zeros(B, T, dtype=torch.long, device=device)
    mask[:, 4:10] = 1   # two assistant turns (steps) per row, with a tool output between them
    mask[:, 14:20] = 1

    start, rows = shard_bounds(V, world, rank)
    student_shard = torch.nn.Parameter(student_head[start:start + rows].clone())
    teacher_shard = teacher_head[start:start + rows]
    with torch.no_grad():
        full = fused_sod_loss(student_hidden, student_head, teacher_hidden, teacher_head, mask)
    optimizer = torch.optim.SGD([student_shard, student_hidden], lr=2.0)
    for step in range(args.steps):
        loss = vocab_parallel_sod_loss(student_hidden, student_shard, teacher_hidden, teacher_shard, mask,
                                       vocab_start=start)
        optimizer.zero_grad()
        loss.backward()  # every rank runs backward on the same loss
        optimizer.step()
        if rank == 0:
            extra = f" (single-process, full heads: {full.item():.8f})" if step == 0 else ""
            print(f"step {step}: loss {loss.item():.8f}{extra}")

    copies = [torch.empty_like(student_hidden) for _ in range(world)]
    dist.all_gather(copies, student_hidden.detach())
    same = all(torch.equal(c, copies[0]) for c in copies)
    if rank == 0:
        print(f"{world} ranks, shards of {[shard_bounds(V, world, r)[1] for r in range(world)]} rows; "
              f"hidden states identical on every rank: {same}")
    dist.barrier()  # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
