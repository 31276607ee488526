"""The entry points: Dynamo backends, the Inductor custom pass, enable/disable.

All of them run ``rewrite_graph`` on Dynamo's torch-level graph:

* ``cce_backend`` / ``backend="cce"``: rewrite, then compile with Inductor;
* ``make_backend(inner)``: rewrite, then hand the graph to any other backend;
* ``enable()`` / ``CCE_INDUCTOR=1``: the same rewrite as an Inductor
  ``pre_grad_custom_pass``, so that plain ``torch.compile(model)`` gets it.

Each way in also has Dynamo skip the logging helpers of libraries that would
otherwise break the graph between a model's head and its loss
(``library_logging_functions``): ``enable()`` until ``disable()``,
``explain`` for its run, and the backend objects from the moment one is
handed out (``torch.compile`` wraps a backend in an object that keeps none of
its attributes, so a backend cannot scope a Dynamo setting to its own calls).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import pathlib
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
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
    one site fails, the graph goes back to what it was before that site (or,
    where that cannot be undone, the pass starts over from the untouched
    graph without it) and the site is reported as skipped.  Either way one
    warning names the reason.
    """
    original: list[Graph] = []  # the untouched graph, copied before the first edit
    failed: dict[int, str] = {}  # position of a failed site's anchor -> reason
    while True:
        sites, start_over = _rewrite_sites(graph, failed, original)
        if not start_over:
            return sites
        _restore(graph, original[0])


def _rewrite_sites(graph: Graph, failed: dict[int, str], original: list[Graph]
                   ) -> tuple[list[Site], bool]:
    """One pass over the sites; True when a failure left the graph changed."""
    try:
        sites = find_sites(graph)
    except Exception as error:
        _warn_failure(error)
        return [], False
    position = {node: i for i, node in enumerate(graph.nodes)}
    for site in sites:
        anchor = position[site.anchor]
        if anchor in failed:
            site.skip_reason = failed[anchor]
            continue
        if not site.rewrite:
            log.info("cce_inductor left %s at %s alone: %s", site.form,
                     site.source_line(), site.skip_reason)
            continue
        if not original:
            original.append(_snapshot(graph))
        existing = set(graph.nodes)
        try:
            rewrite_site(graph, site)
            graph.lint()
        except Exception as error:
            site.skip_reason = failed[anchor] = \
                f"the rewrite failed ({type(error).__name__}: {error})"
            _warn_failure(error)
            try:
                _remove_added_nodes(graph, existing)
                graph.lint()
            except Exception:
                return sites, True
            continue
        log.info("cce_inductor rewrote %s at %s", site.form, site.source_line())
    return sites, False


def _warn_failure(error: Exception) -> None:
    warnings.warn(f"cce_inductor left a loss unchanged: the rewrite failed with "
                  f"{type(error).__name__}: {error}", stacklevel=3)
    log.debug("rewrite failure", exc_info=True)


def _remove_added_nodes(graph: Graph, existing: set) -> None:
    for node in reversed(list(graph.nodes)):  # users always come after their inputs
        if node not in existing:
            graph.erase_node(node)


def _snapshot(graph: Graph) -> Graph:
    """A copy of ``graph``: nodes, arguments and metadata."""
    copy = Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def _restore(graph: Graph, snapshot: Graph) -> None:
    """Make ``graph`` a copy of ``snapshot`` in place (passes hold on to it).

    The placeholders stay the same objects (the rewrite never edits them, and
    Dynamo keeps attributes on them); every other node is copied back.
    """
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    others = [node for node in graph.nodes if node.op != "placeholder"]
    for node in others:  # drop every edge first: a failed edit may leave them out of order
        node.args, node.kwargs = (), {}
    for node in reversed(others):
        graph.erase_node(node)
    saved_inputs = [node for node in snapshot.nodes if node.op == "placeholder"]
    graph.output(graph.graph_copy(snapshot, dict(zip(saved_inputs, inputs))))


def make_backend(inner: str | Backend = "inductor") -> Backend:
    """A Dynamo backend that rewrites the graph, then compiles it with ``inner``.

    ``inner`` is a backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``,
    ...) or a callable ``(gm, example_inputs) -> callable``.  Keyword arguments
    that ``torch.compile`` forwards (``mode=``, ``options=``) are passed on.
    From this call on, Dynamo skips ``library_logging_functions()``.
    """
    _skip_library_logging_for_backends()
    return _make_backend(inner)


def _make_backend(inner: str | Backend) -> Backend:

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


# Logging helpers that Dynamo cannot trace, by module: a call to one between a
# model's head and its loss breaks the graph there, and the logits then reach
# the loss as an input of another graph, where they cannot be served.
# transformers' ``PreTrainedModel.loss_function`` calls ``logger.warning_once``
# whenever the model names no known ``loss_type`` (GPT-2, for one).
LIBRARY_LOGGING_FUNCTIONS = {
    "transformers.utils.logging": ("warning_once", "info_once"),
}


def library_logging_functions() -> list[Callable[..., Any]]:
    """The functions of ``LIBRARY_LOGGING_FUNCTIONS`` whose modules are imported."""
    found = []
    for module_name, names in LIBRARY_LOGGING_FUNCTIONS.items():
        module = sys.modules.get(module_name)
        for name in names:
            fn = getattr(module, name, None)
            if callable(fn):
                found.append(fn)
    return found


def _ignore_setting() -> str:
    from torch._dynamo import config as dynamo_config

    return "ignore_logging_functions" if hasattr(dynamo_config, "ignore_logging_functions") \
        else "ignore_logger_methods"


@contextlib.contextmanager
def skipping_library_logging() -> Iterator[None]:
    """Within the block Dynamo treats ``library_logging_functions()`` as no-ops.

    Added to ``torch._dynamo.config.ignore_logging_functions`` on entry and
    taken out on exit; compiled code then does not emit those messages.
    """
    from torch._dynamo import config as dynamo_config

    setting = _ignore_setting()
    current = set(getattr(dynamo_config, setting))
    missing = [fn for fn in library_logging_functions() if fn not in current]
    if not missing:
        yield
        return
    with dynamo_config.patch(**{setting: current | set(missing)}):
        yield


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


def _cce_backend(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any):
    """``torch.compile(model, backend=cce_backend)``: rewrite, then Inductor.

    Also reachable as ``backend="cce"`` once the package is installed.
    """
    return _inductor_backend(gm, example_inputs, **kwargs)


_cce_backend.__name__ = _cce_backend.__qualname__ = "cce_backend"
_inductor_backend = _make_backend("inductor")


def __getattr__(name: str) -> Any:
    # ``cce_backend`` is handed out here, by attribute access (which is also how
    # ``backend="cce"`` loads it), so that handing it out can set Dynamo up.
    if name == "cce_backend":
        _skip_library_logging_for_backends()
        return _cce_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    Until ``disable()``, Dynamo also skips the library logging helpers of
    ``library_logging_functions()`` (for libraries imported later too, from
    their first compile on), so that they do not break graphs.
    """
    from torch._inductor import config as inductor_config

    _skip_library_logging_until_disabled()

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
    """Undo ``enable()``, leaving other libraries' passes and settings in place."""
    from torch._inductor import config as inductor_config

    _stop_skipping_library_logging()

    current = inductor_config.pre_grad_custom_pass
    if current is GRAPH_PASS:
        inductor_config.pre_grad_custom_pass = None
    elif isinstance(current, _PassPair):
        inductor_config.pre_grad_custom_pass = current.first
    elif isinstance(current, (list, tuple)):
        rest = [p for p in current if p is not GRAPH_PASS]
        inductor_config.pre_grad_custom_pass = rest or None


# The logging functions that enable() added to Dynamo's ignore set, which
# disable() takes out again (and none that were there before), unless a
# backend object was handed out meanwhile.
_ADDED_BY_ENABLE: list[Callable[..., Any]] = []
_backends_handed_out = False


def _add_library_logging(*_: Any) -> None:
    """Add the imported ``library_logging_functions()`` to Dynamo's ignore set."""
    from torch._dynamo import config as dynamo_config

    setting = _ignore_setting()
    current = set(getattr(dynamo_config, setting))
    missing = [fn for fn in library_logging_functions() if fn not in current]
    if missing:
        setattr(dynamo_config, setting, current | set(missing))
        if not _backends_handed_out:
            _ADDED_BY_ENABLE.extend(missing)


def _watch_library_imports() -> None:
    # A library imported later (CCE_INDUCTOR=1 enables at `import torch`) is
    # picked up when Dynamo starts its next compile, before it traces.
    # torch._dynamo.reset() drops this callback; by then the functions of the
    # libraries imported so far are in the set.
    import torch._dynamo

    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is not None and _add_library_logging not in handler.start_callbacks:
        handler.register_start_callback(_add_library_logging)


def _skip_library_logging_for_backends() -> None:
    global _backends_handed_out
    if not _backends_handed_out:
        _backends_handed_out = True
        _ADDED_BY_ENABLE.clear()
        _add_library_logging()
        _watch_library_imports()


def _skip_library_logging_until_disabled() -> None:
    _add_library_logging()
    _watch_library_imports()


def _stop_skipping_library_logging() -> None:
    if _backends_handed_out:
        return
    import torch._dynamo
    from torch._dynamo import config as dynamo_config

    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is not None and _add_library_logging in handler.start_callbacks:
        handler.remove_start_callback(_add_library_logging)
    if _ADDED_BY_ENABLE:
        setting = _ignore_setting()
        kept = {fn for fn in getattr(dynamo_config, setting)
                if not any(fn is added for added in _ADDED_BY_ENABLE)}
        setattr(dynamo_config, setting, kept)
        _ADDED_BY_ENABLE.clear()


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
