"""What replaces it: one call of the fused op in place of a site's consumers.

For a ``Site`` that ``match`` accepted, the rewrite inserts before the first
consumer

    e = <hidden, with the row operations replayed>.flatten(0, -2)
    c = <classifier, transposed and sliced as the logits were>
    loss, lse, entropy, argmax = fused_linear_cross_entropy(e, c, targets, ...)

(only the outputs the consumers need), points every consumer's users at the
value it stood for, and erases the logits chain where nothing else uses it.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch.fx import Graph, Node

from .. import config
from ..functional import fused_linear_cross_entropy
from ..returned_logits import returned_logits
from .edit import NodeMaker, erase_unused
from .site import Consumer, Site, replay_rows
from .vocab_parallel import rewrite_vocab_parallel

_warned_dropped_logits = False

# The op's per-row outputs each consumer kind is made of.
_NEEDS = {"loss": (), "log_prob": (), "logit": ("lse",), "lse": ("lse",),
          "neg_entropy": ("entropy",), "entropy": ("entropy",),
          "mean_logit": ("lse", "entropy"), "argmax": ("argmax",)}


def rewrite_site(graph: Graph, site: Site) -> None:
    """Replace ``site``'s consumers with one op call; the graph stays valid.

    New nodes are all built before any existing node is touched, so a failure
    while building leaves only unused new nodes behind.
    """
    for node in site.hoist:  # pure inputs the user computed after the first consumer
        site.anchor.prepend(node)
    if site.vocab_parallel is not None:
        return rewrite_vocab_parallel(graph, site)
    with graph.inserting_before(site.anchor):
        new = NodeMaker(graph, site.anchor)
        rows = replay_rows(site.hidden, site.row_ops, new.function, new.method)
        e = _as_matrix(new, rows)
        c, bias = _classifier(new, site)
        if _dtype(e) != site.compute_dtype:  # the linear ran under autocast
            e = new.method("to", e, site.compute_dtype)
            c = new.method("to", c, site.compute_dtype)
        if bias is not None and _dtype(bias) != _dtype(c):
            bias = new.method("to", bias, _dtype(c))
        target = site.target_consumer()
        targets = site.targets
        if targets is not None and _value(targets).dim() != 1:
            targets = new.method("reshape", targets, -1)
        needs = {need for consumer in site.consumers for need in _NEEDS[consumer.kind]}
        argmax = next((c for c in site.consumers if c.kind == "argmax"), None)
        logits = _given_logits(new, site)
        result = new.function(
            fused_linear_cross_entropy, e, c, targets, bias, site.weight,
            site.ignore_index, site.reduction, site.label_smoothing, site.softcap,
            site.logit_scale, "lse" in needs,
            loss_dtype=torch.float32 if target is None or target.kind != "loss" else
            site.logits_dtype,
            return_entropy="entropy" in needs,
            argmax_dtype=None if argmax is None else argmax.dtype, logits=logits)
        outputs = _unpack(new, result, target is not None, needs)
        replacements = [(consumer, _replacement(new, consumer, outputs, rows))
                        for consumer in site.consumers]
    returned = _returned_logits(graph, site)

    # Everything above only added nodes; from here on the graph changes.
    for consumer, value in replacements:
        consumer.node.replace_all_uses_with(value)
    _drop_escaping_logits(graph, site)
    if returned is not None:
        site.linear.replace_all_uses_with(returned)
        graph.erase_node(site.linear)
    dead = [n for c in site.consumers for n in c.node.all_input_nodes]
    for consumer in site.consumers:
        graph.erase_node(consumer.node)
    erase_unused(graph, dead + site.chain + site.inplace)


def _given_logits(new: NodeMaker, site: Site) -> Node | None:
    """The final logits as the op's (N, V) rows, where the graph computes them
    anyway and they can be viewed so without a copy."""
    if site.given_logits is None or _drops_escaping_logits():
        return None
    rows = replay_rows(site.given_logits, site.row_ops, new.function, new.method)
    logits = _as_matrix(new, rows)
    if logits is not site.given_logits and not _value(logits)._is_view():
        erase_unused(new.graph, [logits])
        return None  # a copy of the logits would cost more than the matmul saves
    return logits


def _drops_escaping_logits() -> bool:
    return config.drop_escaping_logits and torch.is_grad_enabled()


def _as_matrix(new: NodeMaker, rows: Node) -> Node:
    ndim = _value(rows).dim()
    if ndim == 1:  # one row: argmax of a single position, say
        return new.method("unsqueeze", rows, 0)
    return rows if ndim == 2 else new.method("flatten", rows, 0, -2)


def _classifier(new: NodeMaker, site: Site) -> tuple[Node, Node | None]:
    c = _classifier_matrix(new, site)
    bias = site.bias
    if bias is not None and _value(bias).dim() != 1:
        bias = new.method("reshape", bias, -1)
    if site.vocab_slice is not None:
        vocab = slice(*site.vocab_slice)
        c = new.function(operator.getitem, c, vocab)
        if bias is not None and site.bias_is_sliced:
            bias = new.function(operator.getitem, bias, vocab)
    return c, bias


def _classifier_matrix(new: NodeMaker, site: Site) -> Node:
    """The (V, D) classifier of the site's linear, over its whole vocabulary."""
    c = site.classifier
    if site.classifier_batch_dims:
        c = new.function(operator.getitem, c, (0,) * site.classifier_batch_dims)
    if site.classifier_is_transposed:
        c = new.method("t", c)
    return c


def _unpack(new: NodeMaker, result: Node, has_loss: bool, needs: set[str]
            ) -> dict[str, Node]:
    names = ["loss"] + [n for n in ("lse", "entropy", "argmax") if n in needs]
    if len(names) == 1:
        return {"loss": result}
    return {name: new.function(operator.getitem, result, i)
            for i, name in enumerate(names) if name != "loss" or has_loss}


def _replacement(new: NodeMaker, consumer: Consumer, out: dict[str, Node],
                 rows: Node) -> Node:
    kind = consumer.kind
    if kind == "loss":
        loss = out["loss"]
        if _value(loss).dim() == 0:
            return loss
        return new.method("view_as", loss, consumer.node.args[1]
                          if len(consumer.node.args) > 1 else consumer.node.kwargs["target"])
    if kind in ("log_prob", "logit"):
        per_row = new.function(operator.neg, out["loss"])  # log p_y = -(lse - z_y)
        if kind == "logit":
            per_row = new.function(operator.add, per_row, out["lse"])
        return new.method("view_as", _cast_like(new, per_row, consumer.node),
                          consumer.index)
    if kind == "neg_entropy":
        per_row = new.function(operator.neg, out["entropy"])
    elif kind == "mean_logit":
        per_row = new.function(operator.sub, out["lse"], out["entropy"])
    else:
        per_row = out[{"lse": "lse", "entropy": "entropy", "argmax": "argmax"}[kind]]
    if consumer.output_rows is not None:  # a selection of the rows the op computed
        index, lead = consumer.output_rows
        per_row = new.function(operator.getitem, new.method("reshape", per_row, lead),
                               index)
    return _cast_like(new, _shaped_like(new, per_row, consumer.node, rows), consumer.node)


def _shaped_like(new: NodeMaker, per_row: Node, like: Node, rows: Node) -> Node:
    """``per_row`` (one entry per row) in ``like``'s shape."""
    shape = tuple(_value(like).shape)
    symbolic = [i for i, s in enumerate(shape) if not isinstance(s, int)]
    if len(symbolic) <= 1:
        return new.method("reshape", per_row,
                          tuple(-1 if i in symbolic else s for i, s in enumerate(shape)))
    lead = tuple(_value(rows).shape[:-1])
    if [str(s) for s in shape[:len(lead)]] != [str(s) for s in lead] or \
            any(s != 1 for s in shape[len(lead):]):
        raise RuntimeError(f"cannot express the shape {shape} of {like.name}")
    lead_sizes = new.function(operator.getitem, new.method("size", rows), slice(None, -1))
    value = new.method("reshape", per_row, lead_sizes)
    for _ in shape[len(lead):]:
        value = new.method("unsqueeze", value, -1)
    return value


def _cast_like(new: NodeMaker, value: Node, like: Node) -> Node:
    dtype = _value(like).dtype
    return value if _dtype(value) == dtype else new.method("to", value, dtype)


def _drop_escaping_logits(graph: Graph, site: Site) -> None:
    """Under the opt-in, return an empty tensor where escaping logits were."""
    global _warned_dropped_logits
    if not site.escaping or not _drops_escaping_logits():
        return
    output = next(n for n in graph.nodes if n.op == "output")
    for logits in site.escaping:
        with graph.inserting_before(output):
            empty = NodeMaker(graph, logits).method("new_empty", logits, (0,))
        output.replace_input_with(logits, empty)
    if not _warned_dropped_logits:
        _warned_dropped_logits = True
        warnings.warn(
            "cce_inductor: logits returned next to the loss are not computed while "
            "training (config.drop_escaping_logits / CCE_INDUCTOR_DROP_LOGITS=1); an "
            "empty tensor is returned in their place.", stacklevel=2)


def _returned_logits(graph: Graph, site: Site) -> Node | None:
    """Where the graph returns the logits, the nodes that compute them with
    ``returned_logits`` (inserted before the linear, which they replace),
    whose backward skips the zero gradient such logits get when only the loss
    is differentiated (two N x V x D matmuls).  None where nothing is returned
    or the new value would differ in shape or dtype."""
    linear = site.linear
    if not site.escaping or _drops_escaping_logits() or linear._erased:
        return None
    with graph.inserting_before(linear):
        new = NodeMaker(graph, linear)
        x, c = site.hidden, _classifier_matrix(new, site)
        if _dtype(x) != site.compute_dtype:
            x = new.method("to", x, site.compute_dtype)
            c = new.method("to", c, site.compute_dtype)
        logits = new.function(returned_logits, x, c)
        bias = site.bias  # inside the linear (F.linear's or addmm's): added here
        if bias is not None and bias in linear.all_input_nodes:
            if _dtype(bias) != site.compute_dtype:
                bias = new.method("to", bias, site.compute_dtype)
            logits = new.function(operator.add, logits, bias)
    before, after = _value(linear), _value(logits)
    if before.shape != after.shape or before.dtype != after.dtype:
        erase_unused(graph, [logits])
        return None
    return logits


def _value(node: Node) -> torch.Tensor:
    return node.meta["example_value"]


def _dtype(node: Node) -> torch.dtype | None:
    found = node.meta.get("example_value")
    return found.dtype if isinstance(found, torch.Tensor) else None
