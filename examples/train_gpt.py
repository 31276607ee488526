"""Train a small GPT twice, with plain torch.compile and with the CCE backend.

    python examples/train_gpt.py                      # CPU or CUDA, about 2-3 min on 2 cores
    python examples/train_gpt.py --steps 100 --batch 16 --seq 256 --d-model 256

The model (examples/gpt.py) computes its loss as ``F.cross_entropy`` of an
``nn.Linear`` head's logits.  Under ``backend=cce_inductor.cce_backend`` the
graph pass replaces that pair with one fused op, so the (batch*seq) x vocab
logits are never materialized.  Both runs start from the same weights and see
the same batches; their losses must agree step by step.

Each run happens in its own interpreter so that its peak memory (``ru_maxrss``
on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import load_corpus, sample_batches  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from memory import (  # noqa: E402
    fmt_mib,
    maxrss_bytes,
    peak_rows,
    print_table,
    reset_peak_rss,
    rss_bytes,
)

import cce_inductor  # noqa: E402

ARMS = ("compile", "cce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--arm`` and ``--result-file`` are internal."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=32, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--d-model", type=int, default=128, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="largest relative loss difference between the runs that passes")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tokenizer and tokens are cached "
                        "(default ~/.cache/cce_inductor)")
    p.add_argument("--max-files", type=int, default=None,
                   help="train on only the first N standard-library files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step compiles and is not timed)")
    return args


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cce_backend_or_fallback() -> tuple[object, bool]:
    """The CCE backend, or ``"inductor"`` and False when this build lacks it."""
    backend = getattr(cce_inductor, "cce_backend", None)
    if backend is None:
        return "inductor", False
    return backend, True


FALLBACK_NOTICE = (
    "NOTICE: cce_inductor.cce_backend is not available in this build; the 'cce' run "
    "falls back to backend='inductor', so it does NOT rewrite the loss and both runs "
    "execute the same code."
)


# --------------------------------------------------------------------------- one run


def train_one_arm(args: argparse.Namespace, arm: str) -> dict:
    """Train the model for ``args.steps`` steps under one backend.

    Returns a JSON-able dict: per-step losses and seconds, tokens per second
    of the median step among 2..N, and memory in bytes: the peak over the
    whole run (``peak_all``), the peak over steps 2..N (``peak_steps``) and the
    most that one of those steps adds to the memory it starts with
    (``transient``); the last two are None where they cannot be measured.
    """
    device = resolve_device(args.device)
    if arm == "cce":
        backend, available = cce_backend_or_fallback()
        if not available:
            print(FALLBACK_NOTICE, file=sys.stderr, flush=True)
    else:
        backend = "inductor"

    tokens, vocab, _ = load_corpus(args.vocab, args.cache_dir, args.max_files)
    batches = sample_batches(tokens, args.batch, args.seq, args.steps, args.seed)
    cfg = GPTConfig(vocab_size=vocab, block_size=args.seq, n_layer=args.layers,
                    n_head=args.heads, d_model=args.d_model)
    torch.manual_seed(args.seed)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    compiled = torch.compile(model, backend=backend)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    from tqdm import tqdm

    losses: list[float] = []
    step_seconds: list[float] = []
    peak_steps: int | None = None  # highest peak of steps 2..N
    transient: int | None = None  # most memory one step adds on top of what it starts with
    bar = tqdm(batches, desc=f"{arm:>7}", unit="step", file=sys.stderr, leave=True,
               disable=args.no_progress, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        before = None
        if i >= 1:  # step 0 compiles: its memory counts only in the whole-run peak
            if cuda:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            elif reset_peak_rss():
                before = rss_bytes("VmRSS")
        t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() synchronizes, so the step time is complete
        step_seconds.append(time.perf_counter() - t0)
        if i == 0:
            peak_all = torch.cuda.max_memory_allocated(device) if cuda else maxrss_bytes()
        elif before is not None:
            peak = torch.cuda.max_memory_allocated(device) if cuda else rss_bytes("VmHWM")
            if peak is not None:
                peak_steps = max(peak_steps or 0, peak)
                transient = max(transient or 0, peak - before)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    peak_all = max(peak_all, peak_steps or 0, 0 if cuda else maxrss_bytes())

    # The median resists the stalls that other work on a shared machine causes.
    median_step = statistics.median(step_seconds[1:])
    return {
        "arm": arm,
        "losses": losses,
        "step_seconds": step_seconds,
        "tokens_per_s": args.batch * args.seq / median_step,
        "peak_all": peak_all,
        "peak_steps": peak_steps,
        "transient": transient,
        "vocab": vocab,
    }


# --------------------------------------------------------------------------- driver


def describe_rewrite(args: argparse.Namespace, tokens: torch.Tensor, vocab: int) -> str:
    """One line on what the graph pass does to this model, from ``cce_inductor.explain``."""
    cfg = GPTConfig(vocab_size=vocab, block_size=args.seq, n_layer=args.layers,
                    n_head=args.heads, d_model=args.d_model)
    x, y = sample_batches(tokens, args.batch, args.seq, 1, args.seed)[0]
    report = cce_inductor.explain(GPT(cfg), x, y)
    parts = []
    for site in report.sites:
        m = re.match(r'"(?P<file>[^"]+)", line (?P<line>\d+)', site.source)
        where = f"{os.path.basename(m['file'])}:{m['line']}" if m else site.source
        if site.rewritten:
            parts.append(f"{site.form} at {where} rewritten")
        else:
            parts.append(f"{site.form} at {where} left alone ({site.reason})")
    found = "; ".join(parts) if parts else "no candidate loss found"
    return f"{len(report.rewritten)} of {len(report.sites)} loss(es) rewritten: {found}"


def run_arm_subprocess(argv: list[str], arm: str, workdir: str) -> dict:
    """Re-run this script with ``--arm`` in a fresh interpreter and read its result."""
    result_file = Path(workdir) / f"{arm}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *argv,
           "--arm", arm, "--result-file", str(result_file)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"the '{arm}' run failed with exit status {proc.returncode}")
    return json.loads(result_file.read_text())


def print_report(args: argparse.Namespace, results: dict[str, dict], rewrite: bool) -> float:
    """Print the per-step losses and the summary; return the max relative difference."""
    a, b = results["compile"], results["cce"]
    print()
    print(f"{'step':>5}  {'loss(compile)':>14}  {'loss(cce)':>12}  {'rel diff':>9}")
    max_rel = 0.0
    for i, (la, lb) in enumerate(zip(a["losses"], b["losses"])):
        rel = abs(la - lb) / max(abs(la), 1e-12)
        max_rel = max(max_rel, rel)
        print(f"{i + 1:>5}  {la:>14.6f}  {lb:>12.6f}  {rel:>9.1e}")

    n_rows = args.batch * args.seq
    logits = n_rows * a["vocab"] * 4
    cuda = resolve_device(args.device).type == "cuda"
    peak_label = "peak CUDA memory" if cuda else "peak RSS"

    print_table(peak_rows(a, b, peak_label, args.steps) + [
        (f"tokens/s, median of steps 2..{args.steps}", f"{a['tokens_per_s']:,.0f}",
         f"{b['tokens_per_s']:,.0f}", f"x{b['tokens_per_s'] / a['tokens_per_s']:.2f}")])
    print(f"for scale, the logits N x V x 4 bytes = {n_rows} x {a['vocab']} x 4 "
          f"= {fmt_mib(logits)}")
    print(f"max relative loss difference: {max_rel:.2e} (tolerance {args.tol:.0e})")
    if not rewrite:
        print(FALLBACK_NOTICE)
    return max_rel


def main(argv: list[str] | None = None) -> int:
    """Run both arms (or one, with ``--arm``) and print the comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    if args.arm is not None:
        result = train_one_arm(args, args.arm)
        if args.result_file is not None:
            args.result_file.write_text(json.dumps(result))
        return 0

    device = resolve_device(args.device)
    _, rewrite = cce_backend_or_fallback()
    t = time.perf_counter()
    tokens, vocab, cached = load_corpus(args.vocab, args.cache_dir, args.max_files)
    prep = time.perf_counter() - t
    print("Cut Cross-Entropy as a torch.compile pass: a small GPT on the stdlib's source")
    print(f"  device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"  corpus {tokens.numel():,} tokens, BPE vocab {vocab:,} "
          f"({'cached' if cached else 'trained'} in {prep:.1f} s)")
    print(f"  model  {args.layers} layers, d_model {args.d_model}, {args.heads} heads; "
          f"batch {args.batch} x seq {args.seq} = {args.batch * args.seq:,} tokens/step")
    print(f"  train  {args.steps} AdamW steps, lr {args.lr}, seed {args.seed}")
    print(f"  runs   compile: torch.compile(model); cce: torch.compile(model, "
          f"backend=cce_inductor.cce_backend){'' if rewrite else ' -> inductor (fallback)'}")
    if rewrite:
        print(f"  pass   {describe_rewrite(args, tokens, vocab)}")
    else:
        print(FALLBACK_NOTICE)
    sys.stdout.flush()

    results = {}
    with tempfile.TemporaryDirectory(prefix="train_gpt_") as workdir:
        for arm in ARMS:
            results[arm] = run_arm_subprocess(argv, arm, workdir)
    max_rel = print_report(args, results, rewrite)
    if max_rel > args.tol:
        print(f"FAIL: losses differ by {max_rel:.2e} > {args.tol:.0e}")
        return 1
    print("OK: the two runs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
