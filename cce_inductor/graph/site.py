"""The records the matcher fills in and the rewrite reads.

A ``Site`` is one call of the fused op: one linear, one set of rows, one
scale/softcap/bias, and every ``Consumer`` of those logits that the op
serves in the same pass over the vocabulary (the loss, the chosen-token
log-probability, the log-sum-exp, the entropy, the argmax).  Row operations
are kept as ``RowOp`` values that replay on the hidden states what the user's
code did to the rows of the logits.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from ..functional import NO_IGNORE_INDEX

__all__ = ["NO_IGNORE_INDEX", "Consumer", "RowOp", "Site", "replay_rows", "run_rows"]

# What each consumer kind reads from the op, per row:
#   loss        the cross-entropy (options in the Site), reduced or not
#   log_prob    z_y - lse, from a gather of the log-softmax
#   logit       z_y, from a gather of the logits
#   lse         logsumexp(z)
#   neg_entropy sum(p * log p)
#   entropy     -sum(p * log p)
#   mean_logit  sum(p * z)
#   argmax      argmax(z)
TARGET_KINDS = ("loss", "log_prob", "logit")
KINDS = (*TARGET_KINDS, "lse", "neg_entropy", "entropy", "mean_logit", "argmax")


@dataclass(frozen=True)
class RowIndex:
    """``x[index]`` with the vocabulary's entry whole: selects or reorders rows.

    ``lead`` is the shape of the rows it indexes (None where symbolic) and
    ``piece`` says that it takes one piece of a ``split``/``chunk``/``unbind``.
    """

    index: tuple
    lead: tuple | None = None
    piece: bool = False


@dataclass(frozen=True)
class RowReshape:
    """``x.reshape(*lead, D)``: the leading dimensions, in row-major order."""

    lead: tuple


@dataclass(frozen=True)
class RowPermute:
    """``x.permute(*dims, last)``: the leading dimensions reordered."""

    dims: tuple


RowOp = RowIndex | RowReshape | RowPermute


def replay_rows(x: Any, ops: list[RowOp], function: Callable[..., Any],
                method: Callable[..., Any]) -> Any:
    """Apply ``ops`` to ``x`` (hidden states, whose last dimension is D).

    ``function(f, *args)`` and ``method(name, x, *args)`` make the calls, so
    the same replay builds graph nodes in the rewrite and runs on tensors in
    the vocabulary-parallel loss.
    """
    for op in ops:
        if isinstance(op, RowIndex):
            x = function(operator.getitem, x, op.index)
        elif isinstance(op, RowReshape) and len(op.lead) == 1:
            x = method("flatten", x, 0, -2)
        elif isinstance(op, RowReshape):
            x = method("reshape", x, (*op.lead, -1) if -1 not in op.lead else
                       (*op.lead, _last_size(x)))
        else:
            x = method("permute", x, (*op.dims, len(op.dims)))
    return x


def _last_size(x: Any) -> int:
    tensor = x.meta.get("example_value") if isinstance(x, Node) else x
    return int(tensor.shape[-1])


def run_rows(x: torch.Tensor, ops: list[RowOp]) -> torch.Tensor:
    """``replay_rows`` on a tensor."""
    return replay_rows(x, ops, lambda f, *a: f(*a), lambda m, t, *a: getattr(t, m)(*a))


@dataclass
class Consumer:
    """One node whose value the op provides."""

    node: Node
    kind: str
    keepdim: bool = False  # for row reductions: the vocabulary dim kept as size 1
    index: Node | None = None  # the gather index, for log_prob / logit
    dtype: torch.dtype | None = None  # the consumer's input dtype (argmax rounding)
    # For a per-row statistic of some of the site's rows: (index, lead), the
    # op's per-row output reshaped to ``lead`` and indexed so.
    output_rows: tuple | None = None


@dataclass
class Site:
    """One call of the fused op in place of the consumers of one logits tensor.

    ``rewrite`` is True when every field needed for the op call is filled in;
    otherwise ``skip_reason`` says why the graph stays as it is.
    """

    anchor: Node  # the first consumer in graph order
    form: str  # what the user wrote, for reports ("cross_entropy + logsumexp")
    skip_reason: str | None = None
    consumers: list[Consumer] = field(default_factory=list)
    linear: Node | None = None
    hidden: Node | None = None  # e before the replayed row operations
    classifier: Node | None = None  # c, or the (D, V) matrix when transposed
    classifier_is_transposed: bool = False
    classifier_batch_dims: int = 0  # leading broadcast dims of a batched matmul's weight
    vocab_slice: tuple[int, int] | None = None  # rows of c the logits keep
    bias: Node | None = None
    bias_is_sliced: bool = False  # the bias has the whole vocabulary (before the slice)
    targets: Node | None = None
    weight: Node | None = None
    ignore_index: int = -100
    reduction: str = "none"
    label_smoothing: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    row_ops: list[RowOp] = field(default_factory=list)
    logits_dtype: torch.dtype | None = None  # dtype the loss input had
    compute_dtype: torch.dtype | None = None  # dtype the linear ran in
    escaping: list[Node] = field(default_factory=list)  # logits returned by the graph
    chain: list[Node] = field(default_factory=list)  # every node between linear and consumers
    inplace: list[Node] = field(default_factory=list)  # absorbed in-place scalings
    hoist: list[Node] = field(default_factory=list)  # inputs to move before the anchor
    # The final logits, computed anyway because the graph returns them: the
    # op reads them instead of recomputing them (float32 only).
    given_logits: Node | None = None
    # Set instead of a skip reason for a vocabulary-sharded DTensor classifier
    # that the vocabulary-parallel loss serves (see vocab_parallel.py).
    vocab_parallel: Any = None

    @property
    def rewrite(self) -> bool:
        return self.skip_reason is None

    def kinds(self) -> set[str]:
        return {c.kind for c in self.consumers}

    def target_consumer(self) -> Consumer | None:
        return next((c for c in self.consumers if c.kind in TARGET_KINDS), None)

    def logits_bytes(self) -> int | None:
        """Bytes of the logits tensor the linear produced (None if unknown)."""
        found = None if self.linear is None else self.linear.meta.get("example_value")
        if found is None:
            return None
        try:
            numel = int(found.numel())
        except Exception:  # symbolic sizes without a hint
            return None
        return numel * found.element_size()

    def source_line(self) -> str:
        """The user's source line of the anchor, from the node's stack trace."""
        trace = self.anchor.meta.get("stack_trace") or ""
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("File "):
                code = lines[i + 1] if i + 1 < len(lines) else ""
                where = lines[i].replace("File ", "", 1)
                return f"{where}: {code}" if code and not code.startswith("^") else where
        return "<unknown source>"
