"""``explain``: which losses the rewrite finds in a model, and what it does with them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .backend import rewrite_graph, skipping_library_logging


@dataclass(frozen=True)
class SiteReport:
    """One candidate loss: where it is, and whether it was rewritten."""

    form: str
    rewritten: bool
    reason: str | None
    source: str
    logits_bytes: int | None
    logits_escape: bool
    logits_read: bool = False  # escaping logits that the op reads

    def __str__(self) -> str:
        status = "rewritten" if self.rewritten else f"left alone: {self.reason}"
        size = "logits" if self.logits_bytes is None else \
            f"{_mib(self.logits_bytes)} of logits"
        if not self.rewritten:
            detail = ""
        elif not self.logits_escape:
            detail = f"; removes {size}"
        else:
            use = "the op reads them instead of recomputing them" if self.logits_read \
                else "the op recomputes its own, blockwise"
            detail = (f"; the graph also returns the {size}, so they stay ({use}); "
                      "config.drop_escaping_logits (CCE_INDUCTOR_DROP_LOGITS=1) drops "
                      "them while training and removes them")
        return f"{self.form} at {self.source}: {status}{detail}"


@dataclass(frozen=True)
class ExplainReport:
    """Every candidate loss of every graph Dynamo captured."""

    sites: tuple[SiteReport, ...]
    graphs: int

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def __str__(self) -> str:
        lines = [f"cce_inductor: {len(self.sites)} candidate loss(es) in "
                 f"{self.graphs} graph(s), {len(self.rewritten)} rewritten"]
        lines += [f"  - {site}" for site in self.sites]
        return "\n".join(lines)


def explain(model_or_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ExplainReport:
    """Run ``model_or_fn(*args, **kwargs)`` once under Dynamo and report every
    candidate loss: rewritten, or left alone with the reason, with the user's
    source line and the logits memory the rewrite removes.

    Nothing stays compiled: the captured graphs run eagerly, and Dynamo's
    cache for ``model_or_fn`` is dropped afterwards.
    """
    reports: list[SiteReport] = []
    graphs = 0

    def analyze(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        nonlocal graphs
        graphs += 1
        sites = rewrite_graph(gm.graph)
        gm.recompile()
        for site in sites:
            reports.append(SiteReport(
                form=site.form, rewritten=site.rewrite, reason=site.skip_reason,
                source=site.source_line(), logits_bytes=site.logits_bytes(),
                logits_escape=bool(site.escaping),
                logits_read=site.given_logits is not None))
        return gm.forward

    compiled = torch.compile(model_or_fn, backend=analyze)
    try:
        with skipping_library_logging():
            compiled(*args, **kwargs)
    finally:
        target = getattr(model_or_fn, "forward", model_or_fn)
        code = getattr(target, "__code__", None)
        if code is not None:
            _forget(code)
    return ExplainReport(sites=tuple(reports), graphs=graphs)


def _forget(code: Any) -> None:
    """Drop Dynamo's cache entries for ``code`` so the analysis leaves no trace."""
    reset = getattr(torch._C._dynamo.eval_frame, "reset_code", None)
    if reset is not None:
        reset(code)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
