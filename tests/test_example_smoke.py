"""Smoke test of examples/train_gpt.py: a tiny model, a tiny vocabulary, two steps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("tqdm")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEP_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+\S+\s*$")


@pytest.fixture
def example_modules(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import data
    import gpt

    return data, gpt


def test_corpus_is_cached_and_batches_are_seeded(tmp_path: Path, example_modules) -> None:
    data, gpt = example_modules
    tokens, vocab, cached = data.load_corpus(300, tmp_path, max_files=3)
    assert not cached and tokens.dtype.is_floating_point is False
    assert int(tokens.max()) < vocab <= 300
    again, vocab2, cached2 = data.load_corpus(300, tmp_path, max_files=3)
    assert cached2 and vocab2 == vocab and bool((again == tokens).all())

    a = data.sample_batches(tokens, batch=2, seq=8, steps=3, seed=1)
    b = data.sample_batches(tokens, batch=2, seq=8, steps=3, seed=1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == ya.shape == (2, 8)
        assert bool((xa == xb).all()) and bool((ya == yb).all())
        assert bool((xa[:, 1:] == ya[:, :-1]).all())  # targets are the next tokens

    model = gpt.GPT(gpt.GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2,
                                  d_model=16))
    x, y = a[0]
    assert model(x).shape == (2, 8, vocab)
    assert model(x, y).dim() == 0


def test_train_gpt_two_steps(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(EXAMPLES / "train_gpt.py"),
        "--vocab", "512", "--max-files", "5", "--cache-dir", str(tmp_path),
        "--steps", "2", "--batch", "2", "--seq", "16", "--layers", "1",
        "--d-model", "32", "--heads", "2", "--device", "cpu", "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout

    rows = [m.groups() for m in map(STEP_ROW.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [1, 2], out
    for _, a, b in rows:
        assert float(b) == pytest.approx(float(a), rel=1e-4)
    assert "peak RSS, whole run" in out
    assert "most one step adds" in out
    assert "tokens/s" in out
    assert "logits N x V x 4 bytes" in out
    assert "OK: the two runs agree" in out


def test_hf_trainer_two_steps(tmp_path: Path) -> None:
    """examples/hf_trainer.py: a one-layer Llama under Trainer, with and without the pass."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cmd = [
        sys.executable, str(EXAMPLES / "hf_trainer.py"),
        "--vocab", "512", "--max-files", "5", "--cache-dir", str(tmp_path),
        "--steps", "2", "--batch", "2", "--seq", "16", "--layers", "1",
        "--hidden", "32", "--heads", "2", "--cpu", "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout

    rows = [m.groups() for m in map(STEP_ROW.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [1, 2], out
    for _, a, b in rows:
        assert float(b) == pytest.approx(float(a), rel=1e-4)
    assert "1 of 1 loss(es) rewritten" in out
    assert "peak RSS, whole run" in out
    assert "logits N x V x 4 bytes" in out
    assert "OK: the two runs agree" in out


def test_grpo_step_two_steps(tmp_path: Path) -> None:
    """examples/grpo_step.py: a tiny GPT, two GRPO steps with and without the pass.

    Every read of the logits (the policy's log-probs, entropy and argmax, and
    the reference model's log-probs under no_grad) must be rewritten, and the
    two runs must agree.
    """
    cmd = [
        sys.executable, str(EXAMPLES / "grpo_step.py"),
        "--vocab", "512", "--tokenizer-vocab", "300", "--max-files", "5",
        "--cache-dir", str(tmp_path), "--steps", "2", "--prompts", "2",
        "--generations", "2", "--prompt-len", "8", "--completion-len", "6",
        "--layers", "1", "--d-model", "32", "--heads", "2", "--device", "cpu",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout

    assert "2 of 2 site(s) rewritten" in out, out
    sites = [line.strip() for line in out.splitlines() if " at grpo_step.py:" in line]
    assert len(sites) == 2 and all(s.endswith(": rewritten") for s in sites), out
    assert any(s.startswith("gather + logsumexp + entropy + argmax ") for s in sites), out
    step_row = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)(\s+\S+){4}\s*$")
    rows = [m.groups()[:3] for m in map(step_row.match, out.splitlines()) if m]
    assert [int(r[0]) for r in rows] == [1, 2], out
    for _, a, b in rows:
        assert float(b) == pytest.approx(float(a), rel=1e-4, abs=1e-5)
    for check in ("loss", "log-probs", "entropy", "reference log-probs", "accuracy"):
        assert re.search(rf"^\s+{check}\s+\S+ <= \S+\s+ok\b", out, re.M), (check, out)
    assert "peak RSS, whole run" in out
    assert "OK: the two runs agree" in out
