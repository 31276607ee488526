"""Cut Cross-Entropy for torch.compile: the loss over a large vocabulary without
the N x V logits.

Entry points: ``torch.compile(model, backend=cce_backend)`` (or
``backend="cce"``), ``make_backend(inner)``, ``enable()`` / ``CCE_INDUCTOR=1``,
``explain(model, *args)`` and the op itself, ``linear_cross_entropy``.
"""

from . import config
from .backend import cce_backend, disable, enable, make_backend
from .explain import explain
from .functional import linear_cross_entropy

__all__ = [
    "cce_backend",
    "config",
    "disable",
    "enable",
    "explain",
    "linear_cross_entropy",
    "make_backend",
]
__version__ = "0.1.0"
