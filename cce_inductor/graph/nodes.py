"""The vocabulary of Dynamo graphs: which callables a node may call, and its metadata.

Dynamo records the same computation under several spellings (``F.linear`` or
``torch._C._nn.linear``, ``x.view`` or ``torch.reshape``, ``getattr(w, "T")``
or ``numpy_T(w)`` depending on the release).  The matcher asks these
predicates what a node *is*, and reads what it *holds* from its example value
(shape, strides, dtype), so that no other module spells a target.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node

LINEAR = (torch._C._nn.linear, F.linear)
MATMUL = (operator.matmul, torch.matmul, torch.mm, torch.bmm)
ADDMM = (torch.addmm,)
EINSUM = (torch.einsum, torch.functional.einsum)
CROSS_ENTROPY = (F.cross_entropy,)
NLL_LOSS = (F.nll_loss,)
LOG_SOFTMAX = (F.log_softmax, torch.log_softmax, torch.special.log_softmax)
SOFTMAX = (F.softmax, torch.softmax, torch.special.softmax)
LOGSUMEXP = (torch.logsumexp, torch.special.logsumexp)
GATHER = (torch.gather, torch.take_along_dim)
ARGMAX = (torch.argmax,)
SUM = (torch.sum,)
EXP = (torch.exp,)
TANH = (torch.tanh, F.tanh)
MUL = (operator.mul, torch.mul, operator.imul)
DIV = (operator.truediv, torch.div, torch.true_divide, operator.itruediv)
ADD = (operator.add, torch.add, operator.iadd)
SUB = (operator.sub, torch.sub)
INPLACE_OPERATORS = (operator.imul, operator.itruediv, operator.iadd, operator.isub)
NEG = (operator.neg, torch.neg)

# Reshapes keep rows in row-major order; how they are spelled does not matter,
# only the shapes before and after.
RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                   "contiguous", "view_as", "reshape_as", "clone")
RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                     torch.clone, torch.unflatten)
PERMUTE_METHODS = ("permute", "transpose", "swapaxes", "swapdims", "movedim", "t")
PERMUTE_FUNCTIONS = (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims,
                     torch.movedim, torch.t)
# Calls that cut a tensor into pieces along one dimension (a tuple of views).
SPLIT_METHODS = ("split", "chunk", "unbind")
SPLIT_FUNCTIONS = (torch.split, torch.chunk, torch.unbind, torch.functional.split)
CAST_METHODS = ("float", "to", "type", "half", "bfloat16", "double", "type_as")
# In-place scalings of the logits (GRPO's ``logits.div_(temperature)``).
INPLACE_SCALE_METHODS = ("div_", "mul_")


def is_function(node: Any, targets: tuple) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, names: tuple[str, ...]) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def is_call(node: Any, functions: tuple, methods: tuple[str, ...]) -> bool:
    """``node`` calls one of ``functions``, or a tensor method named in ``methods``."""
    return is_function(node, functions) or is_method(node, methods)


def is_getitem(node: Any) -> bool:
    return is_function(node, (operator.getitem,))


def is_log_softmax(node: Any) -> bool:
    return is_call(node, LOG_SOFTMAX, ("log_softmax",))


def is_softmax(node: Any) -> bool:
    return is_call(node, SOFTMAX, ("softmax",))


def is_logsumexp(node: Any) -> bool:
    return is_call(node, LOGSUMEXP, ("logsumexp",))


def is_attribute(node: Any, names: tuple[str, ...]) -> bool:
    """``getattr(x, name)`` as Dynamo records tensor properties such as ``W.T``."""
    return isinstance(node, Node) and node.op == "call_function" and \
        node.target is getattr and node.args[1] in names


def transpose_source(node: Any) -> Node | None:
    """``W`` if ``node`` is the transpose of a 2-D ``W`` in any spelling.

    ``W.t()``, ``W.T`` (``getattr`` or, from torch 2.14, ``numpy_T``),
    ``W.mT``, ``W.transpose(0, 1)``, ``W.permute(1, 0)``, ``W.swapaxes(...)``.
    """
    if not isinstance(node, Node) or not isinstance(node.args[0] if node.args else None,
                                                     Node):
        return None
    source = node.args[0]
    source_value = value(source)
    if source_value is None or source_value.dim() != 2:
        return None
    name = call_name(node)
    if is_attribute(node, ("T", "mT")) or name in ("t", "numpy_T"):
        return source
    if is_call(node, PERMUTE_FUNCTIONS, PERMUTE_METHODS):
        permutation = permutation_of(node, 2)
        return source if permutation == (1, 0) else None
    return None


def permutation_of(node: Node, ndim: int) -> tuple[int, ...] | None:
    """The dims of the input that each output dim comes from, for a permute-like node."""
    name = call_name(node)
    args = [a for a in node.args[1:]]
    kwargs = node.kwargs
    dims = list(range(ndim))
    try:
        if name == "t":
            return tuple(reversed(dims)) if ndim == 2 else None
        if name == "permute":
            order = kwargs.get("dims", args[0] if len(args) == 1 else args)
            order = tuple(int(d) % ndim for d in order)
            return order if sorted(order) == dims else None
        if name in ("transpose", "swapaxes", "swapdims"):
            a, b = (int(d) % ndim for d in args[:2])
            dims[a], dims[b] = dims[b], dims[a]
            return tuple(dims)
        if name == "movedim":
            source, destination = int(args[0]) % ndim, int(args[1]) % ndim
            dims.remove(source)
            dims.insert(destination, source)
            return tuple(dims)
    except (TypeError, ValueError, IndexError):
        return None
    return None


def dim_argument(node: Node, position: int, default: Any = None) -> Any:
    """The ``dim`` argument of a reduction, positional or keyword; one-element
    lists become their element."""
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position
                          else default)
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return dim


def keepdim_argument(node: Node, position: int) -> Any:
    return node.kwargs.get("keepdim", node.args[position] if len(node.args) > position
                           else False)


def is_last_dim(dim: Any, ndim: int) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and ndim > 0 and \
        dim % ndim == ndim - 1 and -ndim <= dim < ndim


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def call_name(node: Node) -> str:
    """The name of what ``node`` calls: a method's name or a function's ``__name__``."""
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def example(node: Any) -> Any:
    """The example value Dynamo recorded for ``node`` (a fake tensor, a tuple of
    them for ``split``, ...), or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def value(node: Any) -> torch.Tensor | None:
    """The example (fake) tensor Dynamo recorded for ``node``, if any."""
    found = example(node)
    return found if isinstance(found, torch.Tensor) else None


def describe(node: Node) -> str:
    """``name (target)`` for messages."""
    if node.op == "output":
        return "the graph output"
    return f"{node.name} ({call_name(node)})"
