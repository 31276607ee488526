"""Training text that every Python installation has: the standard library's source.

A byte-level BPE tokenizer is trained on the top-level ``*.py`` files of the
standard library and the whole corpus is tokenized once; both are cached so
later runs load them in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

EOT = "<|endoftext|>"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cce_inductor`` (``~/.cache/cce_inductor`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cce_inductor"


def corpus_files(max_files: int | None = None) -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name.

    Only the top level is used: ``rglob`` would also walk ``site-packages``,
    which differs from one machine to the next.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    if not files:
        raise RuntimeError(f"no .py files found in the standard library at {stdlib}")
    return files[:max_files] if max_files else files


def _cache_key(files: list[Path], vocab_size: int) -> str:
    import tokenizers

    h = hashlib.sha256(f"v1;vocab={vocab_size};tokenizers={tokenizers.__version__}".encode())
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens (EOT included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_corpus(
    vocab_size: int, cache_dir: Path | None = None, max_files: int | None = None
) -> tuple[Tensor, int, bool]:
    """Tokenized standard-library corpus, training and caching the tokenizer if needed.

    Files are joined with an end-of-text token between them.

    Returns:
        (tokens, vocab_size, cached): a 1-D int64 tensor of token ids, the
        tokenizer's actual vocabulary size (a small corpus can fall short of the
        requested size), and whether both came from the cache.
    """
    from tokenizers import Tokenizer

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    files = corpus_files(max_files)
    key = _cache_key(files, vocab_size)
    tok_path = cache_dir / f"bpe-{key}.json"
    ids_path = cache_dir / f"tokens-{key}.pt"
    if tok_path.exists() and ids_path.exists():
        tok = Tokenizer.from_file(str(tok_path))
        return torch.load(ids_path), tok.get_vocab_size(), True

    texts = _read(files)
    tok = train_tokenizer(texts, vocab_size)
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    tokens = torch.tensor(ids, dtype=torch.int64)

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted run never leaves a half-written cache.
    tmp_tok, tmp_ids = tok_path.with_suffix(".tmp"), ids_path.with_suffix(".tmp")
    tok.save(str(tmp_tok))
    torch.save(tokens, tmp_ids)
    os.replace(tmp_tok, tok_path)
    os.replace(tmp_ids, ids_path)
    return tokens, tok.get_vocab_size(), False


def sample_batches(
    tokens: Tensor, batch: int, seq: int, steps: int, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """``steps`` batches of (inputs, next tokens), each of shape (batch, seq).

    Windows start at random offsets drawn from a generator seeded with
    ``seed``, so every caller with the same arguments gets the same batches.
    """
    if tokens.numel() < seq + 2:
        raise ValueError(f"corpus has {tokens.numel()} tokens, too few for seq={seq}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    arange = torch.arange(seq + 1)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=gen)
        windows = tokens[starts[:, None] + arange]
        out.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))
    return out
