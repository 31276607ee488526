"""Portable linear-cross-entropy in plain PyTorch, a block of rows at a time.

This is the implementation behind the op on every device without a faster
kernel (the CPU, and CUDA without Triton).  At most ``rows_per_chunk x V``
logits exist at any moment; they are computed in float32 from float32 copies
of the operands.

Notation used throughout: for a row ``i`` with target ``y``, ``x = e @ c.T``,
``u = (x + bias) * logit_scale``, ``z = softcap * tanh(u / softcap)`` (or
``z = u``), ``p = softmax(z)``, ``w`` the class weights (all ones when absent),
``W = sum(w)`` and ``s`` the label smoothing.  The per-row loss that
``F.cross_entropy`` computes is then

    loss_i = a_i * lse_i - (1 - s) * w_y * z_iy - (s / V) * sum_j w_j z_ij,
    a_i    = (1 - s) * w_y + s * W / V,

and its derivative with respect to ``z_ij`` is

    a_i * p_ij - (1 - s) * w_y * [j == y] - (s / V) * w_j.

Ignored rows contribute nothing to the loss; the mean divides by the sum of
``w_y`` over the rows that are not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Logits budget per block of rows.  32 MiB keeps the working set next to the
# operands small while the matmuls stay large enough to run at full speed.
LOGITS_BYTES_PER_CHUNK = 32 * 2**20


@dataclass(frozen=True)
class LossSpec:
    """The options of the loss that do not change from row to row."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    logit_scale: float


def rows_per_chunk(num_rows: int, vocab: int) -> int:
    """How many rows of logits fit in ``LOGITS_BYTES_PER_CHUNK`` (at least one)."""
    return max(1, min(num_rows, LOGITS_BYTES_PER_CHUNK // (4 * max(vocab, 1))))


class _Operands:
    """Float32 views of the inputs and the per-row constants of the loss."""

    def __init__(self, e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None,
                 weight: Tensor | None, spec: LossSpec) -> None:
        self.spec = spec
        self.e = e.float()
        self.c = c.float()
        self.bias = None if bias is None else bias.float()
        self.vocab = c.shape[0]
        self.weight = None if weight is None else weight.float()
        self.weight_total = (
            float(self.vocab) if weight is None else self.weight.sum()
        )
        self.valid = targets != spec.ignore_index
        self.safe_targets = torch.where(self.valid, targets, 0).long()
        if weight is None:
            self.target_weight = self.valid.float()
        else:
            self.target_weight = torch.where(
                self.valid, self.weight[self.safe_targets], 0.0
            )

    def mean_denominator(self) -> Tensor:
        return self.target_weight.sum()

    def logits(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """Float32 logits of ``rows`` and, under softcap, ``tanh(u / softcap)``."""
        spec = self.spec
        z = self.e[rows] @ self.c.T
        if self.bias is not None:
            z += self.bias
        if spec.logit_scale != 1.0:
            z *= spec.logit_scale
        if spec.softcap is None:
            return z, None
        t = torch.tanh(z / spec.softcap)
        return t * spec.softcap, t

    def row_loss(self, rows: slice, z: Tensor, lse: Tensor) -> Tensor:
        """Unreduced loss of ``rows`` (zero where ignored), float32."""
        s = self.spec.label_smoothing
        w_y = self.target_weight[rows]
        target_logit = z.gather(1, self.safe_targets[rows, None]).squeeze(1)
        loss = (1 - s) * w_y * (lse - target_logit)
        if s > 0:
            weighted_sum = z.sum(1) if self.weight is None else z @ self.weight
            loss = loss + (s / self.vocab) * (self.weight_total * lse - weighted_sum)
            loss = torch.where(self.valid[rows], loss, 0.0)
        return loss

    def grad_wrt_pre_scale(self, rows: slice, z: Tensor, tanh_u: Tensor | None,
                           lse: Tensor, grad_row: Tensor | None,
                           grad_lse: Tensor | None) -> Tensor:
        """Gradient with respect to ``x + bias``, overwriting ``z``.

        ``grad_row`` is the upstream gradient of each row's loss (already zero
        at ignored rows), ``grad_lse`` that of each row's log-sum-exp.
        """
        s = self.spec.label_smoothing
        p = z.sub_(lse[:, None]).exp_()
        coeff = torch.zeros_like(lse)
        if grad_row is not None:
            w_y = self.target_weight[rows]
            coeff += grad_row * ((1 - s) * w_y + s * self.weight_total / self.vocab)
        if grad_lse is not None:
            coeff += grad_lse.float()
        g = p.mul_(coeff[:, None])
        if grad_row is not None:
            onehot = grad_row * (1 - s) * self.target_weight[rows]
            g.scatter_add_(1, self.safe_targets[rows, None], -onehot[:, None])
            if s > 0:
                w = 1.0 if self.weight is None else self.weight[None, :]
                g -= (grad_row * (s / self.vocab))[:, None] * w
        if tanh_u is not None:
            g.mul_(tanh_u.square_().neg_().add_(1.0))
        if self.spec.logit_scale != 1.0:
            g.mul_(self.spec.logit_scale)
        return g


class _GradAccumulator:
    """dE, dC and d(bias), filled a block of rows at a time in float32 (dC, dbias)."""

    def __init__(self, ops: _Operands, e: Tensor, c: Tensor, bias: Tensor | None,
                 needs: tuple[bool, bool, bool]) -> None:
        self.ops = ops
        self.needs = needs
        self.grad_e = torch.empty_like(e) if needs[0] else e.new_empty(0)
        self.grad_c = torch.zeros_like(c, dtype=torch.float32) if needs[1] else None
        self.grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32)
            if needs[2] and bias is not None else None
        )
        self._e = e
        self._c_dtype, self._bias_dtype = c.dtype, None if bias is None else bias.dtype

    def add(self, rows: slice, g: Tensor) -> None:
        if self.needs[0]:
            self.grad_e[rows] = g @ self.ops.c
        if self.grad_c is not None:
            self.grad_c.addmm_(g.T, self.ops.e[rows])
        if self.grad_bias is not None:
            self.grad_bias += g.sum(0)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients in their tensors' dtypes; empty where not asked for."""
        e = self._e
        grad_c = e.new_empty(0) if self.grad_c is None else self.grad_c.to(self._c_dtype)
        grad_bias = (
            e.new_empty(0) if self.grad_bias is None
            else self.grad_bias.to(self._bias_dtype)
        )
        return self.grad_e, grad_c, grad_bias


def _row_grad(ops: _Operands, grad_loss: Tensor | None) -> Tensor | None:
    """The upstream gradient of every row's loss, zero at ignored rows."""
    if grad_loss is None:
        return None
    spec = ops.spec
    g = grad_loss.float()
    if spec.reduction == "mean":
        g = g / ops.mean_denominator()
    return torch.where(ops.valid, g.expand(ops.valid.shape), 0.0)


def forward(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None,
            weight: Tensor | None, spec: LossSpec,
            precompute: tuple[bool, bool, bool]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, per-row lse and, where ``precompute`` asks, the gradients for a unit
    upstream gradient (valid only for the scalar reductions)."""
    ops = _Operands(e, c, targets, bias, weight, spec)
    num_rows = e.shape[0]
    lse = e.new_empty(num_rows, dtype=torch.float32)
    row_loss = e.new_empty(num_rows, dtype=torch.float32)
    grads = _GradAccumulator(ops, e, c, bias, precompute) if any(precompute) else None
    grad_row = _row_grad(ops, e.new_ones((), dtype=torch.float32)) if grads else None

    step = rows_per_chunk(num_rows, ops.vocab)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        z, tanh_u = ops.logits(rows)
        lse[rows] = torch.logsumexp(z, 1)
        row_loss[rows] = ops.row_loss(rows, z, lse[rows])
        if grads is not None:
            g = ops.grad_wrt_pre_scale(rows, z, tanh_u, lse[rows], grad_row[rows], None)
            grads.add(rows, g)

    if spec.reduction == "none":
        loss = row_loss
    elif spec.reduction == "sum":
        loss = row_loss.sum()
    else:
        loss = row_loss.sum() / ops.mean_denominator()
    if grads is None:
        grad_e, grad_c, grad_bias = (e.new_empty(0) for _ in range(3))
    else:
        grad_e, grad_c, grad_bias = grads.result()
    return loss.to(e.dtype), lse, grad_e, grad_c, grad_bias


def backward(grad_loss: Tensor | None, grad_lse: Tensor | None, e: Tensor, c: Tensor,
             targets: Tensor, bias: Tensor | None, weight: Tensor | None, lse: Tensor,
             spec: LossSpec, needs: tuple[bool, bool, bool]
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the loss (upstream ``grad_loss``) and of the returned lse
    (upstream ``grad_lse``) with respect to e, c and bias, recomputing logits."""
    ops = _Operands(e, c, targets, bias, weight, spec)
    grads = _GradAccumulator(ops, e, c, bias, needs)
    grad_row = _row_grad(ops, grad_loss)
    num_rows = e.shape[0]
    step = rows_per_chunk(num_rows, ops.vocab)
    for start in range(0, num_rows, step):
        rows = slice(start, min(start + step, num_rows))
        z, tanh_u = ops.logits(rows)
        g = ops.grad_wrt_pre_scale(
            rows, z, tanh_u, lse[rows],
            None if grad_row is None else grad_row[rows],
            None if grad_lse is None else grad_lse[rows],
        )
        grads.add(rows, g)
    return grads.result()
