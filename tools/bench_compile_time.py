"""What the graph pass adds to compile time, on a 12-layer small transformer.

    python tools/bench_compile_time.py            # 3 fresh processes per arm

Each arm compiles examples/gpt.py's GPT (12 layers) in a fresh process with
Inductor's caches disabled and times the first training step (compile +
forward + backward).  The cce arm also times the pass itself (matching and
rewriting), which is the precise cost: compile time varies by more than the
pass takes between two runs of the same arm.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def worker(arm: str) -> dict:
    sys.path.insert(0, str(ROOT / "examples"))
    import torch
    from gpt import GPT, GPTConfig

    import cce_inductor
    from cce_inductor import backend as backend_module

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=8192, block_size=64, n_layer=12, n_head=4, d_model=128)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    pass_seconds = 0.0
    if arm == "cce":
        original = backend_module.rewrite_graph

        def timed(graph):
            nonlocal pass_seconds
            start = time.perf_counter()
            try:
                return original(graph)
            finally:
                pass_seconds += time.perf_counter() - start

        backend_module.rewrite_graph = timed
        compiled = torch.compile(model, backend=cce_inductor.cce_backend)
    else:
        compiled = torch.compile(model)
    start = time.perf_counter()
    compiled(idx, idx).backward()
    return {"seconds": time.perf_counter() - start, "pass_seconds": pass_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    env = dict(os.environ, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    runs: dict[str, list[dict]] = {"plain": [], "cce": []}
    for _ in range(args.repeats):
        for arm in runs:  # interleaved, so drift hits both arms alike
            out = subprocess.run([sys.executable, __file__, "--worker", arm], env=env,
                                 capture_output=True, text=True, check=True)
            runs[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = statistics.median(r["seconds"] for r in runs["plain"])
    cce = statistics.median(r["seconds"] for r in runs["cce"])
    pass_time = statistics.median(r["pass_seconds"] for r in runs["cce"])
    print(f"12-layer GPT (d=128, V=8192, 2 x 64 tokens), first step with compile, "
          f"median of {args.repeats}\n")
    print("| arm | first step (s) |\n|---|---|")
    print(f"| torch.compile | {plain:.2f} |\n| backend=cce | {cce:.2f} |")
    print(f"\npass itself: {pass_time * 1e3:.1f} ms = {100 * pass_time / plain:.2f}% of "
          f"the plain compile; whole-step ratio cce / plain = {cce / plain:.3f}")


if __name__ == "__main__":
    main()
