"""Train a tiny language model on several ranks, two ways.

    torchrun --nproc-per-node 2 examples/train_distributed.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/train_distributed.py --backend aot_eager

1. FSDP2 (``fully_shard``) with ``torch.compile(model, backend="cce")``: every
   rank trains on its own part of the batch; the graph pass replaces the head's
   ``linear -> cross_entropy`` with the fused op, so no rank builds its
   tokens x vocab logits.
2. Vocabulary parallel: every rank sees the whole batch and holds a slice of
   the classifier's rows (uneven when the vocabulary does not divide);
   ``vocab_parallel_linear_cross_entropy`` combines per-shard statistics with
   all-reduces and never gathers logits.

Both runs print the loss of every step on rank 0; it should fall steadily.
The data is synthetic: the next token is a fixed function of the current one.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cce_inductor
from cce_inductor.parallel import vocab_parallel_linear_cross_entropy


class Trunk(nn.Module):
    """Embedding and a small MLP: the part every rank keeps whole."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.norm(h + self.mlp(h))


class TinyLM(nn.Module):
    """Trunk plus an ``nn.Linear`` head, the loss computed in ``forward``."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.trunk = Trunk(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.trunk(x))
        return F.cross_entropy(logits.view(-1, self.vocab), y.view(-1))


def batch(step: int, size: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch on every rank for a given step."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randint(0, vocab, (size, seq), generator=gen)
    return x, (7 * x + 3) % vocab


def train_fsdp(args: argparse.Namespace, rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim)
    # The trunk is its own FSDP unit; the head stays in the root unit, so the
    # head's linear and the loss land in one compiled graph and get fused.
    fully_shard(model.trunk)
    fully_shard(model)
    backend = "cce" if args.backend == "inductor" else cce_inductor.make_backend(args.backend)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    per_rank = args.batch // world
    for step in range(args.steps):
        x, y = batch(step, args.batch, args.seq, args.vocab)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        start = time.perf_counter()
        loss = compiled(x[mine], y[mine])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)
        if rank == 0:
            print(f"fsdp2+cce   step {step}: loss {loss.item() / world:.4f} "
                  f"({time.perf_counter() - start:.2f}s)", flush=True)


def shard_bounds(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of this rank's classifier rows; the first ranks get one more."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def train_vocab_parallel(args: argparse.Namespace, rank: int, world: int) -> None:
    torch.manual_seed(0)
    trunk = Trunk(args.vocab, args.dim)
    full_head = torch.randn(args.vocab, args.dim) * args.dim**-0.5
    start, stop = shard_bounds(args.vocab, rank, world)
    head_shard = nn.Parameter(full_head[start:stop].clone())
    optimizer = torch.optim.AdamW([*trunk.parameters(), head_shard], lr=args.lr)
    for step in range(args.steps):
        x, y = batch(step, args.batch, args.seq, args.vocab)
        start_time = time.perf_counter()
        # Every rank holds the whole trunk and batch: its gradients come out
        # identical everywhere, since dE is summed over ranks inside the loss.
        loss = vocab_parallel_linear_cross_entropy(trunk(x), head_shard, y,
                                                   vocab_start=start)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"vocab-par   step {step}: loss {loss.item():.4f} "
                  f"(rows {start}:{stop} of {args.vocab} on rank 0, "
                  f"{time.perf_counter() - start_time:.2f}s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="sequences, all ranks together")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1001)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--backend", default="inductor",
                        help="compiler behind the rewrite: inductor (backend='cce'), "
                             "aot_eager, eager")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # CPU tensors; on GPUs use nccl and move the models
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:  # shows "cce_inductor rewrote cross_entropy at ..." when compiling
        logging.basicConfig(format="%(message)s")
        logging.getLogger("cce_inductor").setLevel(logging.INFO)
    if args.batch % world:
        parser.error(f"--batch ({args.batch}) must be a multiple of the world size ({world})")
    try:
        train_fsdp(args, rank, world)
        train_vocab_parallel(args, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
