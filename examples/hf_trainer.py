"""Fine-tune a small Llama with ``transformers.Trainer``, with and without the rewrite.

    pip install transformers accelerate tokenizers
    python examples/hf_trainer.py                    # CPU or CUDA
    python examples/hf_trainer.py --steps 50 --batch 16 --seq 256 --hidden 256

The model is a Llama-architecture ``LlamaForCausalLM`` at random init, with the
BPE vocabulary that examples/data.py trains on the standard library's source.
``Trainer`` computes the loss inside the model's forward, which
``TrainingArguments(torch_compile=True)`` compiles with Inductor.  One run
trains it as it is; the other first calls
``cce_inductor.integrations.huggingface.enable_for_trainer(trainer)``, which
turns the rewrite on for the duration of ``trainer.train()``.  Both runs start
from the same weights and see the same batches, so their losses must agree
step by step.  Each run happens in its own interpreter, so that its peak
memory (``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on
CUDA) is its own.

The model returns its logits next to the loss, so the forward still computes
them; what the rewrite removes is the N x V logits gradient and the softmax
kept for the backward (docs/huggingface.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from data import load_corpus, sample_batches  # noqa: E402
from memory import fmt_mib, maxrss_bytes, print_table, reset_peak_rss, rss_bytes  # noqa: E402

import cce_inductor  # noqa: E402

ARMS = ("compile", "cce")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--vocab", type=int, default=32768, help="BPE vocabulary size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even with CUDA")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="largest relative loss difference accepted between the runs")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tokenizer and tokens are cached")
    p.add_argument("--max-files", type=int, default=None,
                   help="use only the first N standard-library files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq", "layers", "hidden", "heads", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    return args


def on_cuda(args: argparse.Namespace) -> bool:
    """Whether the Trainer will train on CUDA."""
    return torch.cuda.is_available() and not args.cpu


def build_model(args: argparse.Namespace, vocab: int) -> Any:
    """A randomly initialized Llama of the requested size, float32, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).float()


def training_rows(args: argparse.Namespace, tokens: torch.Tensor) -> list[dict]:
    """``steps * batch`` windows of ``seq`` tokens; labels are the inputs (HF shifts)."""
    rows = []
    for x, _ in sample_batches(tokens, args.batch, args.seq, args.steps, args.seed):
        rows.extend({"input_ids": row, "labels": row} for row in x)
    return rows


# --------------------------------------------------------------------------- one run


def train_one_arm(args: argparse.Namespace, arm: str) -> dict:
    """Train with ``Trainer`` in this process; return losses and peak memory."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from cce_inductor.integrations.huggingface import enable_for_trainer

    tokens, vocab, _ = load_corpus(args.vocab, args.cache_dir, args.max_files)
    model = build_model(args, vocab)
    cuda = on_cuda(args)
    losses: list[float] = []
    peaks: dict[str, int | None] = {"after_first_step": None}

    class RecordingTrainer(Trainer):
        def training_step(self, *step_args: Any, **step_kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*step_args, **step_kwargs)
            losses.append(float(loss))
            return loss

    class PeakAfterFirstStep(TrainerCallback):
        """Resets the peak after step 1, which compiles, to measure steps 2.. alone."""

        def on_step_end(self, train_args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 1:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    peaks["after_first_step"] = 0
                elif reset_peak_rss():
                    peaks["after_first_step"] = 0

    training_args = TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), f"hf_trainer_{arm}"),
        per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, seed=args.seed, data_seed=args.seed, torch_compile=True,
        use_cpu=not cuda, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=args.no_progress, dataloader_num_workers=0)
    trainer = RecordingTrainer(model=model, args=training_args,
                               train_dataset=training_rows(args, tokens),
                               callbacks=[PeakAfterFirstStep()])
    if arm == "cce":
        enable_for_trainer(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if cuda:
        peak_all = None  # the reset after step 1 took the whole-run peak away
        peak_steps = torch.cuda.max_memory_allocated()
    else:
        peak_all = maxrss_bytes()
        peak_steps = rss_bytes("VmHWM") if peaks["after_first_step"] is not None else None
    return {"arm": arm, "losses": losses, "seconds": seconds, "vocab": vocab,
            "peak_all": peak_all, "peak_steps": peak_steps}


# --------------------------------------------------------------------------- driver


def describe_rewrite(args: argparse.Namespace, tokens: torch.Tensor, vocab: int) -> str:
    """One line on what the graph pass does to this model, from ``cce_inductor.explain``."""
    rows = training_rows(args, tokens)[:2]
    input_ids = torch.stack([r["input_ids"] for r in rows])
    report = cce_inductor.explain(build_model(args, vocab), input_ids=input_ids,
                                  labels=input_ids)
    escaping = sum(site.logits_escape for site in report.rewritten)
    return (f"{len(report.rewritten)} of {len(report.sites)} loss(es) rewritten"
            f"{', logits returned next to the loss' if escaping else ''}")


def run_arm_subprocess(argv: list[str], arm: str, workdir: str) -> dict:
    """Re-run this script with ``--arm`` in a fresh interpreter and read its result."""
    result_file = Path(workdir) / f"{arm}.json"
    cmd = [sys.executable, os.path.abspath(__file__), *argv,
           "--arm", arm, "--result-file", str(result_file)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"the '{arm}' run failed with exit status {proc.returncode}")
    return json.loads(result_file.read_text())


def print_report(args: argparse.Namespace, results: dict[str, dict]) -> float:
    """Print the per-step losses and the memory summary; return the max relative difference."""
    a, b = results["compile"], results["cce"]
    print()
    print(f"{'step':>5}  {'loss(compile)':>14}  {'loss(cce)':>12}  {'rel diff':>9}")
    max_rel = 0.0
    for i, (la, lb) in enumerate(zip(a["losses"], b["losses"])):
        rel = abs(la - lb) / max(abs(la), 1e-12)
        max_rel = max(max_rel, rel)
        print(f"{i + 1:>5}  {la:>14.6f}  {lb:>12.6f}  {rel:>9.1e}")
    if len(a["losses"]) != len(b["losses"]) or not a["losses"]:
        max_rel = float("inf")

    label = "peak CUDA memory" if on_cuda(args) else "peak RSS"
    rows = []
    for key, what in (("peak_all", "whole run"), ("peak_steps", f"steps 2..{args.steps}")):
        if a[key] is None and b[key] is None:
            continue
        removed = "n/a" if a[key] is None or b[key] is None else fmt_mib(a[key] - b[key])
        rows.append((f"{label}, {what}", fmt_mib(a[key]), fmt_mib(b[key]), removed))
    print_table(rows)
    n_rows = args.batch * args.seq
    print(f"for scale, the logits N x V x 4 bytes = {n_rows} x {a['vocab']} x 4 "
          f"= {fmt_mib(n_rows * a['vocab'] * 4)}")
    print(f"train() wall time: compile {a['seconds']:.1f} s, cce {b['seconds']:.1f} s "
          "(both include compiling)")
    print(f"max relative loss difference: {max_rel:.2e} (tolerance {args.tol:.0e})")
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

    t = time.perf_counter()
    tokens, vocab, cached = load_corpus(args.vocab, args.cache_dir, args.max_files)
    prep = time.perf_counter() - t
    print("Cut Cross-Entropy under transformers.Trainer: a small Llama on the stdlib's source")
    print(f"  device {'cuda' if on_cuda(args) else 'cpu'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  corpus {tokens.numel():,} tokens, BPE vocab {vocab:,} "
          f"({'cached' if cached else 'trained'} in {prep:.1f} s)")
    print(f"  model  LlamaForCausalLM, {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads; batch {args.batch} x seq {args.seq}")
    print(f"  train  Trainer, {args.steps} AdamW steps, lr {args.lr}, seed {args.seed}, "
          "TrainingArguments(torch_compile=True)")
    print("  runs   compile: as it is; cce: enable_for_trainer(trainer) first")
    print(f"  pass   {describe_rewrite(args, tokens, vocab)}")
    sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="hf_trainer_") as workdir:
        results = {arm: run_arm_subprocess(argv, arm, workdir) for arm in ARMS}
    max_rel = print_report(args, results)
    if max_rel > args.tol:
        print(f"FAIL: losses differ by {max_rel:.2e} > {args.tol:.0e}")
        return 1
    print("OK: the two runs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
