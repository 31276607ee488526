"""Peak memory and time of loss + backward on the CPU, one process per method.

    python tools/bench_cpu_loss.py                 # N=4096, D=512, V=128256, fp32
    python tools/bench_cpu_loss.py --n 512 --v 32000 --methods floor,eager,ours
    python tools/bench_cpu_loss.py --profile ours   # where one call's time goes

Every method runs in a fresh interpreter that builds the same inputs and reports
its peak RSS (``ru_maxrss``) and the median wall time of forward + backward
after one warm-up call (which compiles, for the compiled methods).  The methods
take turns for ``--rounds`` rounds, so that a machine whose speed drifts over
minutes slows them alike; a method's time is the median over its rounds and
its memory the largest peak.  The table gives memory as a ratio to two floors,
both inputs and their gradients: ``floor`` with the torch.compile machinery
imported, ``bare`` with nothing imported but torch, and time as a ratio to
plain torch.compile, all measured in this run.  ``bare`` and ``ours`` import
no compiler module (the worker checks that the op did not either), so
``ours / bare`` is what the op on its own costs over the inputs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

METHODS = {
    "bare": "inputs, gradients, nothing imported but torch",
    "floor": "inputs, gradients, torch.compile imported",
    "eager": "F.cross_entropy(e @ c.T, y)",
    "compile": "torch.compile",
    "auto_chunker": "torch.compile + auto_chunker.enable",
    "torch_lce": "F.linear_cross_entropy + LinearCrossEntropyOptions()",
    "apple_cce": "cut_cross_entropy impl=torch_compile",
    "ours": "cce_inductor.linear_cross_entropy",
    "ours_compiled": "torch.compile + cce_inductor.linear_cross_entropy",
}


def _loss_fn(method: str):
    import torch
    import torch.nn.functional as F

    def reference(e, c, y):
        return F.cross_entropy(e @ c.T, y)

    if method == "eager":
        return reference
    if method == "compile":
        return torch.compile(reference)
    if method == "auto_chunker":
        return torch.compile(reference, options={"auto_chunker.enable": True})
    if method == "torch_lce":
        if not hasattr(F, "linear_cross_entropy"):
            return None
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda e, c, y: F.linear_cross_entropy(e, c, y, options=options)
    if method == "apple_cce":
        try:
            from cut_cross_entropy import linear_cross_entropy as apple_lce
        except ImportError:
            return None
        return lambda e, c, y: apple_lce(e, c, y, impl="torch_compile")
    from cce_inductor import linear_cross_entropy

    if method == "ours":
        return linear_cross_entropy
    if method == "ours_compiled":
        return torch.compile(linear_cross_entropy)
    raise ValueError(f"unknown method {method!r}")


# Methods measured without the torch.compile machinery imported.
LIGHT_METHODS = ("bare", "ours")
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


def _compiler_imported() -> bool:
    return any(name == m or name.startswith(m + ".")
               for name in sys.modules for m in COMPILER_MODULES)


def worker(method: str, n: int, d: int, v: int, threads: int, repeats: int) -> dict:
    """Run one method in this process and return its measurements."""
    import torch

    if method not in LIGHT_METHODS:
        import torch._inductor.compile_fx  # noqa: F401  (counted in the others)

    torch.set_num_threads(threads)
    e, c, y = _inputs(n, d, v)
    if method in ("floor", "bare"):
        e.grad, c.grad = torch.zeros_like(e), torch.zeros_like(c)
        return {"rss_mib": _peak_rss_mib(), "seconds": None}
    fn = _loss_fn(method)
    if fn is None:
        return {"skipped": "not available here"}
    times = []
    for step in range(repeats + 1):
        e.grad = c.grad = None
        start = time.perf_counter()
        fn(e, c, y).backward()
        if step:
            times.append(time.perf_counter() - start)
    if method in LIGHT_METHODS and _compiler_imported():
        raise RuntimeError(f"{method} imported torch._dynamo or torch._inductor")
    return {"rss_mib": _peak_rss_mib(), "seconds": statistics.median(times)}


def _inputs(n: int, d: int, v: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    # Drawn in place so that no temporary of c's size inflates the peak.
    e = torch.empty(n, d).normal_(generator=gen).requires_grad_()
    c = torch.empty(v, d).normal_(std=d**-0.5, generator=gen).requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen)
    return e, c, y


def profile(method: str, n: int, d: int, v: int, threads: int) -> None:
    """Print the ops that take one call's time (after a warm-up call)."""
    import torch
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(threads)
    e, c, y = _inputs(n, d, v)
    fn = _loss_fn(method)
    fn(e, c, y).backward()
    e.grad = c.grad = None
    start = time.perf_counter()
    with torch_profile() as prof:
        fn(e, c, y).backward()
    print(f"{method}, N={n} D={d} V={v}: one call took {time.perf_counter() - start:.2f} s "
          "(under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_worker(method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n),
           "--d", str(args.d), "--v", str(args.v), "--threads", str(args.threads),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"failed: {proc.stderr.strip().splitlines()[-1]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _combine(runs: list[dict]) -> dict:
    """One method's rounds: median time, largest peak memory."""
    done = [r for r in runs if "skipped" not in r]
    if not done:
        return runs[0]
    seconds = [r["seconds"] for r in done if r["seconds"] is not None]
    return {"rss_mib": max(r["rss_mib"] for r in done),
            "seconds": statistics.median(seconds) if seconds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--v", type=int, default=128256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--profile", metavar="METHOD",
                        help="profile one call of METHOD in this process instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.n, args.d, args.v, args.threads)
        return
    if args.worker:
        result = worker(args.worker, args.n, args.d, args.v, args.threads, args.repeats)
        print(json.dumps(result))
        return

    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for round_index in range(args.rounds):
        for method in methods:
            if method in ("floor", "bare") and round_index:
                continue  # deterministic: one process is enough
            runs[method].append(_run_worker(method, args))
            print(f"  round {round_index + 1} {method}: {runs[method][-1]}", file=sys.stderr)
    results = {method: _combine(r) for method, r in runs.items()}

    floor = results.get("floor", {}).get("rss_mib")
    bare = results.get("bare", {}).get("rss_mib")
    compiled = results.get("compile", {}).get("seconds")
    print(f"\nN={args.n} D={args.d} V={args.v} float32, {args.threads} threads, "
          f"loss + backward, median over {args.rounds} rounds of {args.repeats} steps\n")
    print("| method | what | peak RSS (MiB) | x floor | x bare | time (s) | x torch.compile |")
    print("|---|---|---|---|---|---|---|")
    for method, r in results.items():
        if "skipped" in r:
            print(f"| {method} | {METHODS[method]} | {r['skipped']} | | | | |")
            continue
        mem_ratio = f"{r['rss_mib'] / floor:.2f}" if floor else ""
        bare_ratio = f"{r['rss_mib'] / bare:.2f}" if bare else ""
        secs = r["seconds"]
        time_cell = "" if secs is None else f"{secs:.2f}"
        time_ratio = f"{secs / compiled:.2f}" if secs is not None and compiled else ""
        print(f"| {method} | {METHODS[method]} | {r['rss_mib']:.0f} | {mem_ratio} | "
              f"{bare_ratio} | {time_cell} | {time_ratio} |")
    ours = results.get("ours", {}).get("rss_mib")
    if bare and ours:
        print(f"\nthe op alone (ours, no compiler imported): peak RSS {ours / bare:.3f}x the "
              f"bare floor ({ours:.0f} / {bare:.0f} MiB)")


if __name__ == "__main__":
    main()
