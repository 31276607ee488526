"""Vocabulary-parallel linear-cross-entropy: the classifier's rows split over ranks.

Every rank of ``group`` holds the same hidden states ``e`` (N, D) and targets,
and its own slice ``c_shard`` = rows ``[vocab_start, vocab_start + V_local)``
of the (V, D) classifier (shards may differ in size).  The loss is that of
``F.cross_entropy(e @ c.T, targets)`` over the whole vocabulary; no rank ever
holds more than a block of rows of its own N x V_local logits.

Forward, per row ``i`` (``z`` the logits after bias, scale and softcap)::

    m_r   = max_j z_ij                   over the rank's own classes
    s_r   = sum_j exp(z_ij - m_r)
    t_r   = z_iy if the rank owns y else 0
    w_r   = sum_j w_j z_ij               (label smoothing only)
    M     = all_reduce_max(m_r)
    lse   = M + log(all_reduce_sum(s_r * exp(m_r - M)))

then the loss of ``kernels/chunked.py``'s docstring from lse, the summed
target logit and the summed ``w_r``.  Backward: each rank recomputes its
logits block by block and forms its own slice of the gradient with respect to
the logits, which gives its dC and d(bias) slices without communication; dE
is the sum of every rank's ``dz @ c_shard`` and takes one all-reduce.

Forward and backward are two opaque custom ops
(``cce::vocab_parallel_linear_cross_entropy`` and ``..._backward``), so the
public function compiles under torch.compile without tracing into the
collectives or the data-dependent target check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from .kernels import chunked
from .op import REDUCTIONS, check_inputs, refuse_bad_targets


def vocab_parallel_linear_cross_entropy(
    e: Tensor,
    c_shard: Tensor,
    targets: Tensor,
    *,
    vocab_start: int,
    group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    logit_scale: float = 1.0,
    bias_shard: Tensor | None = None,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Cross-entropy over a classifier split by rows across the ranks of ``group``.

    Computes, on every rank, the same value as::

        z = (e @ c.T + bias) * logit_scale
        if softcap: z = softcap * tanh(z / softcap)
        F.cross_entropy(z, targets, weight=weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    where ``c`` (V, D) and ``bias`` (V,) are the concatenation of every rank's
    ``c_shard`` and ``bias_shard`` in ``vocab_start`` order.  Logits are never
    gathered: two all-reduces of (N,)-sized rows in the forward and one
    all-reduce of dE (N, D) in the backward.

    Args:
        e: hidden states, shape (..., D), identical on every rank.
        c_shard: this rank's rows of the classifier, shape (V_local, D), e's dtype.
            V_local may differ between ranks and may be zero.
        targets: global class indices, shape e.shape[:-1], identical on every rank.
        vocab_start: global index of ``c_shard``'s first row.
        group: the process group the vocabulary is split over (default: world).
        ignore_index: target value whose rows contribute nothing.
        reduction: ``"mean"`` (over rows not ignored; NaN when all are),
            ``"sum"`` or ``"none"`` (shape of ``targets``, zeros at ignored rows).
        softcap: positive cap for ``softcap * tanh(z / softcap)``, or None.
        logit_scale: constant the logits are multiplied by (before softcap).
        bias_shard: optional (V_local,) slice of the classifier bias.
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s.
        weight: optional (V,) class weights over the whole vocabulary, the same
            on every rank (not differentiated).
        vocab_size: V, the whole vocabulary's size; needed with label smoothing
            when no ``weight`` gives it.

    Returns:
        The loss in e's dtype (computed in float32), the same on every rank.
        Gradients flow to e (already summed over ranks: every rank receives the
        full dE), to ``c_shard`` and to ``bias_shard`` (this rank's slices).

    Target values outside the global vocabulary, other than ``ignore_index``,
    raise ``ValueError`` on the CPU and trip a device-side assertion elsewhere.
    """
    if e.dim() < 1:
        raise ValueError("e must have at least one dimension (..., D)")
    if targets.shape != e.shape[:-1]:
        raise ValueError(f"targets must have e's leading shape {tuple(e.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int, got {vocab_start!r}")
    e2 = e.reshape(-1, e.shape[-1])
    t1 = targets.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    check_inputs(e2, c_shard, t1, bias_shard, None, reduction, float(label_smoothing),
                 softcap, float(logit_scale))
    if weight is not None:
        if weight.dim() != 1 or not weight.is_floating_point() or \
                weight.shape[0] < vocab_start + c_shard.shape[0]:
            raise ValueError("weight must be a floating (V,) tensor over the whole "
                             f"vocabulary, got {weight.dtype} of shape {tuple(weight.shape)}")
        if vocab_size is not None and vocab_size != weight.shape[0]:
            raise ValueError(f"vocab_size ({vocab_size}) differs from weight's length "
                             f"({weight.shape[0]})")
        vocab_size = weight.shape[0]
    if label_smoothing and vocab_size is None:
        raise ValueError("vocab_size (the whole vocabulary's size) is required with "
                         "label_smoothing when no class weight is given")
    vocab = 0 if vocab_size is None else int(vocab_size)  # used by smoothing only
    spec = chunked.LossSpec(int(ignore_index), reduction, float(label_smoothing), softcap,
                            float(logit_scale))
    group = dist.group.WORLD if group is None else group
    loss, _ = vocab_parallel_op(e2, c_shard, t1, bias_shard, weight, vocab_start, vocab,
                                group.group_name, spec.ignore_index, reduction,
                                spec.label_smoothing, softcap, spec.logit_scale)
    loss = loss.to(e.dtype)
    return loss.view(targets.shape) if reduction == "none" else loss


class _Shard(chunked.LogitBlocks):
    """This rank's operands, which targets it owns, and its slice of the weights."""

    def __init__(self, e: Tensor, c: Tensor, bias: Tensor | None, targets: Tensor,
                 weight: Tensor | None, vocab_start: int, vocab: int,
                 spec: chunked.LossSpec) -> None:
        super().__init__(e, c, bias, spec)
        self.terms = chunked.row_terms(targets, weight, spec, vocab)
        self.global_vocab = vocab
        local = self.terms.targets - vocab_start
        self.owned = self.terms.valid & (local >= 0) & (local < self.vocab)
        self.local_targets = torch.where(self.owned, local, 0)
        self.local_weight = (None if weight is None else
                             weight[vocab_start:vocab_start + self.vocab].float())


def _all_reduce(t: Tensor, op: str, group: dist.ProcessGroup) -> Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t, op, group))


def _spec(ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None,
          logit_scale: float) -> chunked.LossSpec:
    return chunked.LossSpec(ignore_index, reduction, label_smoothing, softcap, logit_scale)


@torch.library.custom_op("cce::vocab_parallel_linear_cross_entropy", mutates_args=())
def vocab_parallel_op(
    e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None, weight: Tensor | None,
    vocab_start: int, vocab: int, group_name: str, ignore_index: int, reduction: str,
    label_smoothing: float, softcap: float | None, logit_scale: float,
) -> tuple[Tensor, Tensor]:
    """One rank's part of the loss: (float32 loss, float32 per-row lse).

    An opaque op, so that torch.compile traces through the public function
    (the collectives and the data-dependent target check run inside).
    """
    spec = _spec(ignore_index, reduction, label_smoothing, softcap, logit_scale)
    group = _resolve_process_group(group_name)
    shard = _Shard(e, c, bias, targets, weight, vocab_start, vocab, spec)
    smoothing = spec.label_smoothing > 0
    rows = e.shape[0]
    local_max = e.new_full((rows,), float("-inf"), dtype=torch.float32)
    local_sum = e.new_zeros(rows, dtype=torch.float32)
    target_logit = e.new_zeros(rows, dtype=torch.float32)
    weighted_sum = e.new_zeros(rows, dtype=torch.float32)
    if shard.vocab > 0:
        for block in shard.blocks():
            z, _ = shard.logits(block)
            picked = z.gather(1, shard.local_targets[block, None]).squeeze(1)
            target_logit[block] = torch.where(shard.owned[block], picked, 0.0)
            if smoothing:
                weighted_sum[block] = (z.sum(1) if shard.local_weight is None
                                       else z @ shard.local_weight)
            block_max = local_max[block] = z.amax(1)
            local_sum[block] = z.sub_(block_max[:, None]).exp_().sum(1)

    global_max = _all_reduce(local_max, "max", group)
    # The sum of exponentials, the target logit, how many ranks own each
    # target and the weighted sum all add up over ranks: one all-reduce.
    stacked = torch.stack([local_sum * (local_max - global_max).exp(), target_logit,
                           shard.owned.float(), weighted_sum])
    summed = _all_reduce(stacked, "sum", group)
    lse = global_max + summed[0].log()
    _check_ownership(shard.terms.valid, summed[2], targets, spec.ignore_index)
    row_loss = chunked.row_loss(shard.terms, spec, vocab, lse, summed[1],
                                summed[3] if smoothing else None)
    return chunked.reduce_rows(row_loss, shard.terms, spec.reduction), lse


@vocab_parallel_op.register_fake
def _(e, c, targets, bias, weight, vocab_start, vocab, group_name, ignore_index, reduction,
      label_smoothing, softcap, logit_scale):
    rows = e.shape[0]
    loss = e.new_empty((rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, e.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("cce::vocab_parallel_linear_cross_entropy_backward",
                         mutates_args=())
def vocab_parallel_backward_op(
    grad_loss: Tensor, e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None,
    weight: Tensor | None, lse: Tensor, vocab_start: int, vocab: int, group_name: str,
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None,
    logit_scale: float, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """dE (summed over ranks), this rank's dC and d(bias); empty where not needed."""
    spec = _spec(ignore_index, reduction, label_smoothing, softcap, logit_scale)
    shard = _Shard(e, c, bias, targets, weight, vocab_start, vocab, spec)
    need_e, need_c, need_bias = needs[0], needs[1], needs[2] and bias is not None
    terms, s = shard.terms, spec.label_smoothing
    grad_row = terms.upstream(grad_loss, spec.reduction)
    # d loss_i / d z_ij = a_i p_ij - (1 - s) w_y [j == y] - (s / V) w_j.
    softmax_coeff = grad_row * (1 - s) * terms.target_weight
    if s > 0:
        softmax_coeff = softmax_coeff + grad_row * (s * terms.weight_total / vocab)
    onehot = torch.where(shard.owned, grad_row * (1 - s) * terms.target_weight, 0.0)

    # dE is needed on every rank even when this one holds no classes,
    # since every rank takes part in its all-reduce.
    grad_e = torch.zeros_like(shard.e) if need_e else None
    grad_c = torch.zeros_like(shard.c) if need_c else None
    grad_bias = torch.zeros_like(shard.bias) if need_bias else None
    if shard.vocab > 0:
        for block in shard.blocks():
            z, tanh_u = shard.logits(block)
            g = z.sub_(lse[block, None]).exp_().mul_(softmax_coeff[block, None])
            g.scatter_add_(1, shard.local_targets[block, None], -onehot[block, None])
            if s > 0:
                w = 1.0 if shard.local_weight is None else shard.local_weight[None, :]
                g -= (grad_row[block] * (s / vocab))[:, None] * w
            g = shard.through_softcap_and_scale(g, tanh_u)
            if grad_e is not None:
                torch.mm(g, shard.c, out=grad_e[block])
            if grad_c is not None:
                grad_c.addmm_(g.T, shard.e[block])
            if grad_bias is not None:
                grad_bias += g.sum(0)
    if grad_e is not None:
        grad_e = _all_reduce(grad_e, "sum", _resolve_process_group(group_name))
    return (e.new_empty(0) if grad_e is None else grad_e.to(e.dtype),
            e.new_empty(0) if grad_c is None else grad_c.to(c.dtype),
            e.new_empty(0) if grad_bias is None else grad_bias.to(bias.dtype))


@vocab_parallel_backward_op.register_fake
def _(grad_loss, e, c, targets, bias, weight, lse, vocab_start, vocab, group_name,
      ignore_index, reduction, label_smoothing, softcap, logit_scale, needs):
    return (torch.empty_like(e) if needs[0] else e.new_empty(0),
            torch.empty_like(c) if needs[1] else e.new_empty(0),
            torch.empty_like(bias) if needs[2] and bias is not None else e.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    e, c, targets, bias, weight = inputs[:5]
    ctx.save_for_backward(e, c, targets, bias, weight, output[1])
    ctx.options = inputs[5:]


def _backward(ctx, grad_loss, grad_lse):
    e, c, targets, bias, weight, lse = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[3]]
    grads = vocab_parallel_backward_op(grad_loss, e, c, targets, bias, weight, lse,
                                       *ctx.options, needs)
    grad_e, grad_c, grad_bias = (g if need else None for g, need in zip(grads, needs))
    return (grad_e, grad_c, None, grad_bias, None) + (None,) * len(ctx.options)


vocab_parallel_op.register_autograd(_backward, setup_context=_setup_context)


def _check_ownership(valid: Tensor, owners: Tensor, targets: Tensor,
                     ignore_index: int) -> None:
    """Every target that is not ignored must fall in exactly one rank's shard."""
    refuse_bad_targets(
        valid & (owners != 1), targets,
        f"targets must be in [0, V) or equal ignore_index ({ignore_index}), and the "
        "shards' [vocab_start, vocab_start + V_local) ranges must tile [0, V): a target "
        "is in no rank's vocabulary shard (or in several)")
