"""A rendering of FX graphs that stays the same across torch versions.

Dynamo's own printout changes between releases (node names, the order of
placeholders, keyword arguments spelled out or left at their defaults).  This
rendering numbers nodes in order, names placeholders after the user's
variables, drops keyword arguments that equal the callee's defaults and
trailing ``None`` arguments, and writes ``W.T`` one way (``getattr(W, 'T')``)
whether Dynamo recorded it as that or, from torch 2.14, as ``numpy_T(W)``.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch.fx import Graph, Node


def render(graph: Graph) -> str:
    names: dict[Node, str] = {}
    lines = []
    for node in graph.nodes:
        if node.op == "placeholder":
            names[node] = _placeholder_name(node.name)
            continue
        if node.op == "output":
            lines.append(f"return {_fmt(node.args[0], names)}")
            continue
        names[node] = f"v{len(lines)}"
        if _target_name(node) == "numpy_T":  # torch 2.14's spelling of W.T
            lines.append(f"{names[node]} = getattr({_fmt(node.args[0], names)}, 'T')")
            continue
        kwargs = _without_defaults(node)
        args = list(node.args)
        while node.op == "call_function" and args and args[-1] is None:
            args.pop()  # some versions spell out trailing defaults, e.g. linear's bias
        parts = [_fmt(a, names) for a in args]
        parts += [f"{k}={_fmt(v, names)}" for k, v in sorted(kwargs.items())]
        if node.op == "call_method":
            head, rest = parts[0], parts[1:]
            lines.append(f"{names[node]} = {head}.{node.target}({', '.join(rest)})")
        else:
            lines.append(f"{names[node]} = {_target_name(node)}({', '.join(parts)})")
    return "\n".join(lines)


def _placeholder_name(name: str) -> str:
    name = re.sub(r"^[lg]_", "", name.lower()).strip("_")
    name = re.sub(r"(self_|parameters_|modules_|_parameters)", "", name)
    return name.replace("__", "_").strip("_")


def _target_name(node: Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _without_defaults(node: Node) -> dict:
    if node.op != "call_function":
        return dict(node.kwargs)
    try:
        parameters = inspect.signature(node.target).parameters
    except (TypeError, ValueError):
        return dict(node.kwargs)
    return {k: v for k, v in node.kwargs.items()
            if k not in parameters or parameters[k].default is inspect.Parameter.empty
            or parameters[k].default != v}


def _fmt(x, names: dict[Node, str]) -> str:
    if isinstance(x, Node):
        return names[x]
    if isinstance(x, tuple):
        inner = ", ".join(_fmt(i, names) for i in x)
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(i, names) for i in x) + "]"
    if isinstance(x, slice):
        parts = ["" if p is None else str(p) for p in (x.start, x.stop, x.step)]
        return ":".join(parts[:2]) + (f":{parts[2]}" if parts[2] else "")
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, float):
        return repr(round(x, 6))
    return repr(x)
