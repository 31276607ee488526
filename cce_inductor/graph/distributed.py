"""Sites whose operands are distributed tensors: served or left alone, with a reason.

The fused op takes plain tensors.  Under tensor parallelism the classifier
(and sometimes the hidden states) are DTensors whose logits are sharded over
ranks; handing their local shards to the op would compute a per-shard softmax,
a wrong loss with no error.  A classifier sharded over the vocabulary with
replicated hidden states is served by the vocabulary-parallel loss
(``vocab_parallel.py``); other such sites are reported and left to PyTorch
(``loss_parallel``) or to ``cce_inductor.parallel``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .vocab_parallel import plan_for

if TYPE_CHECKING:
    from .site import Site

VOCAB_PARALLEL_HINT = "use cce_inductor.parallel.vocab_parallel_linear_cross_entropy"


def classifier_skip_reason(site: Site) -> str | None:
    """Why ``site`` must not be rewritten because of distributed operands, or None.

    Looks at the example values of the classifier, the hidden states and the
    bias: a DTensor, or any other tensor subclass that wraps its data
    (quantized or float8 weights, say), is refused, except a classifier
    sharded over the vocabulary in a layout that ``vocab_parallel`` serves:
    that site gets ``site.vocab_parallel`` instead of a reason.
    """
    operands = (("classifier", site.classifier), ("hidden state", site.hidden),
                ("bias", site.bias))
    for role, node in operands:
        value = _example_value(node)
        if value is None:
            continue
        if _is_dtensor(value):
            return _dtensor_reason(role, value, site)
        if is_traceable_wrapper_subclass(value):
            return (f"the {role} is a tensor subclass ({type(value).__name__}); the "
                    "fused op takes plain tensors")
    return None


def _dtensor_reason(role: str, value: Any, site: Site) -> str:
    from torch.distributed.tensor import Shard

    vocab_dim = 1 if role == "classifier" and site.classifier_is_transposed else 0
    sharded = [p.dim % value.dim() for p in value.placements if isinstance(p, Shard)]
    if role == "classifier" and vocab_dim in sharded:
        plan, why = plan_for(site, value)
        if plan is not None:
            site.vocab_parallel = plan  # served by the vocabulary-parallel loss
            return None
        return ("the classifier is a DTensor sharded over the vocabulary; keep "
                f"loss_parallel(), or {VOCAB_PARALLEL_HINT} ({why})")
    layout = "sharded" if sharded else "replicated or partial"
    return (f"the {role} is a DTensor ({layout}: {tuple(value.placements)}); the fused op "
            f"takes plain tensors, so gather it or {VOCAB_PARALLEL_HINT}")


def _is_dtensor(value: torch.Tensor) -> bool:
    # No DTensor can exist before its module is imported; not importing it
    # here keeps the pass cheap for everyone else.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _example_value(node: Any) -> torch.Tensor | None:
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None
