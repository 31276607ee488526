"""What is matched: linear -> (cast, slice, reshape, scale, softcap) -> cross-entropy.

The matcher works on Dynamo's torch-level graph.  It looks for *anchors*
(``F.cross_entropy``, ``F.nll_loss`` of a ``log_softmax``, and
``log_softmax(...).gather(-1, y.unsqueeze(-1))``) and walks from the anchor's
logits back to the linear that made them, normalizing every variant it passes
into one ``Site`` record.  A site either carries everything the rewrite needs
or a ``skip_reason`` saying why the graph is left alone there.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .distributed import classifier_skip_reason

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul)
CROSS_ENTROPY_TARGETS = (F.cross_entropy,)
NLL_TARGETS = (F.nll_loss,)
LOG_SOFTMAX_TARGETS = (F.log_softmax, torch.log_softmax)
LOGSUMEXP_TARGETS = (torch.logsumexp,)

# Reshapes that keep the vocabulary as the last dimension keep every row of
# logits intact and in order; the rewrite replays them as one flatten.
RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")
RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten)
CAST_METHODS = ("float", "to", "type", "half", "bfloat16")

# A row op: the leading dimensions were flattened into one.
FLATTEN_ROWS = "flatten_rows"

# Matches targets that can never occur, for anchors without an ignore_index.
NO_IGNORE_INDEX = -(2**63)


@dataclass
class Site:
    """One candidate loss in the graph, normalized.

    ``rewrite`` is True when every field needed for the op call is filled in;
    otherwise ``skip_reason`` says why the graph stays as it is.
    """

    anchor: Node
    form: str  # "cross_entropy" | "nll_loss" | "gather"
    skip_reason: str | None = None
    linear: Node | None = None
    hidden: Node | None = None  # e before the replayed row slices
    classifier: Node | None = None  # c, or the (D, V) matrix when c_is_transposed
    classifier_is_transposed: bool = False
    bias: Node | None = None
    targets: Node | None = None
    weight: Node | None = None
    ignore_index: int = -100
    reduction: str = "none"
    label_smoothing: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    # What happened to the rows between the linear and the loss, in order:
    # getitem indices on the leading dims, or FLATTEN_ROWS.
    row_ops: list[Any] = field(default_factory=list)
    logits_dtype: torch.dtype | None = None  # dtype the loss input had
    compute_dtype: torch.dtype | None = None  # dtype the linear ran in
    # logsumexp(logits, -1) over the loss's rows, served by the op's lse.
    logsumexp_users: list[Node] = field(default_factory=list)
    escaping: list[Node] = field(default_factory=list)  # chain nodes that are outputs
    chain: list[Node] = field(default_factory=list)  # nodes from anchor input to linear
    # Set instead of a skip reason for a vocabulary-sharded DTensor classifier
    # that the vocabulary-parallel loss serves (see vocab_parallel.py).
    vocab_parallel: Any = None

    @property
    def rewrite(self) -> bool:
        return self.skip_reason is None

    def logits_bytes(self) -> int | None:
        """Bytes of the logits tensor the linear produced (None if unknown)."""
        value = None if self.linear is None else self.linear.meta.get("example_value")
        if value is None:
            return None
        try:
            numel = int(value.numel())
        except Exception:  # symbolic sizes without a hint
            return None
        return numel * value.element_size()

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


class _Skip(Exception):
    """Raised inside the matcher; its message becomes ``Site.skip_reason``."""


def find_sites(graph: Graph) -> list[Site]:
    """Every candidate loss in ``graph``, each either ready to rewrite or skipped."""
    sites = []
    for node in graph.nodes:
        form = _anchor_form(node)
        if form is None:
            continue
        site = Site(anchor=node, form=form)
        try:
            _match(site)
        except _Skip as skip:
            site.skip_reason = str(skip)
        sites.append(site)
    return sites


def _anchor_form(node: Node) -> str | None:
    if _is_function(node, CROSS_ENTROPY_TARGETS):
        return "cross_entropy"
    if _is_function(node, NLL_TARGETS):
        return "nll_loss"
    if _is_function(node, (torch.gather,)) or _is_method(node, ("gather",)):
        source = node.args[0] if node.args else None
        if isinstance(source, Node) and _is_log_softmax(source):
            return "gather"
    return None


def _match(site: Site) -> None:
    anchor = site.anchor
    if site.form == "cross_entropy":
        logits = _bind_loss_args(site, anchor, allow_smoothing=True)
    elif site.form == "nll_loss":
        log_probs = _bind_loss_args(site, anchor, allow_smoothing=False)
        if not _is_log_softmax(log_probs):
            raise _Skip("nll_loss input is not a log_softmax of logits")
        logits = _log_softmax_input(site, log_probs)
    else:
        logits = _bind_gather(site, anchor)
    _walk_to_linear(site, logits)
    reason = classifier_skip_reason(site)
    if reason:
        raise _Skip(reason)


def _bind_loss_args(site: Site, node: Node, allow_smoothing: bool) -> Node:
    signature = ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                 "reduction", "label_smoothing")
    bound = dict(zip(signature, node.args))
    bound.update(node.kwargs)
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        raise _Skip("the deprecated size_average/reduce arguments are used")
    logits, targets = bound.get("input"), bound.get("target")
    if not isinstance(logits, Node) or not isinstance(targets, Node):
        raise _Skip("input or target is not a tensor in the graph")
    target_value = _value(targets)
    if target_value is None or target_value.dtype.is_floating_point:
        raise _Skip("targets are probabilities (soft labels), not class indices")
    input_value = _value(logits)
    if input_value is None or input_value.dim() != 2:
        raise _Skip("the loss input is not 2-D (N, V); the class dimension is not last")
    site.targets = targets
    site.weight = _optional_node(bound.get("weight"), "class weight")
    site.ignore_index = _constant(bound.get("ignore_index", -100), int, "ignore_index")
    site.reduction = _constant(bound.get("reduction", "mean"), str, "reduction")
    if site.reduction not in ("mean", "sum", "none"):
        raise _Skip(f"unknown reduction {site.reduction!r}")
    smoothing = _constant(bound.get("label_smoothing", 0.0), (int, float),
                          "label_smoothing")
    if smoothing and not allow_smoothing:
        raise _Skip("label smoothing on nll_loss")
    site.label_smoothing = float(smoothing)
    site.logits_dtype = input_value.dtype
    return logits


def _bind_gather(site: Site, node: Node) -> Node:
    args = list(node.args) + [None] * 3
    log_probs, dim, index = args[0], node.kwargs.get("dim", args[1]), \
        node.kwargs.get("index", args[2])
    lp_value = _value(log_probs)
    logits = _log_softmax_input(site, log_probs)
    if not _is_last_dim(dim, lp_value.dim()):
        raise _Skip(f"gather over dim {dim}, not the vocabulary (last) dimension")
    if not isinstance(index, Node):
        raise _Skip("gather index is not a tensor in the graph")
    targets = _unsqueezed_last(index)
    if targets is None:
        raise _Skip("gather index is not targets.unsqueeze(-1)")
    target_value = _value(targets)
    if target_value is None or target_value.dtype.is_floating_point:
        raise _Skip("gather index is not an integer tensor")
    if tuple(target_value.shape) != tuple(lp_value.shape[:-1]):
        raise _Skip("gather index does not pick one class per row")
    site.targets = targets
    site.ignore_index = NO_IGNORE_INDEX
    site.reduction = "none"
    site.logits_dtype = lp_value.dtype
    return logits


def _log_softmax_input(site: Site, log_probs: Node) -> Node:
    args = list(log_probs.args) + [None] * 3
    dim = log_probs.kwargs.get("dim", args[1])
    source = args[0]
    if not _is_last_dim(dim, _value(source).dim()):
        raise _Skip(f"log_softmax over dim {dim}, not the vocabulary (last) dimension")
    dtype = log_probs.kwargs.get("dtype", args[3])
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise _Skip("log_softmax dtype is not a constant")
    if len(log_probs.users) != 1:
        raise _Skip("the log_softmax is used by more than the loss")
    site.chain.append(log_probs)
    return source


def _walk_to_linear(site: Site, logits: Node) -> None:
    """Follow ``logits`` back to its linear, absorbing what lies between."""
    node = logits
    while True:
        site.chain.append(node)
        if _value(node) is None:
            raise _Skip(f"no shape information for {node.name}")
        if _as_linear(site, node):
            break
        node = _absorb_step(site, node)
    site.row_ops.reverse()  # collected from the anchor down; replayed upward
    if torch.float64 in (site.logits_dtype, site.compute_dtype):
        raise _Skip("float64 logits: the op computes in float32")
    _check_users(site)


def _as_linear(site: Site, node: Node) -> bool:
    """Fill in the classifier if ``node`` is ``linear``/``matmul``."""
    if _is_function(node, LINEAR_TARGETS):
        args = list(node.args) + [None] * 3
        hidden = args[0]
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if not isinstance(weight, Node) or _value(weight).dim() != 2:
            raise _Skip("linear weight is not a 2-D tensor")
        if bias is not None:
            if site.bias is not None:
                raise _Skip("two biases")
            site.bias = bias
        site.classifier = weight
    elif _is_function(node, MATMUL_TARGETS) or _is_method(node, ("matmul",)):
        hidden, rhs = node.args[0], node.args[1]
        if not isinstance(rhs, Node) or _value(rhs).dim() != 2:
            raise _Skip("matmul's right operand is not a 2-D classifier")
        transposed_from = _transpose_source(rhs)
        if transposed_from is not None and _value(transposed_from).dim() == 2:
            site.classifier = transposed_from
        else:
            site.classifier, site.classifier_is_transposed = rhs, True
    else:
        return False
    if not isinstance(hidden, Node) or _value(hidden).dim() < 1:
        raise _Skip("linear input is not a tensor")
    site.linear, site.hidden = node, hidden
    site.compute_dtype = _value(node).dtype
    return True


def _absorb_step(site: Site, node: Node) -> Node:
    """Record what ``node`` does to the logits in ``site``; return its source.

    The walk goes from the loss towards the linear, so a step met earlier is
    applied later in the user's program.
    """
    value = _value(node)
    if _is_method(node, RESHAPE_METHODS) or _is_function(node, RESHAPE_FUNCTIONS):
        source = node.args[0]
        source_value = _value(source)
        if value.dim() < 1 or value.shape[-1:] != source_value.shape[-1:]:
            raise _Skip(f"{node.name} reshapes the vocabulary dimension")
        if value.shape == source_value.shape:
            return source
        if value.dim() != 2:
            raise _Skip(f"{node.name} reshapes rows into several dimensions")
        site.row_ops.append(FLATTEN_ROWS)
        return source
    if _is_method(node, CAST_METHODS):
        if not value.dtype.is_floating_point or value.device != _value(node.args[0]).device:
            raise _Skip(f"{node.name} is not a floating-point cast")
        return node.args[0]
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if not _slices_rows_only(index, _value(source).dim()):
            raise _Skip(f"{node.name} indexes the vocabulary dimension or uses tensors")
        site.row_ops.append(index)
        return source
    if _is_function(node, (operator.mul, torch.mul, operator.truediv, torch.div)) or \
            _is_method(node, ("mul", "div")):
        softcap_source = _softcap_source(node)
        if softcap_source is not None:
            if site.softcap is not None:
                raise _Skip("two softcaps")
            if site.logit_scale != 1.0 or site.bias is not None:
                raise _Skip("the logits are scaled or shifted after the softcap")
            site.softcap, tanh, inner = softcap_source
            site.chain += [tanh, inner]
            return inner.args[0]
        lhs, rhs = node.args[0], node.args[1]
        divide = node.target in (operator.truediv, torch.div, "div")
        if isinstance(lhs, Node) and _is_number(rhs):
            factor, source = float(rhs), lhs
        elif isinstance(rhs, Node) and _is_number(lhs) and not divide:
            factor, source = float(lhs), rhs
        else:
            raise _Skip(f"{node.name} multiplies the logits by a tensor or a "
                        "non-constant")
        if divide:
            if factor == 0:
                raise _Skip("logits divided by zero")
            factor = 1.0 / factor
        if site.bias is not None:
            raise _Skip("a bias is added after the scale")
        site.logit_scale *= factor
        return source
    if _is_function(node, (operator.add, torch.add)) or _is_method(node, ("add",)):
        lhs, rhs = node.args[0], node.args[1]
        for source, bias in ((lhs, rhs), (rhs, lhs)):
            if isinstance(bias, Node) and isinstance(source, Node):
                bias_value = _value(bias)
                if bias_value is not None and bias_value.dim() == 1 and \
                        bias_value.shape[0] == value.shape[-1]:
                    if site.bias is not None:
                        raise _Skip("two biases")
                    site.bias = bias
                    return source
        raise _Skip(f"{node.name} adds something other than a (V,) bias")
    if _is_method(node, ("redistribute",)):
        # A DTensor's layout changes, not its values; whether the layout of
        # the operands is served is decided by the distributed check.
        return node.args[0]
    if node.op == "placeholder":
        raise _Skip(f"the logits ({node.name}) are an input of this graph: the linear ran "
                    "in an earlier graph (a graph break lies between it and the loss)")
    raise _Skip(f"logits pass through {_describe(node)}, which the rewrite does not "
                "see through")


def _softcap_source(node: Node) -> tuple[float, Node, Node] | None:
    """``cap * tanh(u / cap)`` in any operand order: (cap, the tanh, the u / cap)."""
    if node.target not in (operator.mul, torch.mul, "mul"):
        return None
    lhs, rhs = node.args[0], node.args[1]
    tanh, cap = (lhs, rhs) if isinstance(lhs, Node) else (rhs, lhs)
    if not _is_number(cap) or not isinstance(tanh, Node):
        return None
    if not (_is_function(tanh, (torch.tanh, F.tanh)) or _is_method(tanh, ("tanh",))):
        return None
    inner = tanh.args[0]
    if not isinstance(inner, Node) or len(tanh.users) != 1 or len(inner.users) != 1:
        return None
    if inner.target in (operator.truediv, torch.div, "div") and _is_number(inner.args[1]):
        divisor = float(inner.args[1])
    elif inner.target in (operator.mul, torch.mul, "mul") and _is_number(inner.args[1]):
        divisor = 1.0 / float(inner.args[1]) if inner.args[1] else math.inf
    else:
        return None
    if not math.isclose(divisor, float(cap), rel_tol=1e-6) or float(cap) <= 0:
        return None
    return float(cap), tanh, inner


def _check_users(site: Site) -> None:
    """Every chain node must feed only the next one, a logsumexp or the output."""
    chain = site.chain
    next_of = {chain[i]: chain[i - 1] for i in range(1, len(chain))}
    next_of[chain[0]] = site.anchor
    slices_seen = 0
    slices_at = {}
    for node in reversed(chain):
        if node.op == "call_function" and node.target is operator.getitem:
            slices_seen += 1
        slices_at[node] = slices_seen
    total_slices = sum(1 for op in site.row_ops if op != FLATTEN_ROWS)
    for node in chain:
        for user in node.users:
            if user is next_of[node] or user in chain:
                continue
            if user.op == "output":
                site.escaping.append(node)
                continue
            if _is_logsumexp_of_rows(user, node):
                if slices_at[node] != total_slices:
                    raise _Skip(f"{user.name} takes logsumexp over other rows than the "
                                "loss")
                if _absorbed_after(site, node):
                    raise _Skip(f"{user.name} takes logsumexp before the scale/softcap")
                site.logsumexp_users.append(user)
                continue
            if _anchor_form(user) or _is_log_softmax(user):
                raise _Skip(f"the same logits also feed a second loss ({_describe(user)})")
            raise _Skip(f"the logits are also used by {_describe(user)}, which needs "
                        "the full matrix")


def _absorbed_after(site: Site, node: Node) -> bool:
    """True if a bias, scale or softcap is applied between ``node`` and the anchor."""
    for step in site.chain:
        if step is node:
            return False
        if _is_function(step, (operator.mul, torch.mul, operator.truediv, torch.div,
                               operator.add, torch.add)) or \
                _is_method(step, ("mul", "div", "add")):
            return True
    return False


def _is_logsumexp_of_rows(user: Node, source: Node) -> bool:
    if not (_is_function(user, LOGSUMEXP_TARGETS) or _is_method(user, ("logsumexp",))):
        return False
    args = list(user.args) + [None]
    dim = user.kwargs.get("dim", args[1])
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return args[0] is source and _is_last_dim(dim, _value(source).dim())


def _is_log_softmax(node: Node) -> bool:
    return _is_function(node, LOG_SOFTMAX_TARGETS) or _is_method(node, ("log_softmax",))


def _unsqueezed_last(index: Node) -> Node | None:
    """``y`` if ``index`` is ``y.unsqueeze(-1)`` or ``y[..., None]``."""
    value = _value(index)
    if value is None or value.dim() < 1:
        return None
    if _is_method(index, ("unsqueeze",)) or _is_function(index, (torch.unsqueeze,)):
        dim = index.kwargs.get("dim", index.args[1] if len(index.args) > 1 else None)
        if _is_last_dim(dim, value.dim()):
            return index.args[0]
    if index.op == "call_function" and index.target is operator.getitem:
        if index.args[1] in ((Ellipsis, None),):
            return index.args[0]
    return None


def _transpose_source(node: Node) -> Node | None:
    """``W`` if ``node`` is ``W.t()``, ``W.T``, ``W.mT`` or ``W.transpose(0, 1)``."""
    if _is_method(node, ("t",)) or _is_function(node, (torch.t,)):
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and \
            node.args[1] in ("T", "mT"):
        return node.args[0]
    if _is_method(node, ("transpose",)) or _is_function(node, (torch.transpose,)):
        dims = tuple(d % 2 for d in node.args[1:3] if isinstance(d, int))
        if sorted(dims) == [0, 1]:
            return node.args[0]
    return None


def _slices_rows_only(index: Any, ndim: int) -> bool:
    """True if ``index`` only slices leading dimensions (the last stays whole)."""
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is None or i is Ellipsis or isinstance(i, (Node, int, torch.SymInt))
           for i in index):
        return False
    if not all(isinstance(i, slice) for i in index):
        return False
    if len(index) < ndim:
        return True
    return len(index) == ndim and index[-1] == slice(None)


def _is_last_dim(dim: Any, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (-1, ndim - 1)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _constant(x: Any, kind: Any, name: str) -> Any:
    if isinstance(x, Node) or not isinstance(x, kind):
        raise _Skip(f"{name} is not a constant ({x!r})")
    return x


def _optional_node(x: Any, name: str) -> Node | None:
    if x is None or isinstance(x, Node):
        return x
    raise _Skip(f"{name} is not a tensor in the graph")


def _is_function(node: Node, targets: tuple) -> bool:
    return node.op == "call_function" and node.target in targets


def _is_method(node: Node, names: tuple[str, ...]) -> bool:
    return node.op == "call_method" and node.target in names


def _value(node: Any) -> torch.Tensor | None:
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _describe(node: Node) -> str:
    if node.op == "output":
        return "the graph output"
    target = node.target if isinstance(node.target, str) else \
        getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"
