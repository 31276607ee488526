"""What lies between the linear and a consumer: each step decided by its metadata.

``walk(node, space)`` follows a consumer's input back to the linear that made
the logits.  Every node on the way is one of:

* a row step: it keeps the vocabulary whole as the last dimension and maps
  rows in a way the rewrite can replay on the hidden states (any index,
  reshape or permutation of the leading dimensions, in any spelling);
* a cast;
* an elementwise step the op computes itself: a constant scale (including an
  in-place ``div_``), a bias of any shape that broadcasts over rows, a softcap;
* a slice of the vocabulary, which is a slice of the classifier's rows;
* a normalization (``log_softmax``, ``softmax``, ``z - logsumexp(z)``,
  ``exp`` of log-probabilities), crossed at most once, which moves the walk
  from log-probability or probability space to logits.

Anything else ends the walk with ``Skip`` and a reason.  Whether a step is
absorbed is read from the shapes of its input and output, never from how the
index or reshape was spelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node

from . import nodes as N
from .site import RowIndex, RowOp, RowPermute, RowReshape

LOGITS, LOG_PROBS, PROBS, ANY = "logits", "log_probs", "probs", "any"
# A cross-entropy's input: logits, or log-probabilities, whose log-softmax is
# themselves (``cross_entropy(log_softmax(z)) == cross_entropy(z)``).
LOSS_INPUT = "loss_input"


class Skip(Exception):
    """Raised while matching; its message becomes ``Site.skip_reason``."""


@dataclass
class Walk:
    """Everything between one consumer's input and the linear."""

    space: str  # what the consumer read: logits, log_probs or probs
    chain: list[Node] = field(default_factory=list)
    row_ops: list[RowOp] = field(default_factory=list)  # in program order once done
    logit_scale: float = 1.0
    softcap: float | None = None
    bias: Node | None = None
    bias_is_sliced: bool = False
    vocab_slice: tuple[int, int] | None = None
    inplace: list[Node] = field(default_factory=list)
    normalized: bool = False  # a normalization was crossed
    linear: Node | None = None
    hidden: Node | None = None
    classifier: Node | None = None
    classifier_is_transposed: bool = False
    classifier_batch_dims: int = 0
    compute_dtype: torch.dtype | None = None
    # The node whose value is the final logits (after bias, scale and softcap)
    # with only row steps and casts after it, or None: where the graph returns
    # it anyway, the op can read it instead of recomputing it.
    final_logits: Node | None = None

    def rows_key(self) -> tuple:
        """Equal for two walks whose logits have the same rows in the same order."""
        key: list[Any] = []
        for op in self.row_ops:
            if isinstance(op, RowReshape):
                if key and isinstance(key[-1], RowReshape):
                    key.pop()
                key.append(op)
            else:
                key.append(op)
        while key and isinstance(key[-1], RowReshape):
            key.pop()
        return tuple((type(op).__name__, _hashable(getattr(op, "index", None)),
                      getattr(op, "lead", None), getattr(op, "dims", None)) for op in key)

    def key(self, with_affine: bool = True) -> tuple:
        """What must agree for two consumers to share one op call."""
        base = (self.linear, self.hidden, self.classifier, self.rows_key(), self.bias,
                self.vocab_slice)
        return (*base, self.logit_scale, self.softcap) if with_affine else base


def walk(start: Node, space: str, reader: Node) -> Walk:
    """Follow ``start`` (read by ``reader``) back to its linear.

    ``space`` is what the reader expects: ``LOGITS`` (no normalization may be
    crossed), ``LOSS_INPUT`` (one may be), ``LOG_PROBS`` or ``PROBS`` (one
    must be), or ``ANY`` (found out on the way).
    """
    state = Walk(space=space)
    node, user = start, reader
    final_found = False
    while True:
        if N.value(node) is None:
            raise Skip(f"no shape information for {node.name}")
        state.chain.append(node)
        affine, rows = _affine(state), len(state.row_ops)
        _absorb_inplace(state, node, user)
        if _as_linear(state, node):
            if not final_found:
                state.final_logits = node
            break
        user, node = node, _step(state, node)
        if not final_found and _affine(state) != affine:
            state.final_logits, final_found = user, True
        elif final_found and len(state.row_ops) != rows:
            state.final_logits = None  # rows change below it: not the op's rows
    if state.space in (LOG_PROBS, PROBS) and not state.normalized:
        raise Skip("the consumer reads log-probabilities, but no log_softmax lies "
                   "between it and the linear")
    if state.space in (ANY, LOSS_INPUT):
        state.space = LOGITS
    state.row_ops.reverse()  # collected from the consumer down; replayed upward
    return state


def _tensor_input(node: Node, source: object) -> torch.Tensor:
    """The example tensor ``node`` reads the logits from; a tuple (the pieces of
    a ``split`` or ``chunk``) or a missing value ends the walk."""
    found = N.value(source)
    if found is None:
        raise Skip(f"{node.name} reads a piece of the logits (split or chunk) or a value "
                   "without shape information")
    return found


def _affine(state: Walk) -> tuple:
    return state.logit_scale, state.softcap, state.bias


def _step(state: Walk, node: Node) -> Node:
    """Absorb ``node`` into ``state``; return the node it read the logits from."""
    if _is_normalization(node):
        return _normalization(state, node)
    if N.is_call(node, N.RESHAPE_FUNCTIONS, N.RESHAPE_METHODS):
        return _reshape(state, node)
    if N.is_call(node, N.PERMUTE_FUNCTIONS, N.PERMUTE_METHODS):
        return _permute(state, node)
    if is_inplace(node):
        state.inplace.append(node)
    if N.is_getitem(node) and N.is_call(node.args[0], N.SPLIT_FUNCTIONS, N.SPLIT_METHODS):
        state.chain.append(node.args[0])
        return _index(state, node, *_split_piece(node), piece=True)
    if N.is_getitem(node):
        return _index(state, node, node.args[0], node.args[1])
    if N.is_method(node, ("narrow", "select", "index_select")) or \
            N.is_function(node, (torch.narrow, torch.select, torch.index_select)):
        return _index(state, node, node.args[0], _as_index(node))
    if N.is_call(node, (), N.CAST_METHODS):
        return _cast(state, node)
    if _clamps_only_infinities(node):
        return node.args[0]
    if N.is_method(node, ("redistribute",)):
        # A DTensor's layout changes, not its values; whether the layout is
        # served is decided by the distributed check.
        return node.args[0]
    if node.op == "placeholder":
        raise Skip(f"the logits ({node.name}) are an input of this graph: the linear ran "
                   "in an earlier graph (a graph break lies between it and the loss)")
    if _affine_allowed(state, node):
        source = _softcap(state, node) or _scale(state, node) or _bias(state, node)
        if source is not None:
            return source
    raise Skip(f"logits pass through {N.describe(node)}, which the rewrite does not "
               "see through")


# ---- rows ------------------------------------------------------------------

def _reshape(state: Walk, node: Node) -> Node:
    source = node.args[0]
    out, inp = N.value(node), _tensor_input(node, source)
    if out.dim() < 1 or inp.dim() < 1 or out.shape[-1] != inp.shape[-1] or \
            out.numel() != inp.numel():
        raise Skip(f"{node.name} reshapes the vocabulary dimension")
    if tuple(out.shape) != tuple(inp.shape):
        state.row_ops.append(RowReshape(_lead_sizes(node, out)))
    return source


def _lead_sizes(node: Node, out: torch.Tensor) -> tuple:
    lead = tuple(out.shape[:-1])
    symbolic = [i for i, s in enumerate(lead) if not isinstance(s, int)]
    if len(symbolic) > 1:
        raise Skip(f"{node.name} reshapes rows into several dimensions of symbolic size")
    return tuple(-1 if i in symbolic else int(s) for i, s in enumerate(lead))


def _permute(state: Walk, node: Node) -> Node:
    source = node.args[0]
    ndim = _tensor_input(node, source).dim()
    permutation = N.permutation_of(node, ndim)
    if permutation is None or permutation[-1] != ndim - 1:
        raise Skip(f"{node.name} moves the vocabulary dimension")
    if permutation != tuple(range(ndim)):
        state.row_ops.append(RowPermute(permutation[:-1]))
    return source


def _clamps_only_infinities(node: Node) -> bool:
    """``x.clamp(min=finfo.min)``, as ``Categorical.entropy`` writes it: the same
    value wherever x is finite, and the op's log-probs of finite logits are."""
    if not N.is_call(node, (torch.clamp, torch.clip, torch.clamp_min),
                     ("clamp", "clip", "clamp_min")):
        return False
    name = N.call_name(node)
    args = list(node.args[1:]) + [None, None]
    low = node.kwargs.get("min", args[0])
    high = None if name == "clamp_min" else node.kwargs.get("max", args[1])
    value = N.value(node)
    return high is None and isinstance(low, (int, float)) and value is not None and \
        value.dtype.is_floating_point and low <= torch.finfo(value.dtype).min


def _split_piece(node: Node) -> tuple[Node, tuple]:
    """``pieces[i]`` of ``pieces = x.split(...)`` (or ``chunk``, ``unbind``) as
    ``(x, index)`` with ``x[index]`` the same rows: TRL's chunked entropy,
    say, which takes the entropy of a block of rows at a time."""
    pieces_node, i = node.args
    name = N.call_name(pieces_node)
    source = pieces_node.args[0]
    inp, pieces = _tensor_input(node, source), N.example(pieces_node)
    default_at = 1 if name == "unbind" else 2
    dim = pieces_node.kwargs.get("dim", pieces_node.args[default_at]
                                 if len(pieces_node.args) > default_at else 0)
    if not isinstance(i, int) or not isinstance(dim, int) or \
            not isinstance(pieces, (tuple, list)):
        raise Skip(f"{node.name} takes a piece of the logits that is not a constant one")
    dim %= inp.dim()
    if dim == inp.dim() - 1:
        raise Skip(f"{pieces_node.name} splits the vocabulary dimension")
    if name == "unbind":
        return source, (slice(None),) * dim + (i,)
    start = sum(piece.shape[dim] for piece in pieces[:i])
    length = pieces[i].shape[dim]
    if not isinstance(start, int) or not isinstance(length, int):
        raise Skip(f"{pieces_node.name} cuts the rows into pieces of symbolic size")
    return source, (slice(None),) * dim + (slice(start, start + length),)


def _as_index(node: Node) -> tuple:
    """``narrow``/``select``/``index_select`` as the equivalent getitem index."""
    name = N.call_name(node)
    ndim = _tensor_input(node, node.args[0]).dim()
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not isinstance(dim, int):
        raise Skip(f"{node.name} takes a dimension that is not a constant")
    dim %= ndim
    args = list(node.args[2:])
    if name == "narrow":
        start, length = (args + [node.kwargs.get("start"), node.kwargs.get("length")])[:2]
        entry: Any = slice(start, start + length) if isinstance(start, int) and \
            isinstance(length, int) else None
    else:
        entry = args[0] if args else node.kwargs.get("index")
    if entry is None:
        raise Skip(f"{node.name} selects with arguments that are not constants")
    return (slice(None),) * dim + (entry,)


def _index(state: Walk, node: Node, source: Node, index: Any, piece: bool = False) -> Node:
    """A getitem: rows selected in any way, and possibly a slice of the vocabulary."""
    inp, out = _tensor_input(node, source), N.value(node)
    entries = _normalize_index(node, index, inp.dim())
    vocab_entry = entries[-1][1] if entries and entries[-1][0] == inp.dim() - 1 else None
    if vocab_entry is not None and not isinstance(vocab_entry, slice):
        raise Skip(f"{node.name} indexes the vocabulary dimension")
    if out.dim() < 1 or (vocab_entry is None and out.shape[-1] != inp.shape[-1]):
        raise Skip(f"{node.name} indexes the vocabulary dimension")
    rows = tuple(entry for _, entry in entries[:-1]) if vocab_entry is not None else \
        tuple(entry for _, entry in entries)
    if vocab_entry is not None and not _whole(vocab_entry, inp.shape[-1]):
        _slice_vocabulary(state, node, vocab_entry, int(inp.shape[-1]))
    if any(e is not None and e != slice(None) for e in rows) or \
            sum(e is None for e in rows):
        lead = tuple(inp.shape[:-1])
        plain = all(isinstance(s, int) for s in lead)
        state.row_ops.append(RowIndex(rows, lead if plain else None, piece))
    return source


def _normalize_index(node: Node, index: Any, ndim: int) -> list[tuple[int, Any]]:
    """The index as (input dimension it starts at, entry) pairs, Ellipsis expanded.

    ``None`` entries consume no dimension (and carry the dimension they stand
    before); a boolean mask consumes as many as it has.
    """
    entries = index if isinstance(index, tuple) else (index,)
    consumed = [_dims_consumed(node, e) for e in entries]
    if sum(e is Ellipsis for e in entries) > 1:
        raise Skip(f"{node.name} has two Ellipses")
    expanded: list[Any] = []
    for entry in entries:
        if entry is Ellipsis:
            expanded += [slice(None)] * (ndim - sum(consumed))
        else:
            expanded.append(entry)
    result, dim = [], 0
    for entry in expanded:
        result.append((dim, entry))
        dim += _dims_consumed(node, entry)
    if dim > ndim:
        raise Skip(f"{node.name} indexes more dimensions than the logits have")
    return result


def _dims_consumed(node: Node, entry: Any) -> int:
    if entry is None or entry is Ellipsis:
        return 0
    if isinstance(entry, (int, slice, torch.SymInt)) and not isinstance(entry, bool):
        return 1
    if isinstance(entry, Node):
        found = N.value(entry)
        if found is None:
            if isinstance(entry.meta.get("example_value"), (int, torch.SymInt)):
                return 1
            raise Skip(f"{node.name} indexes with {entry.name}, whose shape is unknown")
        return found.dim() if found.dtype == torch.bool else 1
    if isinstance(entry, (list, tuple)) and all(isinstance(i, int) for i in entry):
        return 1
    raise Skip(f"{node.name} indexes with {entry!r}")


def _whole(entry: slice, size: int) -> bool:
    return entry.step in (None, 1) and entry.start in (None, 0) and \
        (entry.stop is None or (isinstance(entry.stop, int) and entry.stop >= size))


def _slice_vocabulary(state: Walk, node: Node, entry: slice, size: int) -> None:
    if not all(isinstance(x, (int, type(None))) for x in (entry.start, entry.stop)) or \
            entry.step not in (None, 1):
        raise Skip(f"{node.name} slices the vocabulary with a step or symbolic bounds")
    start, stop, _ = entry.indices(size)
    if state.vocab_slice is not None:  # a later slice, of this slice's result
        outer_start, outer_stop = state.vocab_slice
        start, stop = start + outer_start, start + outer_stop
    state.vocab_slice = (start, max(start, stop))


def _cast(state: Walk, node: Node) -> Node:
    source = node.args[0]
    out, inp = N.value(node), _tensor_input(node, source)
    if not out.dtype.is_floating_point or out.device != inp.device or \
            tuple(out.shape) != tuple(inp.shape):
        raise Skip(f"{node.name} is not a floating-point cast")
    return source


# ---- normalizations ---------------------------------------------------------

def _is_normalization(node: Node) -> bool:
    return N.is_log_softmax(node) or N.is_softmax(node) or _logsumexp_subtracted(node) \
        is not None or N.is_call(node, N.EXP, ("exp",)) or N.is_call(node, (torch.log,),
                                                                    ("log",))


def _logsumexp_subtracted(node: Node) -> Node | None:
    """``x`` if ``node`` is ``x - logsumexp(x, -1, keepdim=True)`` (a log-softmax)."""
    if not N.is_call(node, N.SUB, ("sub",)) or len(node.args) != 2:
        return None
    x, lse = node.args
    if not N.is_logsumexp(lse) or lse.args[0] is not x or not isinstance(x, Node):
        return None
    ndim = N.value(x).dim() if N.value(x) is not None else 0
    if not N.is_last_dim(N.dim_argument(lse, 1), ndim) or not N.keepdim_argument(lse, 2):
        return None
    return x


def _normalization(state: Walk, node: Node) -> Node:
    if N.is_call(node, N.EXP, ("exp",)):  # exp(log-probabilities) are probabilities
        return _switch(state, node, reads=PROBS, gives=LOG_PROBS)
    if N.is_call(node, (torch.log,), ("log",)):
        return _switch(state, node, reads=LOG_PROBS, gives=PROBS)
    handwritten = _logsumexp_subtracted(node)
    if handwritten is not None:
        source, produces = handwritten, LOG_PROBS
    else:
        source = node.args[0] if node.args else node.kwargs.get("input")
        produces = LOG_PROBS if N.is_log_softmax(node) else PROBS
        dim = N.dim_argument(node, 1)
        if not N.is_last_dim(dim, _tensor_input(node, source).dim()):
            raise Skip(f"{N.describe(node)} normalizes over dim {dim}, not the vocabulary")
        dtype = node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise Skip(f"{node.name}'s dtype is not a constant")
    if state.normalized:
        # softmax(log_softmax(z)) is softmax(z), as torch.distributions writes
        # it: a log-softmax only shifts each row, which a normalization undoes.
        if produces != LOG_PROBS or _affine(state) != (1.0, None, None):
            raise Skip(f"{node.name} normalizes the logits a second time")
        if handwritten is not None:
            state.chain.append(node.args[1])
        return source
    if state.logit_scale != 1.0 or state.softcap is not None or state.bias is not None:
        raise Skip("log-probabilities are scaled or shifted before the consumer")
    if handwritten is not None:
        state.chain.append(node.args[1])
    if state.space == LOGITS:
        raise Skip(f"{N.describe(node)} normalizes what is read as raw logits")
    if state.space == LOSS_INPUT:
        if produces != LOG_PROBS:
            raise Skip(f"the loss reads probabilities ({node.name}), not log-probabilities")
    elif state.space == ANY:
        state.space = produces
    elif state.space != produces:
        raise Skip(f"{node.name} gives {produces.replace('_', '-')}, where "
                   f"{state.space.replace('_', '-')} are read")
    state.normalized = True
    return source


def _switch(state: Walk, node: Node, reads: str, gives: str) -> Node:
    """Cross ``exp`` or ``log`` between probabilities and log-probabilities."""
    if state.normalized or state.space not in (reads, ANY):
        raise Skip(f"{N.describe(node)} is applied to logits, not to (log-)probabilities")
    state.space = gives
    return node.args[0]


# ---- affine steps: scale, bias, softcap -------------------------------------

def _affine_allowed(state: Walk, node: Node) -> bool:
    if state.normalized:
        return True  # below the normalization: logits
    if state.space in (ANY, LOSS_INPUT):
        state.space = LOGITS
        return True
    return state.space == LOGITS


def _constant_factor(node: Node) -> tuple[float, Node] | None:
    """(factor, source) for ``x * k``, ``k * x``, ``x / k``, ``-x``, ``x.div_(k)``."""
    if N.is_call(node, N.NEG, ("neg",)):
        return -1.0, node.args[0]
    if not (N.is_call(node, N.MUL + N.DIV, ("mul", "div", "true_divide",
                                           *N.INPLACE_SCALE_METHODS)) and
            len(node.args) == 2):
        return None
    if node.kwargs.get("rounding_mode") is not None:
        return None
    lhs, rhs = node.args
    divide = node.target in N.DIV or node.target in ("div", "true_divide", "div_")
    if isinstance(lhs, Node) and N.is_number(rhs):
        factor, source = float(rhs), lhs
    elif isinstance(rhs, Node) and N.is_number(lhs) and not divide:
        factor, source = float(lhs), rhs
    else:
        return None
    if divide:
        if factor == 0:
            raise Skip("logits divided by zero")
        factor = 1.0 / factor
    if not math.isfinite(factor):
        raise Skip(f"{node.name} scales the logits by a non-finite constant")
    return factor, source


def _scale(state: Walk, node: Node) -> Node | None:
    found = _constant_factor(node)
    if found is None:
        return None
    factor, source = found
    if state.bias is not None:
        raise Skip("a bias is added after the scale")
    state.logit_scale *= factor
    return source


def _bias(state: Walk, node: Node) -> Node | None:
    if not N.is_call(node, N.ADD, ("add",)) or len(node.args) != 2 or \
            node.kwargs.get("alpha", 1) != 1:
        return None
    out = N.value(node)
    for source, bias in (node.args, tuple(reversed(node.args))):
        bias_value = N.value(bias)
        if not isinstance(source, Node) or bias_value is None:
            continue
        source_value = N.value(source)
        if source_value is None or tuple(source_value.shape) != tuple(out.shape):
            continue
        vocab = out.shape[-1]
        if bias_value.dim() <= out.dim() and bias_value.dim() >= 1 and \
                bias_value.shape[-1] == vocab and bias_value.numel() == vocab:
            if state.bias is not None:
                raise Skip("two biases")
            state.bias = bias
            state.bias_is_sliced = state.vocab_slice is not None
            return source
    raise Skip(f"{node.name} adds something other than a bias over the vocabulary")


def _softcap(state: Walk, node: Node) -> Node | None:
    """``cap * tanh(u / cap)`` in any operand order; returns ``u``."""
    if not N.is_call(node, N.MUL, ("mul",)) or len(node.args) != 2:
        return None
    lhs, rhs = node.args
    tanh, cap = (lhs, rhs) if isinstance(lhs, Node) else (rhs, lhs)
    if not N.is_number(cap) or not N.is_call(tanh, N.TANH, ("tanh",)):
        return None
    inner = tanh.args[0]
    if not isinstance(inner, Node) or len(tanh.users) != 1 or len(inner.users) != 1:
        return None
    found = _constant_factor(inner)
    if found is None or float(cap) <= 0 or \
            not math.isclose(found[0] * float(cap), 1.0, rel_tol=1e-6):
        return None
    if state.softcap is not None:
        raise Skip("two softcaps")
    if state.bias is not None:
        raise Skip("the logits are shifted after the softcap")
    # A temperature after the softcap, s * cap * tanh(u / cap), is the softcap
    # |s| cap of s * u: the scale already recorded applies to u as well.
    state.softcap = float(cap) * abs(state.logit_scale)
    state.chain += [tanh, inner]
    return found[1]


def _absorb_inplace(state: Walk, node: Node, reader: Node) -> None:
    """In-place scalings of ``node`` that run before ``reader`` reads it."""
    inplace = [u for u in node.users if u is not reader and is_inplace(u)]
    if not inplace:
        return
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in inplace:
        if order[user] > order.get(reader, len(order)):
            continue
        found = _constant_factor(user)
        if found is None or found[1] is not node:
            raise Skip(f"{N.describe(user)} changes the logits in place")
        if not _affine_allowed(state, user):
            raise Skip(f"{N.describe(user)} scales log-probabilities in place")
        _scale(state, user)
        state.inplace.append(user)


def is_inplace(node: Node) -> bool:
    """A method such as ``div_`` or an augmented assignment such as ``x /= t``."""
    if N.is_function(node, N.INPLACE_OPERATORS):
        return True
    return node.op == "call_method" and node.target.endswith("_") and \
        not node.target.startswith("_")


# ---- the linear --------------------------------------------------------------

def _as_linear(state: Walk, node: Node) -> bool:
    """Fill in the classifier if ``node`` computes ``hidden @ W.T`` in any spelling."""
    if N.is_function(node, N.LINEAR):
        args = list(node.args) + [None] * 3
        hidden = node.kwargs.get("input", args[0])
        weight = node.kwargs.get("weight", args[1])
        bias = node.kwargs.get("bias", args[2])
        if not isinstance(weight, Node) or N.value(weight) is None or \
                N.value(weight).dim() != 2:
            raise Skip("linear weight is not a 2-D tensor")
        if bias is not None:
            _linear_bias(state, bias)
        state.classifier = weight
    elif N.is_call(node, N.MATMUL, ("matmul", "mm", "bmm", "__matmul__")):
        hidden, rhs = node.args[0], node.args[1]
        _transposed_classifier(state, rhs)
    elif N.is_call(node, N.ADDMM, ("addmm",)):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise Skip("addmm with beta or alpha other than 1")
        bias, hidden, rhs = node.args[:3]
        _linear_bias(state, bias)
        _transposed_classifier(state, rhs)
    elif N.is_function(node, N.EINSUM):
        hidden = _einsum(state, node)
    else:
        return False
    hidden_value = N.value(hidden)
    if not isinstance(hidden, Node) or hidden_value is None or hidden_value.dim() < 2:
        raise Skip("the linear's input is not a batch of hidden states")
    if tuple(hidden_value.shape[:-1]) != tuple(N.value(node).shape[:-1]):
        raise Skip("the linear's input broadcasts against its weight")
    state.linear, state.hidden = node, hidden
    state.compute_dtype = N.value(node).dtype
    if torch.float64 == state.compute_dtype:
        raise Skip("float64 logits: the op computes in float32")
    return True


def _linear_bias(state: Walk, bias: Any) -> None:
    bias_value = N.value(bias)
    if bias_value is None or bias_value.dim() < 1 or \
            bias_value.numel() != bias_value.shape[-1]:
        raise Skip("the linear's bias is not a vector over the vocabulary")
    if state.bias is not None:
        raise Skip("two biases")
    state.bias = bias
    state.bias_is_sliced = state.vocab_slice is not None


def _transposed_classifier(state: Walk, rhs: Any) -> None:
    """The classifier of ``hidden @ rhs`` with ``rhs`` (..., D, V)."""
    rhs_value = N.value(rhs)
    if not isinstance(rhs, Node) or rhs_value is None or rhs_value.dim() < 2:
        raise Skip("matmul's right operand is not a classifier matrix")
    batch = rhs_value.dim() - 2
    if any(size != 1 and stride != 0 for size, stride in
           zip(rhs_value.shape[:batch], rhs_value.stride()[:batch])):
        raise Skip("matmul's right operand differs between batches")
    source = N.transpose_source(rhs) if batch == 0 else None
    if source is not None:
        state.classifier = source
    else:
        state.classifier, state.classifier_is_transposed = rhs, True
        state.classifier_batch_dims = batch


def _einsum(state: Walk, node: Node) -> Node:
    """The hidden states of an einsum that is a linear, e.g. ``"btd,vd->btv"``."""
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        raise Skip("einsum that is not two operands with an explicit output")
    inputs, output = equation.replace(" ", "").split("->")
    specs = inputs.split(",")
    for hidden_at, weight_at in ((0, 1), (1, 0)):
        hidden_spec, weight_spec = specs[hidden_at], specs[weight_at]
        if len(weight_spec) != 2 or "." in weight_spec:
            continue
        contracted = [c for c in weight_spec if c in hidden_spec and c not in output]
        kept = [c for c in weight_spec if c not in hidden_spec]
        if len(contracted) != 1 or len(kept) != 1:
            continue
        d, v = contracted[0], kept[0]
        if hidden_spec[-1:] != d or output != hidden_spec[:-1] + v:
            continue
        weight = operands[weight_at]
        state.classifier = weight
        state.classifier_is_transposed = weight_spec == d + v
        return operands[hidden_at]
    raise Skip(f"einsum {equation!r} is not a linear with the vocabulary last")


def _hashable(index: Any) -> Any:
    if index is None:
        return None
    return tuple((e.start, e.stop, e.step) if isinstance(e, slice) else
                 e if isinstance(e, (int, Node, type(None))) else repr(e) for e in index)
