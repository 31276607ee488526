"""What is matched: the consumers of logits that the op can serve.

Each recognizer looks at one node and, if it is a consumer, returns a
``Found``: the consumer record, the node it reads the logits (or log-probs, or
probabilities) from, and what that input must be.  The loss consumers carry
the options of the loss.

| consumer                                             | kind        |
|------------------------------------------------------|-------------|
| ``F.cross_entropy(z, y, ...)`` (class dim last or 1) | loss        |
| ``F.nll_loss(log_softmax(z), y, ...)``               | loss        |
| ``log_softmax(z).gather(-1, y[..., None])``          | log_prob    |
| ``z.gather(-1, y[..., None])`` (``take_along_dim``)  | logit       |
| ``z.logsumexp(-1)``                                  | lse         |
| ``(softmax(z) * log_softmax(z)).sum(-1)``            | neg_entropy |
| ``torch.special.entr(softmax(z)).sum(-1)``           | entropy     |
| ``(softmax(z) * z).sum(-1)``                         | mean_logit  |
| ``z.argmax(-1)``                                     | argmax      |

``walk`` (steps.py) then takes each input back to its linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

from . import nodes as N
from .site import NO_IGNORE_INDEX, Consumer
from .steps import ANY, LOG_PROBS, LOGITS, LOSS_INPUT, PROBS, Skip

# Consumers that are a loss on their own: reported even when left alone.
LOSS_FORMS = ("cross_entropy", "nll_loss", "gather")


@dataclass
class Found:
    """A consumer, the inputs to walk back from, and the options of a loss."""

    consumer: Consumer
    form: str
    inputs: list[tuple[Node, str]]  # (input node, space it must be in)
    internal: list[Node] = field(default_factory=list)  # nodes between inputs and consumer
    options: dict = field(default_factory=dict)  # Site fields of a loss


def recognize(node: Node) -> Found | None:
    """The consumer ``node`` is, or None.  Raises ``Skip`` for a loss the op
    cannot serve as written (probability targets, say)."""
    if node.op not in ("call_function", "call_method"):
        return None
    for recognizer in (_cross_entropy, _nll_loss, _gather, _logsumexp, _entropy,
                       _argmax):
        found = recognizer(node)
        if found is not None:
            return found
    return None


def is_loss(node: Node) -> bool:
    """Whether ``node`` is a loss whose being left alone is worth reporting."""
    return N.is_function(node, N.CROSS_ENTROPY + N.NLL_LOSS) or \
        (_is_gather(node) and N.is_log_softmax(node.args[0]))


# ---- losses -----------------------------------------------------------------

_LOSS_SIGNATURE = ("input", "target", "weight", "size_average", "ignore_index", "reduce",
                   "reduction", "label_smoothing")


def _cross_entropy(node: Node) -> Found | None:
    if not N.is_function(node, N.CROSS_ENTROPY):
        return None
    return _loss(node, "cross_entropy", LOSS_INPUT)


def _nll_loss(node: Node) -> Found | None:
    if not N.is_function(node, N.NLL_LOSS):
        return None
    return _loss(node, "nll_loss", LOG_PROBS)


def _loss(node: Node, form: str, space: str) -> Found:
    bound = dict(zip(_LOSS_SIGNATURE, node.args))
    bound.update(node.kwargs)
    consumer = Consumer(node, "loss")
    found = Found(consumer, form, [])
    if bound.get("size_average") is not None or bound.get("reduce") is not None:
        raise Skip("the deprecated size_average/reduce arguments are used")
    logits, targets = bound.get("input"), bound.get("target")
    if not isinstance(logits, Node) or not isinstance(targets, Node):
        raise Skip("input or target is not a tensor in the graph")
    target_value, input_value = N.value(targets), N.value(logits)
    if target_value is None or target_value.dtype.is_floating_point:
        raise Skip("targets are probabilities (soft labels), not class indices")
    if input_value is None or input_value.dim() < 2:
        raise Skip("the loss input is not a batch of rows")
    if input_value.dim() > 2:
        logits = _class_dim_last(found, logits, target_value)
    smoothing = _constant(bound.get("label_smoothing", 0.0), (int, float), "label_smoothing")
    if smoothing and form == "nll_loss":
        raise Skip("label smoothing on nll_loss")
    reduction = _constant(bound.get("reduction", "mean"), str, "reduction")
    if reduction not in ("mean", "sum", "none"):
        raise Skip(f"unknown reduction {reduction!r}")
    weight = bound.get("weight")
    if weight is not None and not isinstance(weight, Node):
        raise Skip("class weight is not a tensor in the graph")
    found.options = dict(
        targets=targets, weight=weight,
        ignore_index=_constant(bound.get("ignore_index", -100), int, "ignore_index"),
        reduction=reduction, label_smoothing=float(smoothing),
        logits_dtype=input_value.dtype)
    found.inputs = [(logits, space)]
    return found


def _class_dim_last(found: Found, node: Node, target_value: torch.Tensor) -> Node:
    """The logits with the vocabulary last, for a loss whose class dimension is 1.

    Served when the loss input is a permutation that moved the vocabulary of
    its source to dimension 1 and kept the other dimensions in order: then
    the loss is the same as on the source's rows, with the targets' layout.
    """
    source = node.args[0] if node.args else None
    source_value = N.value(source)
    if not N.is_call(node, N.PERMUTE_FUNCTIONS, N.PERMUTE_METHODS) or source_value is None:
        raise Skip("the loss input's class dimension 1 is not the logits' vocabulary "
                   "dimension moved there")
    ndim = source_value.dim()
    permutation = N.permutation_of(node, ndim)
    expected = (0, ndim - 1, *range(1, ndim - 1))
    if permutation != expected:
        raise Skip(f"{node.name} permutes the logits {permutation}, not only the "
                   "vocabulary to dimension 1")
    if tuple(target_value.shape) != tuple(source_value.shape[:-1]):
        raise Skip("the targets' shape does not match the logits' rows")
    found.internal.append(node)
    return source


def _is_gather(node: Node) -> bool:
    return N.is_call(node, N.GATHER, ("gather", "take_along_dim"))


def _gather(node: Node) -> Found | None:
    if not _is_gather(node):
        return None
    args = list(node.args) + [None] * 3
    name = N.call_name(node)
    if name == "take_along_dim":
        source, index, dim = args[0], node.kwargs.get("indices", args[1]), \
            node.kwargs.get("dim", args[2])
    else:
        source, dim, index = args[0], node.kwargs.get("dim", args[1]), \
            node.kwargs.get("index", args[2])
    internal: list[Node] = []
    unbroadcast = _through_broadcast(source, index)
    if unbroadcast is not None:
        source, index, internal = unbroadcast
    source_value, index_value = N.value(source), N.value(index)
    if source_value is None or index_value is None:
        return None
    # Gathers elsewhere in a model (positions, experts) are not consumers; a
    # gather of a log-softmax that the op cannot serve is a loss left alone.
    of_log_probs = N.is_log_softmax(source)
    if not N.is_last_dim(dim, source_value.dim()):
        if of_log_probs:
            raise Skip(f"gather over dim {dim}, not the vocabulary (last) dimension")
        return None
    if index_value.dtype.is_floating_point or \
            tuple(index_value.shape) != (*source_value.shape[:-1], 1):
        if of_log_probs:
            raise Skip("the gather index does not pick one class per row")
        return None
    consumer = Consumer(node, "log_prob", index=index)
    found = Found(consumer, "gather", [(source, ANY)], internal)
    found.options = dict(targets=index, ignore_index=NO_IGNORE_INDEX, reduction="none",
                         logits_dtype=source_value.dtype)
    return found


def _through_broadcast(source: Node, index: Node) -> tuple[Node, Node, list[Node]] | None:
    """``Categorical.log_prob``'s gather, with the operands it broadcast.

    ``value, lp = broadcast_tensors(y[..., None], lp); lp.gather(-1,
    value[..., :1])`` is ``lp.gather(-1, y[..., None])`` when the broadcast
    leaves ``lp`` as it is.  Returns the unbroadcast source and index, and the
    nodes in between (the last one reads the source), or None.
    """
    if not (N.is_getitem(source) and N.is_getitem(index) and
            N.is_getitem(index.args[0])):
        return None
    broadcast, piece = source.args
    index_piece, wanted = index.args
    if not N.is_function(broadcast, (torch.broadcast_tensors,
                                     torch.functional.broadcast_tensors)) or \
            index_piece.args[0] is not broadcast or not isinstance(piece, int) or \
            not isinstance(index_piece.args[1], int):
        return None
    operands = broadcast.args
    original, targets = operands[piece], operands[index_piece.args[1]]
    shapes = [N.value(n) for n in (source, original, index, targets)]
    if any(v is None for v in shapes) or shapes[0].shape != shapes[1].shape or \
            shapes[2].shape != shapes[3].shape or \
            wanted not in ((Ellipsis, slice(None, 1, None)), (Ellipsis, slice(0, 1, None))):
        return None
    return original, targets, [index, index_piece, source, broadcast]


# ---- per-row statistics -------------------------------------------------------

def _logsumexp(node: Node) -> Found | None:
    if not N.is_logsumexp(node) or not _reduces_last(node, 1):
        return None
    if all(_is_handwritten_log_softmax(user, node) for user in node.users):
        return None  # part of z - logsumexp(z): the log-softmax, not a consumer
    consumer = Consumer(node, "lse", keepdim=bool(N.keepdim_argument(node, 2)))
    return Found(consumer, "logsumexp", [(node.args[0], LOGITS)])


def _is_handwritten_log_softmax(user: Node, lse: Node) -> bool:
    return N.is_call(user, N.SUB, ("sub",)) and len(user.args) == 2 and \
        user.args[1] is lse and user.args[0] is lse.args[0]


def _entropy(node: Node) -> Found | None:
    """``sum(-1)`` of ``p * log p``, ``p * z`` or ``entr(p)``."""
    if not (N.is_call(node, N.SUM, ("sum",)) and _reduces_last(node, 1)):
        return None
    if node.kwargs.get("dtype") is not None:
        return None
    keepdim = bool(N.keepdim_argument(node, 2))
    product = node.args[0]
    if N.is_call(product, (torch.special.entr,), ()):
        found = Found(Consumer(node, "entropy", keepdim), "entropy",
                      [(product.args[0], PROBS)], [product])
        return found
    if not N.is_call(product, N.MUL, ("mul",)) or len(product.args) != 2 or \
            not all(isinstance(a, Node) for a in product.args):
        return None
    lhs, rhs = product.args
    for probs, other in ((lhs, rhs), (rhs, lhs)):
        if _looks_like_probabilities(probs):
            # neg_entropy or mean_logit, decided by what the walk finds ``other`` is
            return Found(Consumer(node, "neg_entropy", keepdim), "entropy",
                         [(probs, PROBS), (other, ANY)], [product])
    return None


def _looks_like_probabilities(node: Node) -> bool:
    """A softmax or exp of log-probabilities, possibly cast (decided by the walk)."""
    while N.is_call(node, (), N.CAST_METHODS):
        node = node.args[0]
    return N.is_softmax(node) or N.is_call(node, N.EXP, ("exp",))


def _argmax(node: Node) -> Found | None:
    if not N.is_call(node, N.ARGMAX, ("argmax",)) or not _reduces_last(node, 1):
        return None
    source_value = N.value(node.args[0])
    if source_value is None:
        return None
    consumer = Consumer(node, "argmax", bool(N.keepdim_argument(node, 2)),
                        dtype=source_value.dtype)
    return Found(consumer, "argmax", [(node.args[0], ANY)])


def _reduces_last(node: Node, position: int) -> bool:
    source_value = N.value(node.args[0] if node.args else node.kwargs.get("input"))
    return source_value is not None and \
        N.is_last_dim(N.dim_argument(node, position), source_value.dim())


def _constant(x, kind, name: str):
    if isinstance(x, Node) or not isinstance(x, kind):
        raise Skip(f"{name} is not a constant ({x!r})")
    return x
