"""Cut Cross-Entropy for torch.compile: the loss over a large vocabulary without
the N x V logits.

Entry points: ``torch.compile(model, backend=cce_backend)`` (or
``backend="cce"``), ``make_backend(inner)``, ``enable()`` / ``CCE_INDUCTOR=1``,
``explain(model, *args)`` and the op itself: ``linear_cross_entropy``, and
``linear_log_probs``, ``linear_entropy``, ``linear_argmax`` for RL and metrics.  For
``transformers.Trainer`` and TRL: ``cce_inductor.integrations.huggingface``.

Attributes load on first use, so that importing the package (which
``import torch`` does through the ``torch.backends`` entry point) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "cce_backend": "backend",
    "make_backend": "backend",
    "enable": "backend",
    "disable": "backend",
    "explain": "report",
    "linear_cross_entropy": "functional",
    "linear_log_probs": "functional",
    "linear_entropy": "functional",
    "linear_argmax": "functional",
    "config": None,
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'cce_inductor' has no attribute {name!r}")
    module = _PUBLIC[name]
    if module is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
