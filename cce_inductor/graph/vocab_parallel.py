"""Vocabulary-sharded classifiers: the loss served by the vocabulary-parallel op.

Under tensor parallelism (``ColwiseParallel`` on the head with
``loss_parallel()``, or a plain ``F.linear(h, W)`` with ``W`` a DTensor
``Shard(0)``) every rank holds the whole hidden states and its own rows of the
classifier.  Where that layout is exactly what
``cce_inductor.parallel.vocab_parallel_linear_cross_entropy`` takes, the
matched loss is replaced by one call of ``vocab_parallel_cross_entropy``
below; its logits, global or local, are never formed.

``plan_for`` decides at match time, from the DTensors' example values, and
returns a reason where the layout is not one it serves exactly.  The call
itself unwraps the DTensors (``to_local``), replays the row slices and
flattens, and calls ``cce::vocab_parallel_linear_cross_entropy`` (an opaque
custom op with its own backward op, in ``cce_inductor/parallel.py``).  The
loss comes back replicated, wrapped as the DTensor the original loss produced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.fx import Graph, Node

from .edit import NodeMaker, erase_unused
from .site import run_rows

if TYPE_CHECKING:
    from .site import Site

log = logging.getLogger("cce_inductor")

FORMS = ("cross_entropy",)


@dataclass(frozen=True)
class VocabParallelPlan:
    """How one rank serves a vocabulary-sharded loss; fixed at match time."""

    mesh_dim: int  # the mesh dimension the vocabulary is split over
    vocab_size: int  # V, the whole vocabulary
    vocab_start: int  # this rank's first row
    local_size: int  # this rank's number of rows
    group_name: str  # the process group of ``mesh_dim``
    group_size: int
    wrap_output: bool  # the original loss was a (replicated) DTensor


def plan_for(site: Site, classifier: Any) -> tuple[VocabParallelPlan | None, str]:
    """A plan for ``site``, whose classifier is a vocabulary-sharded DTensor.

    Returns ``(plan, "")``, or ``(None, why)`` where the vocabulary-parallel
    loss would not compute exactly what the graph does.
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if site.form not in FORMS:
        return None, f"the {site.form} form is not served by the vocabulary-parallel loss"
    if site.label_smoothing:
        return None, "label smoothing is not supported by the vocabulary-parallel loss"
    if site.vocab_slice is not None or site.classifier_batch_dims:
        return None, "the logits slice the vocabulary or come from a batched matmul"

    mesh = classifier.device_mesh
    vocab_dim = 1 if site.classifier_is_transposed else 0
    shards = [i for i, p in enumerate(classifier.placements)
              if type(p) is Shard and p.dim % 2 == vocab_dim]
    others_replicated = all(isinstance(p, Replicate) for i, p in
                            enumerate(classifier.placements) if i not in shards)
    if len(shards) != 1 or not others_replicated:
        return None, (f"the classifier's placements {tuple(classifier.placements)} are "
                      "not one vocabulary shard, replicated elsewhere")
    mesh_dim = shards[0]

    hidden = _value(site.hidden)
    if not _replicated_on(hidden, mesh, DTensor, Replicate):
        return None, "the hidden states are not a DTensor replicated on the classifier's mesh"
    targets = _value(site.targets)
    if isinstance(targets, DTensor) and not _replicated_on(targets, mesh, DTensor, Replicate):
        return None, "the targets are a DTensor that is not replicated"
    if site.bias is not None:
        bias = _value(site.bias)
        bias_placements = tuple(Shard(0) if i == mesh_dim else Replicate()
                                for i in range(mesh.ndim))
        if not isinstance(bias, DTensor) or bias.device_mesh != mesh or \
                tuple(bias.placements) != bias_placements:
            return None, "the bias is not sharded over the vocabulary like the classifier"

    if site.weight is not None:
        weight = _value(site.weight)
        if weight is None or (isinstance(weight, DTensor) and
                              not _replicated_on(weight, mesh, DTensor, Replicate)):
            return None, "the class weight is a DTensor that is not replicated"

    output = _value(site.anchor)
    wrap_output = isinstance(output, DTensor)
    if wrap_output and not _replicated_on(output, mesh, DTensor, Replicate):
        return None, (f"the loss is a DTensor with placements {tuple(output.placements)}, "
                      "not replicated")
    if output is None or (site.reduction != "none" and output.dim() != 0):
        return None, "the loss has no known shape"

    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None, "this rank is not in the classifier's mesh"
    vocab_size = int(classifier.shape[vocab_dim])
    group_size = mesh.size(mesh_dim)
    start, size = shard_range(vocab_size, group_size, coordinate[mesh_dim])
    local = classifier._local_tensor.shape[vocab_dim]
    if local != size:
        return None, (f"this rank holds {local} classifier rows where an even torch.chunk "
                      f"split gives {size}")
    group = mesh.get_group(mesh_dim)
    return VocabParallelPlan(mesh_dim, vocab_size, start, size, group.group_name,
                             group_size, wrap_output), ""


def shard_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part ``index`` of ``size`` rows split like ``torch.chunk``.

    This is how DTensor's ``Shard`` lays out a dimension: parts of
    ``ceil(size / parts)`` rows, the last ones shorter or empty.
    """
    chunk = -(-size // parts)
    start = min(chunk * index, size)
    return start, max(0, min(size, start + chunk) - start)


def rewrite_vocab_parallel(graph: Graph, site: Site) -> None:
    """Replace ``site``'s loss with one ``vocab_parallel_cross_entropy`` call."""
    plan = site.vocab_parallel
    with graph.inserting_before(site.anchor):
        new = NodeMaker(graph, site.anchor)
        output = _value(site.anchor)
        replacement = new.function(
            vocab_parallel_cross_entropy, site.hidden, site.classifier, site.bias,
            site.targets, site.weight, row_ops=tuple(site.row_ops),
            transposed=site.classifier_is_transposed, compute_dtype=site.compute_dtype,
            mesh_dim=plan.mesh_dim, vocab_start=plan.vocab_start, vocab_size=plan.vocab_size,
            local_size=plan.local_size, group_name=plan.group_name,
            ignore_index=site.ignore_index, reduction=site.reduction,
            softcap=site.softcap, logit_scale=site.logit_scale,
            out_dtype=output.dtype, wrap_output=plan.wrap_output)
    site.anchor.replace_all_uses_with(replacement)
    anchor_inputs = site.anchor.all_input_nodes
    graph.erase_node(site.anchor)
    erase_unused(graph, anchor_inputs + site.chain)
    log.info("cce_inductor serves %s at %s with the vocab-parallel loss: V=%d over %d "
             "ranks, rows [%d, %d) here", site.form, site.source_line(), plan.vocab_size,
             plan.group_size, plan.vocab_start, plan.vocab_start + plan.local_size)


def vocab_parallel_cross_entropy(
    hidden: Any, classifier: Any, bias: Any, targets: Any, weight: Any, *, row_ops: tuple,
    transposed: bool, compute_dtype: torch.dtype | None, mesh_dim: int, vocab_start: int,
    vocab_size: int, local_size: int, group_name: str, ignore_index: int, reduction: str,
    softcap: float | None, logit_scale: float, out_dtype: torch.dtype, wrap_output: bool,
) -> Tensor:
    """What the rewritten graph calls in place of the loss (one rank's part).

    ``hidden`` (replicated DTensor), ``classifier`` and ``bias`` (DTensors
    sharded over the vocabulary on ``mesh_dim``), ``targets`` and the class
    ``weight`` (whole, or None) are the graph's operands; ``row_ops`` are the
    row slices and flattens the logits went through before the loss.
    ``vocab_start`` and ``local_size`` were computed for this rank when the
    graph was rewritten, and are checked here.
    """
    from ..parallel import vocab_parallel_op

    mesh = classifier.device_mesh
    e = run_rows(_to_local(hidden), list(row_ops))
    e = e.reshape(-1, e.shape[-1])
    c = classifier.to_local()
    if transposed:
        c = c.t()
    b = None if bias is None else bias.to_local()
    y = _to_local(targets).reshape(-1)
    if compute_dtype is not None and e.dtype != compute_dtype:  # autocast
        e, c = e.to(compute_dtype), c.to(compute_dtype)
        b = None if b is None else b.to(compute_dtype)
    coordinate = mesh.get_coordinate()
    expected = shard_range(int(classifier.shape[1 if transposed else 0]),
                           mesh.size(mesh_dim), coordinate[mesh_dim])
    if (vocab_start, local_size) != expected or c.shape[0] != local_size:
        raise RuntimeError(
            f"cce_inductor: the vocabulary shard of this rank changed since the graph was "
            f"rewritten (rows [{vocab_start}, {vocab_start + local_size}) then, "
            f"{expected} and {c.shape[0]} rows now)")
    w = None if weight is None else _to_local(weight)
    loss, _ = vocab_parallel_op(e, c, y, b, w, vocab_start, vocab_size, group_name,
                                ignore_index, reduction, 0.0, softcap, float(logit_scale))
    loss = loss.to(out_dtype)
    if not wrap_output:
        return loss
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(loss, mesh, [Replicate()] * mesh.ndim, run_check=False)


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _to_local(value: Any) -> Tensor:
    return value.to_local() if hasattr(value, "to_local") else value


def _replicated_on(value: Any, mesh: Any, dtensor: type, replicate: type) -> bool:
    return isinstance(value, dtensor) and value.device_mesh == mesh and \
        all(isinstance(p, replicate) for p in value.placements)


def _value(node: Any) -> Any:
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None
