"""GFLOP/s of the CPU path's logits matmul for one block, by vocabulary piece.

    python tools/bench_cpu_matmul.py                    # D=512 and 256, 196 rows
    python tools/bench_cpu_matmul.py --d 4096 --rows 24

Times ``LogitBlocks.logits`` (kernels/chunked.py) for one block of rows, with
the vocabulary computed at once and in pieces of several sizes
(``chunked.VOCAB_PIECE``, the default marked).  Use it to choose the piece
size on a new CPU.  Medians of 5 calls after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cce_inductor.kernels import chunked

PIECES = [None, 1024, 2048, 4096, 8192]  # None: the whole vocabulary in one matmul


def gflops(d: int, rows: int, vocab: int, piece: int | None) -> float:
    """GFLOP/s of computing one block's logits with the given piece size."""
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(rows, d, generator=gen)
    c = torch.randn(vocab, d, generator=gen)
    spec = chunked.LossSpec(-100, "mean", 0.0, None, 1.0)
    saved = chunked.VOCAB_PIECE
    chunked.VOCAB_PIECE = piece or vocab
    try:
        blocks = chunked.LogitBlocks(e, c, None, spec)
    finally:
        chunked.VOCAB_PIECE = saved
    rows_slice = slice(0, min(rows, blocks.step))
    blocks.logits(rows_slice)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        blocks.logits(rows_slice)
        times.append(time.perf_counter() - start)
    return 2 * (rows_slice.stop * d * vocab) / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", default="512,256", help="hidden sizes, comma-separated")
    parser.add_argument("--rows", type=int, default=196, help="rows per block")
    parser.add_argument("--v", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["whole" if p is None else f"{p}{' (default)' if p == chunked.VOCAB_PIECE else ''}"
             for p in PIECES]
    print(f"V={args.v}, {args.rows} rows, {args.threads} threads: GFLOP/s by piece size\n")
    print("| D | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for d in (int(x) for x in args.d.split(",")):
        rates = [gflops(d, args.rows, args.v, p) for p in PIECES]
        print(f"| {d} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")


if __name__ == "__main__":
    main()
