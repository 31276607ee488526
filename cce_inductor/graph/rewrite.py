"""What replaces it: one call of the fused op in place of the matched loss.

For a ``Site`` that ``match`` accepted, the rewrite inserts before the anchor

    e = <hidden, with the same row slices and flattens>.flatten(0, -2)
    loss, lse = fused_linear_cross_entropy(e, c, targets.flatten(), ...)

then points the anchor's users (and any logsumexp of the same logits) at the
new values and erases the logits chain where nothing else uses it.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Any

import torch
from torch.fx import Graph, Node

from .. import config
from ..functional import fused_linear_cross_entropy
from .match import FLATTEN_ROWS, Site

_warned_dropped_logits = False


def rewrite_site(graph: Graph, site: Site) -> None:
    """Replace ``site``'s loss with one op call; the graph stays valid.

    New nodes are all built before any existing node is touched, so a failure
    while building leaves only unused new nodes behind.
    """
    if site.vocab_parallel is not None:
        from .vocab_parallel import rewrite_vocab_parallel

        return rewrite_vocab_parallel(graph, site)
    with graph.inserting_before(site.anchor):
        new = _NodeMaker(graph, site.anchor)
        hidden = site.hidden
        for op in site.row_ops:
            if op == FLATTEN_ROWS:
                hidden = new.method("flatten", hidden, 0, -2)
            else:
                hidden = new.function(operator.getitem, hidden, op)
        rows = hidden
        e = rows if _ndim(rows) == 2 else new.method("flatten", rows, 0, -2)
        c = site.classifier
        if site.classifier_is_transposed:
            c = new.method("t", c)
        bias = site.bias
        if _dtype(e) != site.compute_dtype:  # the linear ran under autocast
            e = new.method("to", e, site.compute_dtype)
            c = new.method("to", c, site.compute_dtype)
            bias = None if bias is None else new.method("to", bias, site.compute_dtype)
        targets = site.targets
        if _ndim(targets) != 1:
            targets = new.method("flatten", targets)
        wants_lse = bool(site.logsumexp_users)
        result = new.function(
            fused_linear_cross_entropy, e, c, targets, bias, site.weight,
            site.ignore_index, site.reduction, site.label_smoothing, site.softcap,
            site.logit_scale, wants_lse, loss_dtype=site.logits_dtype,
        )
        loss = new.function(operator.getitem, result, 0) if wants_lse else result
        lse = new.function(operator.getitem, result, 1) if wants_lse else None
        replacement = _loss_replacement(new, site, loss)
        lse_replacements = [(user, _logsumexp_replacement(new, user, lse, rows))
                            for user in site.logsumexp_users]

    # Everything above only added nodes; from here on the graph changes.
    for user, value in lse_replacements:
        user.replace_all_uses_with(value)
        graph.erase_node(user)
    site.anchor.replace_all_uses_with(replacement)
    _drop_escaping_logits(graph, site)
    anchor_inputs = site.anchor.all_input_nodes
    graph.erase_node(site.anchor)
    _erase_unused(graph, anchor_inputs + site.chain)


def _loss_replacement(new: _NodeMaker, site: Site, loss: Node) -> Node:
    if site.form != "gather":
        return loss
    # gather(log_softmax, -1, y.unsqueeze(-1)) is -loss per row, shaped like y[..., None].
    index = site.anchor.args[2] if len(site.anchor.args) > 2 else \
        site.anchor.kwargs["index"]
    return new.method("view_as", new.function(operator.neg, loss), index)


def _logsumexp_replacement(new: _NodeMaker, user: Node, lse: Node, rows: Node) -> Node:
    lead = new.function(operator.getitem, new.method("size", rows), slice(None, -1))
    value = new.method("reshape", lse, lead)
    out_dtype = _dtype(user)
    if out_dtype != torch.float32:
        value = new.method("to", value, out_dtype)
    keepdim = user.kwargs.get("keepdim", user.args[2] if len(user.args) > 2 else False)
    if keepdim:
        value = new.method("unsqueeze", value, -1)
    return value


def _drop_escaping_logits(graph: Graph, site: Site) -> None:
    """Under the opt-in, return an empty tensor where escaping logits were."""
    global _warned_dropped_logits
    if not site.escaping or not config.drop_escaping_logits or \
            not torch.is_grad_enabled():
        return
    output = next(n for n in graph.nodes if n.op == "output")
    for logits in site.escaping:
        with graph.inserting_before(output):
            empty = _NodeMaker(graph, logits).method("new_empty", logits, (0,))
        output.replace_input_with(logits, empty)
    if not _warned_dropped_logits:
        _warned_dropped_logits = True
        warnings.warn(
            "cce_inductor: logits returned next to the loss are not computed while "
            "training (config.drop_escaping_logits / CCE_INDUCTOR_DROP_LOGITS=1); an "
            "empty tensor is returned in their place.", stacklevel=2)


def _erase_unused(graph: Graph, nodes: list[Node]) -> None:
    """Erase ``nodes``, and what only they used, wherever nothing uses them now."""
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node._erased or node.users or node.op in ("placeholder", "output") or \
                node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        pending.extend(inputs)


def _ndim(node: Node) -> int | None:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _dtype(node: Node) -> torch.dtype | None:
    value = node.meta.get("example_value")
    return value.dtype if isinstance(value, torch.Tensor) else None


class _NodeMaker:
    """Inserts nodes with the metadata the rest of torch.compile expects.

    Each new node gets the anchor's stack trace and module stack, and an
    ``example_value`` computed by running it on the inputs' fake values.
    """

    def __init__(self, graph: Graph, like: Node) -> None:
        self.graph = graph
        self.like = like

    def function(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        return self._finish(self.graph.call_function(target, args, kwargs), target,
                            args, kwargs, method=False)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Node:
        return self._finish(self.graph.call_method(name, args, kwargs), name, args,
                            kwargs, method=True)

    def _finish(self, node: Node, target: Any, args: tuple, kwargs: dict,
                method: bool) -> Node:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        fake_args, fake_kwargs = torch.fx.node.map_aggregate(
            (args, kwargs),
            lambda a: a.meta.get("example_value") if isinstance(a, Node) else a)
        fake_mode = _fake_mode(self.like)
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            if method:
                value = getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
            else:
                value = target(*fake_args, **fake_kwargs)
        node.meta["example_value"] = value
        return node


def _fake_mode(node: Node):
    for n in node.graph.nodes:
        value = n.meta.get("example_value")
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    return None
