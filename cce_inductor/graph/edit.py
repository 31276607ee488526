"""Editing a Dynamo graph: new nodes with the metadata torch.compile expects, and
removal of what nothing uses any more.  Used by ``rewrite`` and ``vocab_parallel``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.fx import Graph, Node


def erase_unused(graph: Graph, nodes: list[Node]) -> None:
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


class NodeMaker:
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
        mode = fake_mode(self.like)
        with mode if mode is not None else contextlib.nullcontext():
            if method:
                value = getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
            else:
                value = target(*fake_args, **fake_kwargs)
        node.meta["example_value"] = value
        return node


def fake_mode(node: Node) -> Any:
    """The fake mode of the graph ``node`` is in, if its example values have one."""
    for n in node.graph.nodes:
        value = n.meta.get("example_value")
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    return None
