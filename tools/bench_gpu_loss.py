"""Time and peak memory of linear-cross-entropy implementations on a CUDA GPU.

    python tools/bench_gpu_loss.py                        # within 480 s
    python tools/bench_gpu_loss.py --budget 200 --shapes gemma2 --methods ours,apple_cce
    python tools/bench_gpu_loss.py --dry-run              # CPU, tiny shape, plumbing only

Every measurement runs in a worker process of its own (one per method and
shape, both kinds of inputs), so an import error, an out-of-memory or a CUDA
fault in one implementation cannot take the others down.  Each row is
appended to ``--out`` and printed (unbuffered) the moment the worker reports
it: a run cut off at any point keeps every row measured before the cut.

For each shape (Gemma 2 2B: N=8192, V=256000, D=2304; Llama 3: N=8192,
V=128256, D=4096), bf16 operands and two kinds of inputs (``random``, and
``peaked``: each row's target logit dominates its softmax, as in a trained
model), the row of a method gives:

* forward under ``torch.no_grad()``: median time (CUDA events), its rate
  (2NDV flops) as a fraction of this card's bf16 matmul rate, measured first
  in the same run, and the peak memory beyond the inputs;
* backward alone and forward + backward (``torch.autograd.grad`` on e and c):
  median times, and the peak extra memory of forward + backward, also as a
  ratio to the size of dE + dC (the floor);
* for ours, the kernels on their own: the Triton forward (recording the tile
  maxima), and the backward with filtering for dE alone, dC alone and both.

``--budget SECONDS`` bounds the whole run: shapes and methods are taken in
the order above (most important first) and a worker is only started when its
usual cost still fits; what is left out is listed with a note.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
}
DRY_RUN_SHAPES = {"tiny": (64, 48, 300)}
METHODS = {
    "ours": "cce_inductor.linear_cross_entropy",
    "apple_cce": "cut_cross_entropy.linear_cross_entropy",
    "liger": "liger_fused_linear_cross_entropy",
    "compile": "torch.compile of eager",
    "eager": "F.cross_entropy(e @ c.T, y)",
    "auto_chunker": "torch.compile, auto_chunker.enable",
    "torch_lce": "F.linear_cross_entropy + LinearCrossEntropyOptions()",
}
KINDS = ("random", "peaked")
# Usual seconds of one worker (start, compile or tune, both kinds): a worker
# is started only while at least this much of the budget is left.
USUAL_SECONDS = {"matmul": 15, "ours": 45, "apple_cce": 40, "liger": 35, "compile": 60,
                 "eager": 25, "auto_chunker": 60, "torch_lce": 40}
DRY_RUN_SECONDS = 30

COLUMNS = ["shape (N, D, V)", "inputs", "method", "fwd ms", "fwd % of matmul",
           "fwd extra MB", "bwd ms", "fwd+bwd ms", "fwd+bwd extra MB", "/ (dE+dC)",
           "kernels ms: fwd / dE / dC / dE+dC", "note"]


# ---- the worker: one method, one shape, every kind of inputs --------------------------


def make_method(name: str):
    """The loss function (e, c, y) -> scalar of a method, or None and why not."""
    import torch
    import torch.nn.functional as F

    def eager(e, c, y):
        return F.cross_entropy(e @ c.T, y)

    if name == "ours":
        from cce_inductor import linear_cross_entropy
        return linear_cross_entropy, ""
    if name == "eager":
        return eager, ""
    if name == "compile":
        return torch.compile(eager), ""
    if name == "auto_chunker":
        try:
            return torch.compile(eager, options={"auto_chunker.enable": True}), ""
        except Exception as err:  # an unknown option is refused here
            return None, f"auto_chunker unavailable: {type(err).__name__}"
    if name == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or \
                not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return None, f"not in torch {torch.__version__} (needs 2.13+)"
        options = torch.nn.LinearCrossEntropyOptions()
        return (lambda e, c, y: F.linear_cross_entropy(e, c, y, options=options)), ""
    if not torch.cuda.is_available():
        return None, "needs CUDA"
    if name == "apple_cce":
        from cut_cross_entropy import linear_cross_entropy as apple
        return apple, ""
    if name == "liger":
        from liger_kernel.transformers.functional import (
            liger_fused_linear_cross_entropy as liger,
        )

        def liger_loss(e, c, y):
            out = liger(e, c, y)
            return out[0] if isinstance(out, tuple) else out
        return liger_loss, ""
    raise ValueError(f"unknown method {name!r}")


def make_inputs(n: int, d: int, v: int, kind: str, device, dtype):
    """e (N, D), c (V, D), targets; ``peaked`` puts ~20 nats between each
    row's target logit and the rest.  Seeded: every worker gets the same."""
    import torch
    gen = torch.Generator(device=device).manual_seed(0)
    c = torch.randn(v, d, device=device, generator=gen) * d**-0.5
    y = torch.randint(0, v, (n,), device=device, generator=gen)
    if kind == "peaked":
        target_rows = c[y]
        e = 20.0 * target_rows / target_rows.square().sum(1, keepdim=True) \
            + 0.02 * torch.randn(n, d, device=device, generator=gen)
    else:
        e = torch.randn(n, d, device=device, generator=gen)
    return e.to(dtype), c.to(dtype), y


class Timer:
    """Median of repeated timings: CUDA events on a GPU, wall clock on the CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def median_ms(self, fn, reps: int) -> float:
        """Median time of ``fn()`` over ``reps`` calls (after one warm-up call)."""
        import torch
        fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), \
                    torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


class Peak:
    """Peak allocated memory beyond what was allocated at the start."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self):
        import torch
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch
        self.mb = float("nan")
        if self.cuda:
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20


def measure(fn, e, c, y, reps: int, timer: Timer) -> dict[str, float]:
    """Forward (no grad), backward, forward+backward: ms and peak extra MB."""
    import torch
    result: dict[str, float] = {}
    with torch.no_grad():
        fn(e, c, y)  # compiles / autotunes
        with Peak(timer.cuda) as peak:
            result["fwd_ms"] = timer.median_ms(lambda: fn(e, c, y), reps)
        result["fwd_mb"] = peak.mb

    e_, c_ = e.detach().requires_grad_(), c.detach().requires_grad_()

    def both():
        return torch.autograd.grad(fn(e_, c_, y), (e_, c_))
    both()  # compiles / autotunes
    with Peak(timer.cuda) as peak:
        result["both_ms"] = timer.median_ms(both, reps)
    result["both_mb"] = peak.mb
    losses = []

    def backward_only():
        torch.autograd.grad(losses.pop(), (e_, c_))
    # The backward alone: a fresh forward before each timed backward.
    times = []
    for _ in range(reps):
        losses.append(fn(e_, c_, y))
        times.append(_time_once(backward_only, timer))
    result["bwd_ms"] = statistics.median(times)
    return result


def _time_once(fn, timer: Timer) -> float:
    import torch
    if timer.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def measure_our_kernels(e, c, y, reps: int, timer: Timer) -> dict[str, float]:
    """Our Triton kernels on their own: forward with tile maxima, then the
    filtered backward for dE alone, dC alone and both."""
    import torch

    from cce_inductor.kernels import triton_backward, triton_forward
    from cce_inductor.kernels.chunked import LossSpec
    spec = LossSpec(-100, "mean", 0.0, None, 1.0)
    flags = (False, False, False)
    out = triton_forward.forward(e, c, y, None, None, spec, flags, tile_max=True)
    lse, tile_max = out[1], out[-1]
    one = torch.ones((), device=e.device)
    result = {"k_fwd": timer.median_ms(
        lambda: triton_forward.forward(e, c, y, None, None, spec, flags, tile_max=True), reps)}
    for key, needs in (("k_de", (True, False, False)), ("k_dc", (False, True, False)),
                       ("k_both", (True, True, False))):
        result[key] = timer.median_ms(lambda needs=needs: triton_backward.backward(
            one, None, e, c, y, None, None, lse, spec, needs, tile_max=tile_max), reps)
    return result


def run_worker(args) -> int:
    """Measure one method at one shape for every kind; one JSON line per kind."""
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    timer = Timer(cuda)
    dtype = torch.bfloat16
    if args.method == "matmul":
        size = 8192 if cuda else 256
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        ms = timer.median_ms(lambda: a @ b, max(args.reps, 5))
        name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "not installed"
        emit({"matmul_tflops": 2 * size**3 / (ms * 1e-3) / 1e12, "device": name,
              "torch": torch.__version__, "triton": triton_version})
        return 0
    n, d, v = (int(x) for x in args.shape.split(","))
    fn, note = make_method(args.method)
    for kind in args.kinds.split(","):
        if fn is None:
            emit({"kind": kind, "note": note})
            continue
        e, c, y = make_inputs(n, d, v, kind, device, dtype)
        row = {"kind": kind}
        try:
            row.update(measure(fn, e, c, y, args.reps, timer))
            if args.method == "ours" and (cuda or args.dry_run):
                row.update(measure_our_kernels(e, c, y, args.reps if cuda else 1, timer))
            if not cuda and args.method == "ours":
                row["note"] = "CPU: the public function takes the chunked path"
        except Exception as err:  # OOM or an unsupported path: report it, go on
            first = str(err).splitlines()[0][:100] if str(err) else ""
            row["note"] = f"{type(err).__name__}: {first}"
        emit(row)
        del e, c, y
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return 0


def emit(record: dict) -> None:
    print("ROW " + json.dumps(record), flush=True)


# ---- the parent: plan within the budget, one worker at a time --------------------------


def format_row(label: str, method: str, record: dict, matmul: float | None,
               shape: tuple[int, int, int]) -> str:
    """One markdown row from a worker's record."""
    n, d, v = shape

    def num(key, fmt="{:.2f}"):
        value = record.get(key)
        return "" if value is None or value != value else fmt.format(value)
    fraction = ""
    if "fwd_ms" in record and matmul:
        rate = 2 * n * d * v / (record["fwd_ms"] * 1e-3) / 1e12
        fraction = f"{rate / matmul:.0%}"
    floor_mb = (n * d + v * d) * 2 / 2**20
    ratio = "" if record.get("both_mb") is None or record["both_mb"] != record["both_mb"] \
        else f"{record['both_mb'] / floor_mb:.2f}"
    kernels = " / ".join(num(k) for k in ("k_fwd", "k_de", "k_dc", "k_both")) \
        if "k_fwd" in record else ""
    cells = [label, record.get("kind", ""), method, num("fwd_ms"), fraction,
             num("fwd_mb", "{:.1f}"), num("bwd_ms"), num("both_ms"), num("both_mb", "{:.0f}"),
             ratio, kernels, record.get("note", "")]
    return "| " + " | ".join(cells) + " |"


class Output:
    """Appends lines to the --out file and stdout as soon as they exist."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, line: str) -> None:
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


def start_worker(args, method: str, shape: str | None, timeout: float):
    """Runs one worker; yields its records as they arrive, then a final
    ``{"exit": status, "error": text}``."""
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--worker", "--method", method,
           "--kinds", args.kinds, "--reps", str(args.reps)]
    if shape:
        cmd += ["--shape", shape]
    if args.dry_run:
        cmd.append("--dry-run")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    killed: list[bool] = []

    def kill() -> None:
        killed.append(True)
        proc.kill()
    killer = threading.Timer(timeout, kill)
    killer.start()
    errors: list[str] = []
    drain = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    drain.start()
    try:
        for line in proc.stdout:
            if line.startswith("ROW "):
                yield json.loads(line[4:])
        status = proc.wait()
    finally:
        killer.cancel()
    drain.join(timeout=5)
    timed_out = bool(killed)
    last = next((x.strip() for x in reversed(errors) if x.strip()), "")
    yield {"exit": status, "error": "timed out" if timed_out else last[:120]}


def run_parent(args) -> int:
    """Plans the workers within the budget and writes the table row by row."""
    start = time.monotonic()
    out = Output(args.out)
    shapes = DRY_RUN_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",")}
    methods = args.methods.split(",")

    def left() -> float:
        return args.budget - (time.monotonic() - start)

    def usual(method: str) -> float:
        return DRY_RUN_SECONDS if args.dry_run else USUAL_SECONDS.get(method, 60)

    matmul = None
    info = {}
    for record in start_worker(args, "matmul", None, max(left(), 1)):
        if "matmul_tflops" in record:
            info = record
            matmul = record["matmul_tflops"]
    if info:
        out.write(f"Device: {info['device']}; torch {info['torch']}; triton {info['triton']}; "
                  f"bf16 operands; median of {args.reps}; bf16 matmul rate measured here "
                  f"{matmul:.3g} TFLOP/s; CCE_INDUCTOR_AUTOTUNE="
                  f"{os.environ.get('CCE_INDUCTOR_AUTOTUNE', '1')}.")
    else:
        out.write("Matmul rate: not measured (its worker failed).")
    out.write("")
    out.write("| " + " | ".join(COLUMNS) + " |")
    out.write("|" + "---|" * len(COLUMNS))
    for shape_name, shape in shapes.items():
        label = f"{shape_name} ({shape[0]}, {shape[1]}, {shape[2]})"
        for method in methods:
            if left() < usual(method):
                for kind in args.kinds.split(","):
                    out.write(format_row(label, method, {"kind": kind, "note":
                                         "left out: budget"}, matmul, shape))
                continue
            seen = set()
            # At most three times its usual cost: one slow method cannot
            # starve the ones after it.
            limit = min(left(), 3 * usual(method))
            for record in start_worker(args, method, ",".join(map(str, shape)), limit):
                if "exit" in record:
                    if record["exit"] != 0:
                        note = f"worker exit {record['exit']}: {record['error']}"
                        for kind in args.kinds.split(","):
                            if kind not in seen:
                                out.write(format_row(label, method, {"kind": kind,
                                                     "note": note}, matmul, shape))
                    continue
                seen.add(record.get("kind"))
                out.write(format_row(label, method, record, matmul, shape))
    out.write("")
    took = time.monotonic() - start
    out.write(f"Benchmark took {took:.0f} s of a {args.budget:.0f} s budget.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for the whole run (default 480)")
    parser.add_argument("--out", default=None, help="also append the table here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shape: check the plumbing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.reps = min(args.reps, 2)
    return run_worker(args) if args.worker else run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
