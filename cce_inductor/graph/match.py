"""Finding sites: consumers of logits, grouped into one op call per logits tensor.

1. ``consumers.recognize`` finds every node that reads logits the op can serve
   (a loss, a chosen-token log-prob, a log-sum-exp, an entropy, an argmax).
2. ``steps.walk`` takes each one back to the linear that made its logits,
   deciding every step between them from the nodes' metadata.
3. Consumers of the same linear that see the same rows and the same
   scale/softcap/bias share one ``Site``, so the vocabulary is swept once.
4. A linear whose logits (or anything computed from them on the way) feed a
   node that needs the whole matrix (sampling, top-k, a KL divergence to a
   full distribution) is left alone, with the reason.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import Graph, Node

from . import nodes as N
from . import steps
from .consumers import Found, is_loss, recognize
from .distributed import classifier_skip_reason
from .site import TARGET_KINDS, RowIndex, Site
from .steps import LOG_PROBS, LOGITS, Skip, Walk, walk


def find_sites(graph: Graph) -> list[Site]:
    """Every candidate site in ``graph``, each either ready to rewrite or skipped."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    region = _grad_mode_regions(graph)
    sites: list[Site] = []
    by_linear: dict[Node, list[tuple[Found, Walk]]] = defaultdict(list)
    for node in graph.nodes:
        try:
            found = recognize(node)
            if found is None:
                continue
            by_linear_entry = _walk_consumer(found)
        except Skip as skip:
            if is_loss(node):
                sites.append(_skipped(node, str(skip)))
            continue
        except Exception as error:  # a form the matcher did not foresee: leave it
            if is_loss(node):
                sites.append(_skipped(node, f"the matcher failed here "
                                            f"({type(error).__name__}: {error})"))
            continue
        by_linear[by_linear_entry[1].linear].append(by_linear_entry)
    for entries in by_linear.values():
        sites += _sites_of_linear(entries, order, region)
    sites.sort(key=lambda site: order[site.anchor])
    return sites


def _walk_consumer(found: Found) -> tuple[Found, Walk]:
    """Walk every input of ``found`` back to the linear; they must agree."""
    reader = found.internal[-1] if found.internal else found.consumer.node
    walks = [walk(node, space, reader) for node, space in found.inputs]
    first = walks[0]
    for other in walks[1:]:
        if other.key() != first.key():
            raise Skip(f"the operands of {found.consumer.node.name} come from different "
                       "logits")
    consumer = found.consumer
    if consumer.kind == "log_prob" and first.space == LOGITS:
        consumer.kind = "logit"
    elif consumer.kind == "log_prob" and first.space != LOG_PROBS:
        raise Skip("a gather of probabilities")
    elif consumer.kind == "neg_entropy":
        if walks[1].space == LOGITS:
            consumer.kind = "mean_logit"
        elif walks[1].space != LOG_PROBS:
            raise Skip("a product of probabilities with probabilities")
    # Every walk's nodes belong to the site; the first walk describes it.
    for other in walks[1:]:
        first.chain += other.chain
        first.inplace += other.inplace
    return found, first


def _grad_mode_regions(graph: Graph) -> dict[Node, int]:
    """Nodes between the same two ``set_grad_enabled`` calls share a number."""
    region, current = {}, 0
    for node in graph.nodes:
        if N.is_function(node, (torch._C._set_grad_enabled,)):
            current += 1
        region[node] = current
    return region


def _sites_of_linear(entries: list[tuple[Found, Walk]], order: dict[Node, int],
                     region: dict[Node, int]) -> list[Site]:
    _defer_row_selections(entries, region)
    def shares(group: list[tuple[Found, Walk]], entry: tuple[Found, Walk],
               with_affine: bool) -> bool:
        (found, walked), (other_found, other) = group[0], entry
        return walked.key(with_affine) == other.key(with_affine) and \
            region[found.consumer.node] == region[other_found.consumer.node]

    groups: list[list[tuple[Found, Walk]]] = []
    argmaxes = [e for e in entries if e[0].consumer.kind == "argmax"]
    for entry in entries:
        if entry in argmaxes:
            continue
        group = next((g for g in groups if shares(g, entry, True)), None)
        if group is None:
            groups.append([entry])
        else:
            group.append(entry)
    def serves_argmax(group: list[tuple[Found, Walk]], entry: tuple[Found, Walk]) -> bool:
        # argmax is unchanged by a positive scale and by the softcap, and has no
        # gradient: a call made before it in another grad mode serves it too.
        earliest = min(order[f.consumer.node] for f, _ in group)
        return group[0][1].key(False) == entry[1].key(False) and \
            group[0][1].logit_scale * entry[1].logit_scale > 0 and \
            (shares(group, entry, False) or earliest < order[entry[0].consumer.node])

    for entry in argmaxes:
        group = next((g for g in groups if serves_argmax(g, entry)), None)
        if group is None:
            groups.append([entry])
        else:
            group.append(entry)

    reason, escaping = _check_users(entries)
    sites = []
    for group in groups:
        group.sort(key=lambda e: order[e[0].consumer.node])
        site = _site(group)
        try:
            if reason:
                raise Skip(reason)
            _fill(site, group, order, escaping)
        except Skip as skip:
            site.skip_reason = str(skip)
            if not any(f.consumer.kind in TARGET_KINDS for f, _ in group):
                continue  # no target: a router's softmax, say; not worth a report
        sites.append(site)
    return sites


def _defer_row_selections(entries: list[tuple[Found, Walk]], region: dict[Node, int]
                          ) -> None:
    """Let a per-row statistic of some rows share the call over all of them.

    ``torch.stack([lg.logsumexp(-1) for lg in z])`` next to a gather of
    ``z``, or an entropy over the ``split`` pieces of ``z``'s rows: the
    statistic of a selection of rows is that selection of the statistic of
    all rows.  Where the last row step before such a consumer selects rows
    with constants, and either another consumer (same grad mode) reads those
    rows whole or the step is a piece of a split, the step moves from the
    op's input to its output (``Consumer.output_rows``).
    """
    keys = [(walked.key(), region[found.consumer.node]) for found, walked in entries]
    for i, (found, walked) in enumerate(entries):
        last = walked.row_ops[-1] if walked.row_ops else None
        if found.consumer.kind in TARGET_KINDS or not isinstance(last, RowIndex) or \
                last.lead is None or not all(_constant_selection(e) for e in last.index):
            continue
        walked.row_ops.pop()
        whole = (walked.key(), region[found.consumer.node])
        if last.piece or any(key == whole for j, key in enumerate(keys) if j != i):
            found.consumer.output_rows = (last.index, last.lead)
            walked.final_logits = None  # it may lie after the selection
        else:
            walked.row_ops.append(last)


def _constant_selection(entry: object) -> bool:
    if isinstance(entry, int):
        return True
    return isinstance(entry, slice) and all(
        b is None or isinstance(b, int) for b in (entry.start, entry.stop, entry.step))


def _site(group: list[tuple[Found, Walk]]) -> Site:
    found, first = group[0]
    forms = []
    for f, _ in group:
        if f.form not in forms:
            forms.append(f.form)
    return Site(anchor=found.consumer.node, form=" + ".join(forms),
                consumers=[f.consumer for f, _ in group])


def _check_users(entries: list[tuple[Found, Walk]]) -> tuple[str | None, set[Node]]:
    """Why nodes between this linear and its consumers may not be removed, if so.

    Returns the reason (or None) and the nodes the graph returns (escaping
    logits, which stay computed).
    """
    known: set[Node] = set()
    consumers = set()
    for found, walked in entries:
        known.update(walked.chain, walked.inplace, found.internal)
        consumers.add(found.consumer.node)
    escaping = set()
    for node in known:
        for user in node.users:
            if user in known or user in consumers or _is_dead(user):
                continue
            if user.op == "output" or _only_returned(user):
                escaping.add(node)  # computed anyway, for the graph's output
                continue
            if is_loss(user) or N.is_log_softmax(user):
                return (f"the same logits also feed a second loss ({N.describe(user)})",
                        escaping)
            return (f"the logits are also used by {N.describe(user)}, which needs the "
                    "full matrix", escaping)
    return None, escaping


def _only_returned(node: Node) -> bool:
    """``node`` is a view or copy of the logits (``logits[:, 0]``) that the graph
    only returns."""
    if not (N.is_getitem(node) or
            N.is_call(node, N.RESHAPE_FUNCTIONS + N.PERMUTE_FUNCTIONS,
                      N.RESHAPE_METHODS + N.PERMUTE_METHODS + N.CAST_METHODS)):
        return False
    return all(user.op == "output" or _only_returned(user) for user in node.users)


def _is_dead(node: Node) -> bool:
    """Nothing reads what ``node`` computes, directly or through other nodes."""
    if node.op not in ("call_function", "call_method") or node.is_impure() or \
            steps.is_inplace(node):
        return False
    return all(_is_dead(user) for user in node.users)


def _fill(site: Site, group: list[tuple[Found, Walk]], order: dict[Node, int],
          escaping: set[Node]) -> None:
    targets = [f for f, _ in group if f.consumer.kind in TARGET_KINDS]
    if len(targets) > 1:
        raise Skip(f"the same logits also feed a second loss "
                   f"({N.describe(targets[1].consumer.node)})")
    _, walked = group[0]
    for name in ("linear", "hidden", "classifier", "classifier_is_transposed",
                 "classifier_batch_dims", "vocab_slice", "bias", "bias_is_sliced",
                 "softcap", "logit_scale", "row_ops", "compute_dtype"):
        setattr(site, name, getattr(walked, name))
    for found, other in group:
        site.chain += [n for n in (*other.chain, *found.internal) if n not in site.chain]
        site.inplace += [n for n in other.inplace if n not in site.inplace]
    if targets:
        for name, option in targets[0].options.items():
            setattr(site, name, option)
    site.escaping = [n for n in site.chain if n in escaping]
    if site.inplace and site.escaping:
        raise Skip("logits changed in place are also returned by the graph")
    site.given_logits = _materialized_final_logits(walked, escaping)
    if torch.float64 in (site.logits_dtype, site.compute_dtype):
        raise Skip("float64 logits: the op computes in float32")
    _check_order(site, order)
    reason = classifier_skip_reason(site)
    if reason:
        raise Skip(reason)


def _materialized_final_logits(walked: Walk, escaping: set[Node]) -> Node | None:
    """The walk's final logits, where the graph computes them anyway in float32.

    They are computed anyway when they, or something made from them on the way
    to the consumer, are returned.  Half-precision logits are not read: the
    backward recomputes logits in float32, and its softmax must use the lse of
    the same logits.
    """
    final = walked.final_logits
    if final is None or walked.compute_dtype != torch.float32 or \
            N.value(final).dtype != torch.float32:
        return None
    above = walked.chain[:walked.chain.index(final) + 1]
    return final if any(n in escaping for n in above) else None


def _check_order(site: Site, order: dict[Node, int]) -> None:
    """The op goes before the first consumer; its inputs must be computed by then.

    An input computed later (``y.view(-1)`` written after ``logits.argmax()``,
    say) is moved up with whatever it needs, if all of that is pure and reads
    nothing the consumers make; ``site.hoist`` lists those nodes in order.
    """
    first = min((c.node for c in site.consumers), key=order.__getitem__)
    inputs = [site.hidden, site.classifier, site.bias, site.targets, site.weight]
    for op in site.row_ops:
        inputs += [e for e in getattr(op, "index", ()) if isinstance(e, Node)]
    late: set[Node] = set()
    pending = [n for n in inputs if isinstance(n, Node) and order[n] > order[first]]
    while pending:
        node = pending.pop()
        if node in late:
            continue
        if node.op not in ("call_function", "call_method") or node.is_impure() or \
                node in site.chain or steps.is_inplace(node):
            raise Skip(f"{node.name} is computed after {first.name} already reads the "
                       "logits")
        late.add(node)
        pending += [n for n in node.all_input_nodes if order[n] > order[first]]
    site.hoist = sorted(late, key=order.__getitem__)


def _skipped(node: Node, reason: str) -> Site:
    found_form = "cross_entropy" if N.is_function(node, N.CROSS_ENTROPY) else \
        "nll_loss" if N.is_function(node, N.NLL_LOSS) else "gather"
    return Site(anchor=node, form=found_form, skip_reason=reason)
