"""Training-step peak memory and time of whole models, one process per method.

    python tools/bench_train_step.py                      # the table for docs/benchmarks.md
    python tools/bench_train_step.py --plot docs/e2e_memory.png --tokens 512,1024,2048

Models: examples/gpt.py's GPT and a 2-layer Hugging Face Llama (when
``transformers`` is installed), both at V=128256.  Methods: eager,
torch.compile, torch.compile with ``auto_chunker.enable``, backend="cce", and
for Hugging Face also backend="cce" with ``drop_escaping_logits``.  Two floors
for our GPT: "floor (V=1)" is the model with a 1-token vocabulary under
backend="cce"; "floor (same V)" keeps the vocabulary (its embedding, head,
their gradients and AdamW state) but takes the loss at the last position of
each sequence only, so its logits are a few rows: what the step would cost if
the loss itself were free.  Each process runs a
warm-up step (compiling), then times ``--steps`` steps (forward, backward,
AdamW) and reports its peak RSS (CPU) or peak allocated memory (CUDA).  The
methods take turns for ``--rounds`` rounds, so that a machine whose speed
drifts slows them alike; a method's time is the median over its rounds and
its memory the largest peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = ["eager", "compile", "auto_chunker", "cce", "cce_drop_logits"]


def build(model_name: str, vocab: int, seq: int):
    """A model whose ``step(idx, labels)`` returns the loss of one training step."""
    import torch

    torch.manual_seed(0)
    if model_name == "gpt":
        sys.path.insert(0, str(ROOT / "examples"))
        from gpt import GPT, GPTConfig

        model = GPT(GPTConfig(vocab_size=vocab, block_size=seq, n_layer=2, n_head=4,
                              d_model=256))
        return model, lambda m, idx: m(idx, idx)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg)
    return model, lambda m, idx: m(input_ids=idx, labels=idx).loss


def _last_position_loss(gpt):
    """Our GPT's step with the loss at the last position of each sequence only."""
    import torch
    import torch.nn.functional as F

    @torch.compile
    def loss(idx):
        x = gpt.tok_emb(idx) + gpt.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in gpt.blocks:
            x = block(x)
        return F.cross_entropy(gpt.head(gpt.ln_f(x)[:, -1]), idx[:, 0])

    return lambda model, idx: loss(idx)


def worker(model_name: str, method: str, vocab: int, tokens: int, seq: int, steps: int,
           device: str) -> dict:
    import torch

    import cce_inductor

    torch.set_num_threads(2)
    model, loss_of = build(model_name, vocab, seq)
    model.to(device)
    if method == "cce_drop_logits":
        cce_inductor.config.drop_escaping_logits = True
    if method == "last_position_loss":
        loss_of = _last_position_loss(model)
        model_c = model
    elif method == "compile":
        model_c = torch.compile(model)
    elif method == "auto_chunker":
        model_c = torch.compile(model, options={"auto_chunker.enable": True})
    elif method.startswith("cce"):
        model_c = torch.compile(model, backend=cce_inductor.cce_backend)
    else:
        model_c = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (max(1, tokens // seq), seq), generator=gen).to(device)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = loss_of(model_c, idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mib": peak / 2**20, "seconds": statistics.median(times),
            "loss": float(loss.detach())}


def run(model_name, method, vocab, tokens, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{model_name}:{method}:{vocab}:{tokens}",
           "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", default="1024", help="tokens per batch, comma-separated")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", default="gpt,llama")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=2, help="processes per method")
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    parser.add_argument("--plot", help="write a memory-vs-tokens plot (GPT) to this PNG")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_name, method, vocab, tokens = args.worker.split(":")
        print(json.dumps(worker(model_name, method, int(vocab), int(tokens), args.seq,
                                args.steps, args.device)))
        return

    token_counts = [int(t) for t in args.tokens.split(",")]
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for tokens in token_counts:
            runs.setdefault(("gpt", "floor", tokens), []).append(
                run("gpt", "cce", 1, tokens, args))
            runs.setdefault(("gpt", "floor_same_v", tokens), []).append(
                run("gpt", "last_position_loss", args.vocab, tokens, args))
            for model_name in args.models.split(","):
                for method in args.methods.split(","):
                    if method == "cce_drop_logits" and model_name == "gpt":
                        continue  # our GPT returns only the loss
                    key = (model_name, method, tokens)
                    runs.setdefault(key, []).append(
                        run(model_name, method, args.vocab, tokens, args))
                    print(*key, runs[key][-1], file=sys.stderr)
    results = {key: _combine(r) for key, r in runs.items()}
    _print_table(results, token_counts[-1], args)
    if args.plot:
        _plot(results, token_counts, args.plot)


def _combine(runs: list[dict]) -> dict:
    """One method's rounds: median time, largest peak memory."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    return {"peak_mib": max(r["peak_mib"] for r in done),
            "seconds": statistics.median(r["seconds"] for r in done)}


def _print_table(results, tokens, args) -> None:
    print(f"\nV={args.vocab}, {tokens} tokens per step, device={args.device}, median over "
          f"{args.rounds} rounds of {args.steps} steps after a warm-up\n")
    print("| model | method | peak memory (MiB) | x floor V=1 (GPT) | x floor same V (GPT) "
          "| step (s) | x torch.compile |")
    print("|---|---|---|---|---|---|---|")
    floors = [results.get(("gpt", name, tokens), {}).get("peak_mib")
              for name in ("floor", "floor_same_v")]
    for (model_name, method, t), r in results.items():
        if t != tokens:
            continue
        if "error" in r:
            print(f"| {model_name} | {method} | failed: {r['error']} | | | | |")
            continue
        base = results.get((model_name, "compile", tokens), {}).get("seconds")
        ratios = [f"{r['peak_mib'] / f:.2f}" if f and model_name == "gpt" else ""
                  for f in floors]
        floor_row = method.startswith("floor")
        speed = f"{r['seconds'] / base:.2f}" if base and not floor_row else ""
        print(f"| {model_name} | {method} | {r['peak_mib']:.0f} | {ratios[0]} | {ratios[1]} | "
              f"{r['seconds']:.2f} | {speed} |")


def _plot(results, token_counts, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"floor": "floor (V=1)", "floor_same_v": "floor (same V, loss at one position)"}
    for method in ["floor", "floor_same_v", "eager", "compile", "auto_chunker", "cce"]:
        points = [(t, results[("gpt", method, t)].get("peak_mib")) for t in token_counts
                  if ("gpt", method, t) in results]
        points = [(t, m) for t, m in points if m is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=labels.get(method, method))
    ax.set_xlabel("tokens per batch")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("GPT (V=128256) training step: peak memory")
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "0")
    main()
