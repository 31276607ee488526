"""Peak memory and time of examples/grpo_step.py's step, one process per method.

    python tools/bench_grpo_step.py                    # V=128256, the example's defaults
    python tools/bench_grpo_step.py --rounds 1 --steps 2 --methods compile,cce,floor

The step is the example's: the policy's and the frozen reference model's
log-probs of 16 sampled completions of 64 tokens (4 prompts x 4 generations,
64-token prompts), an entropy bonus, a token accuracy, the clipped-ratio loss,
its backward and an AdamW update, on the example GPT (2 layers, d=256,
V=128256).  The rollout is sampled once, by this driver, and every process
loads it.  Methods: "compile" (torch.compile with Inductor), "cce"
(backend=cce_inductor.cce_backend), "eager" (optional), and "floor", the
same-V floor of tools/bench_train_step.py carried over to this step: the same
models, optimizer and sequences under torch.compile, with only the last
completion token of each sequence scored, so the logits are 16 rows: what the
step would cost if the logits were free.  Each process runs ``--warmup``
steps (the first compiles), then times ``--steps`` steps and reports its peak
RSS (CPU) or peak allocated memory (CUDA).  The methods take turns for
``--rounds`` rounds; a method's time is the median over all its timed steps and
its memory the largest peak.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ["floor", "compile", "cce"]


def _example():
    """examples/grpo_step.py as a module."""
    sys.path.insert(0, str(ROOT / "examples"))
    import grpo_step

    return grpo_step


def example_argv(args: argparse.Namespace) -> list[str]:
    """The example's flags for this benchmark's shape."""
    return ["--vocab", str(args.vocab), "--prompts", str(args.prompts),
            "--generations", str(args.generations), "--prompt-len", str(args.prompt_len),
            "--completion-len", str(args.completion_len), "--device", args.device,
            "--steps", str(max(2, args.steps)),
            *(["--random-prompts"] if args.random_prompts else [])]


def make_rollout_file(args: argparse.Namespace, path: pathlib.Path) -> None:
    """Sample the example's rollout once and save it for the workers."""
    import torch

    ex = _example()
    eargs = ex.parse_args(example_argv(args))
    prompts, decodable, _ = ex.load_prompts(eargs)
    policy, _ = ex.build_models(ex.model_config(eargs), eargs.seed,
                                ex.resolve_device(eargs.device))
    torch.save(ex.make_rollout(policy, prompts, eargs, decodable), path)


def worker(method: str, args: argparse.Namespace) -> dict:
    """Run one method's steps in this process; return its peak memory and times."""
    import torch

    import cce_inductor

    torch.set_num_threads(args.threads)
    ex = _example()
    eargs = ex.parse_args(example_argv(args))
    device = ex.resolve_device(eargs.device)
    rollout = torch.load(args.rollout)
    policy, reference = ex.build_models(ex.model_config(eargs), eargs.seed, device)
    k = 1 if method == "floor" else eargs.completion_len
    step = ex.make_step(policy, reference, k, ex.grpo_config(eargs))
    if method in ("compile", "floor"):
        step = torch.compile(step)
    elif method == "cce":
        step = torch.compile(step, backend=cce_inductor.cce_backend)
    elif method != "eager":
        raise SystemExit(f"unknown method {method!r}")
    inputs = ex.rollout_inputs(rollout, device, k=k)
    opt = torch.optim.AdamW(policy.parameters(), lr=eargs.lr, weight_decay=0.0)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = step(*inputs)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out["loss"].detach())
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mib": peak / 2**20, "times": times[args.warmup:],
            "warmup": times[:args.warmup], "loss": loss}


def run(method: str, args: argparse.Namespace, rollout: pathlib.Path) -> dict:
    """One method in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--worker", method, "--rollout", str(rollout),
           *sys.argv[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def combine(runs: list[dict]) -> dict:
    """One method's rounds: median over all timed steps, largest peak memory."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    return {"peak_mib": max(r["peak_mib"] for r in done),
            "seconds": statistics.median(t for r in done for t in r["times"]),
            "rounds": [statistics.median(r["times"]) for r in done]}


def print_table(results: dict[str, dict], args: argparse.Namespace) -> None:
    """The markdown table and the issue's two ratios."""
    b = args.prompts * args.generations
    seq = args.prompt_len + args.completion_len
    print(f"\nGRPO step, V={args.vocab}, {b} sequences x {seq} tokens, "
          f"{args.completion_len} completion tokens scored per sequence, "
          f"device={args.device}, {args.threads} threads; median over {args.rounds} round(s) "
          f"of {args.steps} step(s) after {args.warmup} warm-up step(s)\n")
    print("| method | peak memory (MiB) | x floor | step (s) | x torch.compile "
          "| per round (s) |")
    print("|---|---|---|---|---|---|")
    floor = results.get("floor", {}).get("peak_mib")
    base = results.get("compile", {}).get("seconds")
    for method, r in results.items():
        if "error" in r:
            print(f"| {method} | failed: {r['error']} | | | | |")
            continue
        x_floor = f"{r['peak_mib'] / floor:.2f}" if floor else ""
        speed = f"{r['seconds'] / base:.2f}" if base and method != "floor" else ""
        per_round = ", ".join(f"{s:.2f}" for s in r["rounds"])
        print(f"| {method} | {r['peak_mib']:.0f} | {x_floor} | {r['seconds']:.2f} | {speed} "
              f"| {per_round} |")
    cce = results.get("cce", {})
    if "peak_mib" in cce and floor and base:
        mem, speed = cce["peak_mib"] / floor, cce["seconds"] / base
        print(f"\nrewrite peak / floor peak: {mem:.2f} (target <= 1.10: "
              f"{'met' if mem <= 1.10 else 'not met'})")
        print(f"rewrite time / torch.compile time: {speed:.2f} (target <= 1.00: "
              f"{'met' if speed <= 1.0 else 'not met'})")


def main() -> None:
    """Sample the rollout, run the methods in turns, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated: floor, compile, cce, eager")
    parser.add_argument("--rounds", type=int, default=2, help="processes per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-prompts", action="store_true",
                        help="uniform random prompts instead of the standard library's source")
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--rollout", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        rollout = pathlib.Path(tmp) / "rollout.pt"
        make_rollout_file(args, rollout)
        for i in range(args.rounds):
            for method in methods:
                runs[method].append(run(method, args, rollout))
                print(f"round {i + 1} {method}", runs[method][-1], file=sys.stderr, flush=True)
    print_table({m: combine(r) for m, r in runs.items()}, args)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
