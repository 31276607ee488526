"""A GRPO-style policy-gradient step on the example GPT, with and without the rewrite.

    python examples/grpo_step.py                     # CPU, V=128256, a few minutes on 2 cores
    python examples/grpo_step.py --steps 8 --completion-len 128 --prompt-len 64

One compiled function computes everything an RL trainer takes from the
logits, the way TRL's GRPO trainer writes it: the policy's logits of the
completion positions (``logits[:, :-1]``, ``[:, -k:]``, ``div_(temperature)``),
per-token log-probs by a selective log-softmax, an entropy bonus, the frozen
reference model's log-probs under ``torch.no_grad()``, a clipped-ratio loss
with group-normalized advantages, and a logged token accuracy (argmax against
the sampled tokens).  Under ``backend=cce_inductor.cce_backend`` every one of
those reads of the logits is served by one fused op per model, so neither the
policy's nor the reference's (completion tokens) x V logits are materialized.

Prompts are windows of the standard library's source, tokenized by the example
BPE (examples/data.py); the model's vocabulary is Llama 3's 128256 (larger than
the tokenizer's, as a padded vocabulary is).  Completions are sampled from the
initial policy at the given temperature, once, in this process; the sampler's
log-probs are the "old" log-probs of the clipped ratio, and the reward is the
fraction of a completion's tokens that the tokenizer can decode.  The same
rollout is then trained on for ``--steps`` updates (GRPO's inner iterations),
twice: with plain ``torch.compile`` and with the rewrite, each in a fresh
interpreter so that its peak memory is its own.  The two runs start from the
same weights; their numbers must agree within the stated tolerances.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
METRICS = ("loss", "logp", "entropy", "accuracy", "kl")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GRPOConfig:
    """The loss's hyperparameters (names as in TRL's ``GRPOConfig``)."""

    temperature: float = 0.7
    epsilon: float = 0.2  # clip range of the probability ratio
    beta: float = 0.04  # weight of the KL penalty to the reference model
    entropy_coef: float = 0.01  # weight of the entropy bonus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--arm`` and ``--workdir`` are internal."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=5, help="updates on the rollout")
    p.add_argument("--prompts", type=int, default=4, help="prompts per rollout")
    p.add_argument("--generations", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--completion-len", type=int, default=64,
                   help="tokens per completion (k, the positions scored)")
    p.add_argument("--vocab", type=int, default=128256, help="the model's vocabulary")
    p.add_argument("--tokenizer-vocab", type=int, default=32768,
                   help="BPE vocabulary of the prompts' tokenizer (examples/data.py)")
    p.add_argument("--random-prompts", action="store_true",
                   help="uniform random prompts instead of the standard library's source")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--temperature", type=float, default=GRPOConfig.temperature)
    p.add_argument("--epsilon", type=float, default=GRPOConfig.epsilon)
    p.add_argument("--beta", type=float, default=GRPOConfig.beta)
    p.add_argument("--entropy-coef", type=float, default=GRPOConfig.entropy_coef)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--loss-tol", type=float, default=1e-3,
                   help="largest |loss difference| / (|loss| + 0.1) that passes")
    p.add_argument("--token-tol", type=float, default=2e-3,
                   help="largest per-token difference of log-probs and entropies (nats)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the tokenizer and tokens are cached "
                        "(default ~/.cache/cce_inductor)")
    p.add_argument("--max-files", type=int, default=None,
                   help="tokenize only the first N standard-library files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step compiles and is not timed)")
    return args


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def grpo_config(args: argparse.Namespace) -> GRPOConfig:
    """The loss's hyperparameters from the command line."""
    return GRPOConfig(temperature=args.temperature, epsilon=args.epsilon, beta=args.beta,
                      entropy_coef=args.entropy_coef)


def model_config(args: argparse.Namespace) -> GPTConfig:
    """The GPT's shape from the command line."""
    return GPTConfig(vocab_size=args.vocab, block_size=args.prompt_len + args.completion_len,
                     n_layer=args.layers, n_head=args.heads, d_model=args.d_model)


# --------------------------------------------------------------------------- the step


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits, -1)`` at ``index``, written as TRL writes it for
    float32 logits (``gather`` minus ``logsumexp``), vectorized over the batch."""
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    return selected - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def completion_logits(model: nn.Module, input_ids: Tensor, k: int,
                      temperature: float) -> Tensor:
    """The logits that predict the last ``k`` tokens of ``input_ids``, at ``temperature``.

    As TRL's ``_get_per_token_logps_and_entropies``: ``k + 1`` positions from
    the model, drop the last (it predicts past the sequence), keep the last
    ``k``, divide by the temperature in place.
    """
    logits = model(input_ids, logits_to_keep=k + 1)
    logits = logits[:, :-1, :]
    logits = logits[:, -k:]
    logits.div_(temperature)
    return logits


def grpo_step(policy: nn.Module, reference: nn.Module, input_ids: Tensor,
              completion_mask: Tensor, old_logps: Tensor, advantages: Tensor, *,
              k: int, cfg: GRPOConfig) -> dict[str, Tensor]:
    """One GRPO loss on a rollout, and what a trainer logs with it.

    Args:
        policy: the model being trained.
        reference: a frozen copy of the initial policy.
        input_ids: prompts followed by completions, (B, T).
        completion_mask: 1.0 for the completion tokens that count, (B, k).
        old_logps: the sampler's log-probs of the completion tokens, (B, k).
        advantages: group-normalized rewards, (B,).
        k: completion tokens scored per sequence (the last k of ``input_ids``).
        cfg: the loss's hyperparameters.

    Returns:
        ``loss`` (differentiable) and, detached: per-token ``logps``,
        ``entropy`` and ``ref_logps`` (B, k), the argmax ``predictions`` (B, k),
        and the masked means ``accuracy``, ``kl`` and ``clip_ratio``.
    """
    completion_ids = input_ids[:, -k:]
    n_tokens = completion_mask.sum().clamp(min=1.0)

    logits = completion_logits(policy, input_ids, k, cfg.temperature)
    logps = selective_log_softmax(logits, completion_ids)
    entropy = entropy_from_logits(logits)
    with torch.no_grad():
        predictions = logits.argmax(-1)
        accuracy = ((predictions == completion_ids).float() * completion_mask).sum() / n_tokens
        ref_logits = completion_logits(reference, input_ids, k, cfg.temperature)
        ref_logps = selective_log_softmax(ref_logits, completion_ids)

    # The clipped surrogate, a k3 estimate of KL(policy || reference) and the
    # entropy bonus, averaged over all completion tokens.
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.min(ratio * adv, clipped * adv)
    delta = ref_logps - logps
    kl = torch.exp(delta) - delta - 1.0
    per_token = -surrogate + cfg.beta * kl - cfg.entropy_coef * entropy
    loss = (per_token * completion_mask).sum() / n_tokens

    with torch.no_grad():
        clip_ratio = (((ratio - clipped).abs() > 0).float() * completion_mask).sum() / n_tokens
        mean_kl = (kl * completion_mask).sum() / n_tokens
    return {"loss": loss, "logps": logps.detach(), "entropy": entropy.detach(),
            "ref_logps": ref_logps, "predictions": predictions, "accuracy": accuracy,
            "kl": mean_kl, "clip_ratio": clip_ratio}


def make_step(policy: nn.Module, reference: nn.Module, k: int,
              cfg: GRPOConfig) -> Callable[..., dict[str, Tensor]]:
    """``grpo_step`` with the models and settings bound: the function to compile."""

    def step(input_ids: Tensor, completion_mask: Tensor, old_logps: Tensor,
             advantages: Tensor) -> dict[str, Tensor]:
        return grpo_step(policy, reference, input_ids, completion_mask, old_logps,
                         advantages, k=k, cfg=cfg)

    return step


def build_models(cfg: GPTConfig, seed: int, device: torch.device) -> tuple[GPT, GPT]:
    """The policy (seeded) and its frozen copy, the reference model."""
    torch.manual_seed(seed)
    policy = GPT(cfg).to(device)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    return policy, reference


# --------------------------------------------------------------------------- the rollout


def load_prompts(args: argparse.Namespace) -> tuple[Tensor, int, str]:
    """``args.prompts`` prompts of ``args.prompt_len`` tokens, and the vocabulary the
    reward counts as decodable, with a line saying where they came from."""
    gen = torch.Generator().manual_seed(args.seed)
    if args.random_prompts:
        vocab = args.vocab // 4
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen)
        return prompts, vocab, f"uniform random ids below {vocab:,}"
    from data import load_corpus, sample_batches

    tokens, vocab, cached = load_corpus(args.tokenizer_vocab, args.cache_dir, args.max_files)
    if vocab > args.vocab:
        raise SystemExit(f"the tokenizer's {vocab} ids do not fit the model's {args.vocab}")
    prompts, _ = sample_batches(tokens, args.prompts, args.prompt_len, 1, args.seed)[0]
    how = "cached" if cached else "trained"
    return prompts, vocab, (f"stdlib source, {tokens.numel():,} tokens, BPE vocab {vocab:,} "
                            f"({how})")


@torch.no_grad()
def make_rollout(policy: GPT, prompts: Tensor, args: argparse.Namespace,
                 decodable: int) -> dict[str, Tensor]:
    """Sample ``args.generations`` completions per prompt from ``policy``, score them.

    Each completion has ``args.completion_len`` sampled tokens, of which the
    first ``length`` count (a length drawn in [k/2, k] per completion, standing
    for where a sampled end-of-text would stop it).  The reward is the
    fraction of counted tokens below ``decodable``; advantages are rewards
    normalized within each prompt's group, as GRPO does.

    Returns a dict of CPU tensors: ``input_ids`` (B, P + k), ``completion_mask``,
    ``old_logps`` (the sampler's log-probs) (B, k), ``rewards`` and
    ``advantages`` (B,).
    """
    device = next(policy.parameters()).device
    k, groups = args.completion_len, args.generations
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = prompts.repeat_interleave(groups, dim=0).to(device)
    old_logps = []
    for _ in range(k):
        logits = policy(ids, logits_to_keep=1)[:, -1].float() / args.temperature
        logp = F.log_softmax(logits, dim=-1).cpu()
        token = torch.multinomial(logp.exp(), 1, generator=gen)
        old_logps.append(logp.gather(-1, token).squeeze(-1))
        ids = torch.cat([ids, token.to(device)], dim=1)
    ids = ids.cpu()
    b = ids.shape[0]
    lengths = torch.randint(k // 2, k + 1, (b,), generator=gen)
    mask = (torch.arange(k)[None, :] < lengths[:, None]).float()
    rewards = ((ids[:, -k:] < decodable).float() * mask).sum(-1) / mask.sum(-1)
    grouped = rewards.view(-1, groups)
    advantages = (grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True)
                                                               + 1e-4)
    return {"input_ids": ids, "completion_mask": mask, "old_logps": torch.stack(old_logps, 1),
            "rewards": rewards, "advantages": advantages.view(-1)}


def rollout_inputs(rollout: dict[str, Tensor], device: torch.device,
                   k: int | None = None) -> tuple[Tensor, ...]:
    """The step's tensor arguments on ``device``; with ``k``, only the last ``k``
    completion positions are scored."""
    per_token = [rollout["completion_mask"], rollout["old_logps"]]
    if k is not None:
        per_token = [t[:, -k:] for t in per_token]
    tensors = (rollout["input_ids"], *per_token, rollout["advantages"])
    return tuple(t.contiguous().to(device) for t in tensors)


# --------------------------------------------------------------------------- one run


def run_arm(args: argparse.Namespace, arm: str,
            rollout: dict[str, Tensor]) -> tuple[dict, dict]:
    """Train on ``rollout`` for ``args.steps`` steps under one backend.

    Returns a JSON-able dict (per-step metrics and seconds; memory in bytes:
    the whole run's peak, the peak over steps 2..N and the most one of those
    steps adds to what it starts with, the last two None where they cannot be
    measured) and a dict of per-step per-token tensors.
    """
    device = resolve_device(args.device)
    backend = cce_inductor.cce_backend if arm == "cce" else "inductor"
    policy, reference = build_models(model_config(args), args.seed, device)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    step = torch.compile(make_step(policy, reference, args.completion_len, grpo_config(args)),
                         backend=backend)
    inputs = rollout_inputs(rollout, device)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    from tqdm import tqdm

    metrics: dict[str, list[float]] = {m: [] for m in METRICS}
    per_token: dict[str, list[Tensor]] = {"logps": [], "entropy": [], "ref_logps": [],
                                          "predictions": []}
    seconds: list[float] = []
    peak_steps: int | None = None
    transient: int | None = None
    peak_all = 0
    bar = tqdm(range(args.steps), desc=f"{arm:>7}", unit="step", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    for i in bar:
        before = None
        if i >= 1:  # step 0 compiles: its memory counts only in the whole-run peak
            if cuda:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            elif reset_peak_rss():
                before = rss_bytes("VmRSS")
        t0 = time.perf_counter()
        out = step(*inputs)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out["loss"].item()  # synchronizes, so the step time is complete
        seconds.append(time.perf_counter() - t0)
        if i == 0:
            peak_all = torch.cuda.max_memory_allocated(device) if cuda else maxrss_bytes()
        elif before is not None:
            peak = torch.cuda.max_memory_allocated(device) if cuda else rss_bytes("VmHWM")
            if peak is not None:
                peak_steps = max(peak_steps or 0, peak)
                transient = max(transient or 0, peak - before)
        mask = inputs[1]
        n = mask.sum().clamp(min=1.0)
        metrics["loss"].append(loss)
        metrics["logp"].append(float((out["logps"] * mask).sum() / n))
        metrics["entropy"].append(float((out["entropy"] * mask).sum() / n))
        metrics["accuracy"].append(float(out["accuracy"]))
        metrics["kl"].append(float(out["kl"]))
        for key in per_token:
            per_token[key].append(out[key].detach().cpu())
        bar.set_postfix(loss=f"{loss:.4f}", ent=f"{metrics['entropy'][-1]:.3f}")
    bar.close()
    peak_all = max(peak_all, peak_steps or 0, 0 if cuda else maxrss_bytes())
    result = {"arm": arm, "metrics": metrics, "seconds": seconds,
              "median_step_s": statistics.median(seconds[1:]), "peak_all": peak_all,
              "peak_steps": peak_steps, "transient": transient}
    return result, {key: torch.stack(v) for key, v in per_token.items()}


# --------------------------------------------------------------------------- driver


def explain_step(args: argparse.Namespace, rollout: dict[str, Tensor]):
    """``cce_inductor.explain`` of the compiled step at the real shape."""
    device = resolve_device(args.device)
    policy, reference = build_models(model_config(args), args.seed, device)
    step = make_step(policy, reference, args.completion_len, grpo_config(args))
    return cce_inductor.explain(step, *rollout_inputs(rollout, device))


def short_site(site) -> str:
    """A site of the explain report as ``form at file:line: status``."""
    m = re.match(r'"(?P<file>[^"]+)", line (?P<line>\d+)', site.source)
    where = f"{os.path.basename(m['file'])}:{m['line']}" if m else site.source
    status = "rewritten" if site.rewritten else f"left alone ({site.reason})"
    return f"{site.form} at {where}: {status}"


def run_arm_subprocess(argv: list[str], arm: str, workdir: Path) -> tuple[dict, dict]:
    """Re-run this script with ``--arm`` in a fresh interpreter and read its results."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--arm", arm,
           "--workdir", str(workdir)]
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"the '{arm}' run failed with exit status {proc.returncode}")
    return (json.loads((workdir / f"{arm}.json").read_text()),
            torch.load(workdir / f"{arm}.pt"))


def compare(args: argparse.Namespace, results: dict[str, dict],
            tokens: dict[str, dict], mask: Tensor) -> list[str]:
    """Print the per-step table and the agreement; return the failed checks."""
    a, b = results["compile"]["metrics"], results["cce"]["metrics"]
    print()
    print(f"{'step':>5}  {'loss(compile)':>14}  {'loss(cce)':>12}  {'entropy(cce)':>13}  "
          f"{'logp(cce)':>10}  {'acc(cce)':>9}  {'kl(cce)':>9}")
    for i in range(args.steps):
        print(f"{i + 1:>5}  {a['loss'][i]:>14.6f}  {b['loss'][i]:>12.6f}  "
              f"{b['entropy'][i]:>13.5f}  {b['logp'][i]:>10.5f}  {b['accuracy'][i]:>9.5f}  "
              f"{b['kl'][i]:>9.2e}")

    failed = []
    loss_rel = max(abs(x - y) / (abs(x) + 0.1) for x, y in zip(a["loss"], b["loss"]))
    keep = mask.bool()
    token_diff = {key: float((tokens["compile"][key] - tokens["cce"][key]).abs()[:, keep].max())
                  for key in ("logps", "entropy", "ref_logps")}
    pa, pb = tokens["compile"]["predictions"], tokens["cce"]["predictions"]
    differ = int((pa != pb)[:, keep].sum())
    acc_diff = max(abs(x - y) for x, y in zip(a["accuracy"], b["accuracy"]))
    n_tokens = int(keep.sum())
    print()
    print(f"agreement over {args.steps} steps (compile vs cce, {n_tokens} completion tokens):")
    checks = [
        ("loss", loss_rel, args.loss_tol, "|difference| / (|loss| + 0.1)"),
        ("log-probs", token_diff["logps"], args.token_tol, "max |difference| per token, nats"),
        ("entropy", token_diff["entropy"], args.token_tol, "max |difference| per token, nats"),
        ("reference log-probs", token_diff["ref_logps"], args.token_tol,
         "max |difference| per token, nats"),
        ("accuracy", acc_diff, 1.0 / n_tokens, "|difference|, at most one token in "
         f"{n_tokens}; argmax differs on {differ} of {n_tokens * args.steps} token-steps"),
    ]
    for name, value, tol, what in checks:
        ok = value <= tol
        print(f"  {name:<20} {value:.2e} <= {tol:.1e}  {'ok' if ok else 'FAIL'}  ({what})")
        if not ok:
            failed.append(name)
    return failed


def print_memory(args: argparse.Namespace, results: dict[str, dict]) -> None:
    """Print peak memory and step time of both runs, and what the rewrite removed."""
    a, b = results["compile"], results["cce"]
    cuda = resolve_device(args.device).type == "cuda"
    label = "peak CUDA memory" if cuda else "peak RSS"

    print_table(peak_rows(a, b, label, args.steps) + [
        (f"step seconds, median of steps 2..{args.steps}", f"{a['median_step_s']:.2f}",
         f"{b['median_step_s']:.2f}", f"x{b['median_step_s'] / a['median_step_s']:.2f}")])
    b_rows = args.prompts * args.generations
    logits = b_rows * (args.completion_len + 1) * args.vocab * 4
    print(f"for scale, one model's logits B x (k + 1) x V x 4 bytes = {b_rows} x "
          f"{args.completion_len + 1} x {args.vocab} x 4 = {fmt_mib(logits)}")


def main(argv: list[str] | None = None) -> int:
    """Sample the rollout, explain the step, run both arms and compare them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    if args.arm is not None:
        rollout = torch.load(args.workdir / "rollout.pt")
        result, tokens = run_arm(args, args.arm, rollout)
        (args.workdir / f"{args.arm}.json").write_text(json.dumps(result))
        torch.save(tokens, args.workdir / f"{args.arm}.pt")
        return 0

    device = resolve_device(args.device)
    cfg = grpo_config(args)
    print("GRPO step on a small GPT: per-token log-probs, entropy, reference log-probs and "
          "token accuracy")
    print(f"  device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    prompts, decodable, source = load_prompts(args)
    print(f"  prompts {args.prompts} x {args.prompt_len} tokens: {source}")
    print(f"  model  V={args.vocab:,}, {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads; reference model: a frozen copy")
    policy, _ = build_models(model_config(args), args.seed, device)
    rollout = make_rollout(policy, prompts, args, decodable)
    del policy
    b = args.prompts * args.generations
    mask = rollout["completion_mask"]
    print(f"  rollout {args.generations} completions per prompt, {b} x {args.completion_len} "
          f"tokens sampled at T={cfg.temperature} ({int(mask.sum())} counted), "
          f"mean reward {float(rollout['rewards'].mean()):.3f} "
          f"({time.perf_counter() - t:.1f} s)")
    print(f"  loss   clipped ratio (eps {cfg.epsilon}), KL to reference (beta {cfg.beta}), "
          f"entropy bonus ({cfg.entropy_coef}); AdamW lr {args.lr}, {args.steps} steps")
    print("  runs   compile: torch.compile(step); cce: torch.compile(step, "
          "backend=cce_inductor.cce_backend)")

    report = explain_step(args, rollout)
    print(f"  pass   {len(report.rewritten)} of {len(report.sites)} site(s) rewritten:")
    for site in report.sites:
        print(f"           {short_site(site)}")
    sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        workdir = Path(tmp)
        torch.save(rollout, workdir / "rollout.pt")
        results, tokens = {}, {}
        for arm in ARMS:
            results[arm], tokens[arm] = run_arm_subprocess(argv, arm, workdir)

    failed = compare(args, results, tokens, mask)
    print_memory(args, results)
    if report.skipped or not report.sites:
        failed.append("rewrite (a site was left alone)")
    if failed:
        print(f"FAIL: {', '.join(failed)}")
        return 1
    print("OK: the two runs agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
