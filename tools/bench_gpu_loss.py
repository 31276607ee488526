"""Time and peak memory of linear-cross-entropy implementations on a CUDA GPU.

    python tools/bench_gpu_loss.py                      # both shapes, every method
    python tools/bench_gpu_loss.py --shapes gemma2 --methods ours,apple_cce
    python tools/bench_gpu_loss.py --dry-run            # CPU, tiny shapes, plumbing only

For each shape (Gemma 2 2B: N=8192, V=256000, D=2304; Llama 3: N=8192,
V=128256, D=4096), bf16 operands, two kinds of inputs (``random``, and
``peaked``: each row's target logit dominates its softmax, as in a trained
model) and every method that can run here, it reports:

* forward under ``torch.no_grad()``: median time (CUDA events), TFLOP/s
  (2NDV) as a fraction of this card's bf16 matmul rate measured in the same
  run, and peak extra memory (``max_memory_allocated`` minus the inputs);
* backward alone and forward + backward (``torch.autograd.grad`` on e and c):
  median time, and for forward + backward the peak extra memory, also as a
  ratio to the size of dE + dC (the floor).

Methods that cannot be imported or need a newer PyTorch are listed with a note
instead of numbers.  The table is printed as markdown and, with ``--out``,
written to that file.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

SHAPES = {
    "gemma2": (8192, 2304, 256000),
    "llama3": (8192, 4096, 128256),
}
DRY_RUN_SHAPES = {"tiny": (64, 48, 300)}
METHODS = {
    "ours": "cce_inductor.linear_cross_entropy",
    "eager": "F.cross_entropy(e @ c.T, y)",
    "compile": "torch.compile of eager",
    "auto_chunker": "torch.compile, auto_chunker.enable",
    "torch_lce": "F.linear_cross_entropy + LinearCrossEntropyOptions()",
    "apple_cce": "cut_cross_entropy.linear_cross_entropy",
    "liger": "liger_fused_linear_cross_entropy",
}
NEEDS_CUDA = ("apple_cce", "liger")

LossFn = Callable[..., object]


def make_method(name: str) -> tuple[LossFn | None, str]:
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
        try:
            from cut_cross_entropy import linear_cross_entropy as apple
        except ImportError:
            return None, "cut_cross_entropy not installed"
        return apple, ""
    if name == "liger":
        try:
            from liger_kernel.transformers.functional import (
                liger_fused_linear_cross_entropy as liger,
            )
        except ImportError:
            return None, "liger_kernel not installed"

        def liger_loss(e, c, y):
            out = liger(e, c, y)
            return out[0] if isinstance(out, tuple) else out
        return liger_loss, ""
    raise ValueError(f"unknown method {name!r}")


def make_inputs(n: int, d: int, v: int, kind: str, device, dtype):
    """e (N, D), c (V, D), targets; ``peaked`` puts ~20 nats between each
    row's target logit and the rest."""
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

    def mark(self):
        import torch
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def matmul_tflops(device, dtype, size: int, reps: int, timer: Timer) -> float:
    """Measured bf16 matmul rate of this device (size^3 problem)."""
    import torch
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = timer.mark()
        a @ b
        times.append(timer.elapsed_ms(start, timer.mark()))
    return 2 * size**3 / (statistics.median(times) * 1e-3) / 1e12


def measure(fn: LossFn, e, c, y, reps: int, timer: Timer) -> dict[str, float]:
    """Forward (no grad), backward, forward+backward: ms and peak extra MB."""
    import torch
    cuda = timer.cuda
    result: dict[str, float] = {}

    def peak_reset() -> int:
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_extra(base: int) -> float:
        if not cuda:
            return float("nan")
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    with torch.no_grad():
        fn(e, c, y)  # compiles / autotunes
        base = peak_reset()
        times = []
        for _ in range(reps):
            start = timer.mark()
            loss = fn(e, c, y)
            times.append(timer.elapsed_ms(start, timer.mark()))
            del loss
        result["fwd_ms"] = statistics.median(times)
        result["fwd_mb"] = peak_extra(base)

    e_, c_ = e.detach().requires_grad_(), c.detach().requires_grad_()
    torch.autograd.grad(fn(e_, c_, y), (e_, c_))  # compiles / autotunes
    base = peak_reset()
    bwd, both = [], []
    for _ in range(reps):
        start = timer.mark()
        loss = fn(e_, c_, y)
        middle = timer.mark()
        grads = torch.autograd.grad(loss, (e_, c_))
        end = timer.mark()
        bwd.append(timer.elapsed_ms(middle, end))
        both.append(timer.elapsed_ms(start, end))
        del loss, grads
    result["bwd_ms"] = statistics.median(bwd)
    result["both_ms"] = statistics.median(both)
    result["both_mb"] = peak_extra(base)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kinds", default="random,peaked")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the table here")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: check the plumbing")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    shapes = DRY_RUN_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",")}
    reps = 2 if args.dry_run else args.reps
    dtype = torch.bfloat16
    timer = Timer(cuda)

    matmul = matmul_tflops(device, dtype, 256 if args.dry_run else 8192, reps, timer)
    device_name = torch.cuda.get_device_name(device) if cuda else "CPU (dry run)"
    header = [
        f"Device: {device_name}; torch {torch.__version__}; bf16; median of {reps}; "
        f"measured bf16 matmul rate {matmul:.1f} TFLOP/s.",
        "",
        "| shape (N, D, V) | inputs | method | fwd ms | fwd TFLOP/s (of matmul) | "
        "fwd extra MB | bwd ms | fwd+bwd ms | fwd+bwd extra MB | / (dE+dC) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for shape_name, (n, d, v) in shapes.items():
        floor_mb = (n * d + v * d) * 2 / 2**20
        for kind in args.kinds.split(","):
            e, c, y = make_inputs(n, d, v, kind, device, dtype)
            for method in args.methods.split(","):
                label = f"{shape_name} ({n}, {d}, {v})"
                fn, note = make_method(method)
                if fn is None:
                    rows.append(f"| {label} | {kind} | {method} | | | | | | | | {note} |")
                    continue
                try:
                    r = measure(fn, e, c, y, reps, timer)
                except Exception as err:  # OOM or an unsupported path: report it
                    msg = str(err).splitlines()[0][:80] if str(err) else ""
                    rows.append(f"| {label} | {kind} | {method} | | | | | | | | "
                                f"{type(err).__name__}: {msg} |")
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                tflops = 2 * n * d * v / (r["fwd_ms"] * 1e-3) / 1e12
                memory = (f"{r['fwd_mb']:.1f} | {r['bwd_ms']:.2f} | {r['both_ms']:.2f} | "
                          f"{r['both_mb']:.0f} | {r['both_mb'] / floor_mb:.2f}") if cuda \
                    else f"- | {r['bwd_ms']:.2f} | {r['both_ms']:.2f} | - | -"
                rows.append(
                    f"| {label} | {kind} | {method} | {r['fwd_ms']:.2f} | {tflops:.3g} "
                    f"({tflops / matmul:.0%}) | {memory} | "
                    f"{'' if cuda else 'CPU path, not the Triton kernels'} |")
                print(rows[-1], file=sys.stderr, flush=True)
                del fn
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            del e, c, y
    table = "\n".join(header + rows) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
