"""The entry points: Dynamo backends, the Inductor custom pass, enable/disable.

All of them run ``rewrite_graph`` on Dynamo's torch-level graph:

* ``cce_backend`` / ``backend="cce"``: rewrite, then compile with Inductor;
* ``make_backend(inner)``: rewrite, then hand the graph to any other backend;
* ``enable()`` / ``CCE_INDUCTOR=1``: the same rewrite as an Inductor
  ``pre_grad_custom_pass``, so that plain ``torch.compile(model)`` gets it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

from . import config
from .graph import Site, find_sites, rewrite_site

log = logging.getLogger("cce_inductor")

Backend = Callable[[GraphModule, Sequence[Any]], Callable[..., Any]]


def rewrite_graph(graph: Graph) -> list[Site]:
    """Rewrite every matched loss in ``graph`` in place; return all candidate sites.

    Never raises.  If matching fails, the graph is left as it is; if rewriting
    one site fails, the nodes it added are removed and that site is reported
    as skipped.  Either way one warning names the reason.
    """
    try:
        sites = find_sites(graph)
    except Exception as error:
        _warn_failure(error)
        return []
    for site in sites:
        if not site.rewrite:
            log.info("cce_inductor left %s at %s alone: %s", site.form,
                     site.source_line(), site.skip_reason)
            continue
        existing = set(graph.nodes)
        try:
            rewrite_site(graph, site)
            graph.lint()
        except Exception as error:
            _remove_added_nodes(graph, existing)
            site.skip_reason = f"the rewrite failed ({type(error).__name__}: {error})"
            _warn_failure(error)
            continue
        log.info("cce_inductor rewrote %s at %s", site.form, site.source_line())
    return sites


def _warn_failure(error: Exception) -> None:
    warnings.warn(f"cce_inductor left a loss unchanged: the rewrite failed with "
                  f"{type(error).__name__}: {error}", stacklevel=3)
    log.debug("rewrite failure", exc_info=True)


def _remove_added_nodes(graph: Graph, existing: set) -> None:
    for node in reversed(list(graph.nodes)):  # users always come after their inputs
        if node not in existing:
            graph.erase_node(node)


def make_backend(inner: str | Backend = "inductor") -> Backend:
    """A Dynamo backend that rewrites the graph, then compiles it with ``inner``.

    ``inner`` is a backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``,
    ...) or a callable ``(gm, example_inputs) -> callable``.  Keyword arguments
    that ``torch.compile`` forwards (``mode=``, ``options=``) are passed on.
    """

    def backend(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
        rewrite_graph(gm.graph)
        gm.recompile()
        if inner == "inductor":
            return _compile_with_inductor(gm, example_inputs, **kwargs)
        compile_fn = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) \
            else inner
        return compile_fn(gm, example_inputs, **kwargs)

    backend.__name__ = f"cce_{getattr(inner, '__name__', inner)}"
    return backend


def _compile_with_inductor(gm: GraphModule, example_inputs: Sequence[Any],
                           mode: str | None = None,
                           options: dict[str, Any] | None = None):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        patches.update(list_mode_options(mode))
    patches.update(options or {})
    return compile_fx(gm, example_inputs, config_patches=patches)


def cce_backend(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.compile(model, backend=cce_backend)``: rewrite, then Inductor.

    Also reachable as ``backend="cce"`` once the package is installed.
    """
    return _inductor_backend(gm, example_inputs, **kwargs)


_inductor_backend = make_backend("inductor")


class CCEGraphPass(CustomGraphPass):
    """The rewrite as an Inductor pre-grad custom pass.

    ``uuid`` hashes the package's source and settings, so Inductor's caches
    never serve a graph that another version of the rewrite produced.
    """

    def __call__(self, graph: Graph) -> None:
        rewrite_graph(graph)

    def uuid(self) -> str:
        return _source_hash() + ":" + config.settings_fingerprint()


@functools.cache
def _source_hash() -> str:
    hasher = hashlib.sha256(torch.__version__.encode())
    root = pathlib.Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        hasher.update(str(path.relative_to(root)).encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()[:32]


GRAPH_PASS = CCEGraphPass()


def enable() -> None:
    """Rewrite inside every ``torch.compile`` with the Inductor backend.

    Appends the pass to ``torch._inductor.config.pre_grad_custom_pass`` next
    to whatever other libraries put there; calling it twice is harmless.
    """
    from torch._inductor import config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    passes = list(current) if isinstance(current, (list, tuple)) else \
        [] if current is None else [current]
    if any(p is GRAPH_PASS or (isinstance(p, _PassPair) and p.second is GRAPH_PASS)
           for p in passes):
        return
    if _accepts_pass_lists():
        inductor_config.pre_grad_custom_pass = [*passes, GRAPH_PASS]
    elif current is None:
        inductor_config.pre_grad_custom_pass = GRAPH_PASS
    else:  # this torch takes a single pass: run the other one, then ours
        inductor_config.pre_grad_custom_pass = _PassPair(current, GRAPH_PASS)


def disable() -> None:
    """Undo ``enable()``, leaving other libraries' passes in place."""
    from torch._inductor import config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if current is GRAPH_PASS:
        inductor_config.pre_grad_custom_pass = None
    elif isinstance(current, _PassPair):
        inductor_config.pre_grad_custom_pass = current.first
    elif isinstance(current, (list, tuple)):
        rest = [p for p in current if p is not GRAPH_PASS]
        inductor_config.pre_grad_custom_pass = rest or None


def get_pre_grad_passes() -> list[Any]:
    """The passes now configured in Inductor's ``pre_grad_custom_pass``, as a list."""
    from torch._inductor import config as inductor_config

    current = inductor_config.pre_grad_custom_pass
    if isinstance(current, _PassPair):
        return [current.first, current.second]
    if isinstance(current, (list, tuple)):
        return list(current)
    return [] if current is None else [current]


def _accepts_pass_lists() -> bool:
    from torch._inductor import custom_graph_pass

    return hasattr(custom_graph_pass, "get_custom_graph_passes")


class _PassPair(CustomGraphPass):
    """Two passes run in order, for torch versions that take only one pass."""

    def __init__(self, first: Any, second: CustomGraphPass) -> None:
        self.first, self.second = first, second

    def __call__(self, graph: Graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self) -> Any:
        first_uuid = self.first.uuid() if hasattr(self.first, "uuid") else None
        return None if first_uuid is None else (first_uuid, self.second.uuid())
