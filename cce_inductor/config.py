"""Every setting of cce_inductor, with the environment variable that sets it.

Settings are read when they are used, so tests and users may assign them at
run time (``cce_inductor.config.filter_eps = None``).  The graph pass folds
them into its cache key (``settings_fingerprint``).
"""

from __future__ import annotations

import os


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _env_eps(name: str) -> float | str | None:
    value = os.environ.get(name, "auto").strip().lower()
    if value == "auto":
        return "auto"
    if value in ("none", "off", "0"):
        return None
    return float(value)


# Gradient filtering in the CUDA backward: skip logit tiles whose softmax
# contribution is below this value.  "auto" uses finfo(dtype).eps / 32 like the
# reference CCE; None turns filtering off for exact gradients.
filter_eps: float | str | None = _env_eps("CCE_INDUCTOR_FILTER_EPS")

# Under the rewrite, logits that are returned from the compiled region (as
# Hugging Face causal LMs do) are not computed while training: an empty tensor
# is returned in their place.  Off by default because it changes what the
# program returns.
drop_escaping_logits: bool = _env_flag("CCE_INDUCTOR_DROP_LOGITS", False)


# The portable (CPU) implementation holds at most this many bytes of float32
# logits at a time.  Blocks of more rows run its three matmuls faster, at the
# price of memory.  96 MiB is about 200 rows at V=128256: on a 2-core machine
# the loss then runs within a few percent of torch.compile's whole-matrix
# version, and the block is small next to a classifier of that vocabulary and
# its gradient (docs/benchmarks.md).
logits_chunk_bytes: int = int(os.environ.get("CCE_INDUCTOR_CHUNK_MIB", "96")) * 2**20


def settings_fingerprint() -> str:
    """A string that changes whenever a setting that affects compiled code does."""
    return f"filter_eps={filter_eps!r};drop_escaping_logits={drop_escaping_logits!r}"


# Autotuning of the CUDA forward kernel over its tile configs.  Off, every
# Triton kernel runs one pinned config per shape: no tuning runs (quicker
# tests and GPU checks), and results are bitwise reproducible across processes.
triton_autotune: bool = _env_flag("CCE_INDUCTOR_AUTOTUNE", True)
