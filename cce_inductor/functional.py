"""The public function: ``linear_cross_entropy``."""

from __future__ import annotations

import torch
from torch import Tensor

from .op import check_inputs, linear_cross_entropy_op, prefers_forward_gradients


def linear_cross_entropy(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of the logits ``e @ c.T`` without materializing them.

    Returns what this computes in float32, cast to e's dtype::

        z = (e @ c.T + bias) * logit_scale
        if softcap: z = softcap * tanh(z / softcap)
        F.cross_entropy(z, targets, weight=weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    Every edge case follows ``F.cross_entropy``: the mean is over rows that are
    not ignored (weighted by ``weight[target]`` when ``weight`` is given), it
    is NaN when every row is ignored, and ``reduction="none"`` returns shape
    ``targets.shape`` with zeros at ignored rows.

    Args:
        e: embeddings, shape (..., D), floating point.
        c: classifier, shape (V, D), same dtype as e (mixed dtypes are refused,
            as ``e @ c.T`` refuses them).
        targets: class indices, shape (...), any integer dtype.
        bias: optional (V,) bias of the classifier, c's dtype.
        weight: optional (V,) class weights (not differentiated).
        ignore_index: target value whose rows contribute nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        label_smoothing: in [0, 1].
        softcap: positive cap for ``softcap * tanh(z / softcap)``, or None.
        logit_scale: constant the logits are multiplied by (before softcap).
        return_lse: also return the per-row log-sum-exp (shape (...), float32,
            differentiable: a z-loss ``lse ** 2`` trains through it).

    Gradients flow to e, c and bias in their own dtypes; accumulation is in
    float32.

    What is checked: shapes, dtypes, devices and option values always, with an
    error naming the argument.  Target values outside [0, V) other than
    ``ignore_index`` raise ``ValueError`` on the CPU; on CUDA they trip a
    device-side assertion (as ``F.cross_entropy`` does there), since a host
    check would synchronize.
    """
    return fused_linear_cross_entropy(
        e, c, targets, bias, weight, ignore_index, reduction, label_smoothing, softcap,
        logit_scale, return_lse, loss_dtype=e.dtype)


def fused_linear_cross_entropy(
    e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None, weight: Tensor | None,
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None,
    logit_scale: float, return_lse: bool, *, loss_dtype: torch.dtype,
) -> Tensor | tuple[Tensor, Tensor]:
    """``linear_cross_entropy`` with the loss returned in ``loss_dtype``.

    This is what the graph rewrite calls: there the loss must come out in the
    dtype the original logits had (float32 after an upcast of bf16 logits,
    say), which need not be e's dtype.
    """
    if e.dim() < 1:
        raise ValueError("e must have at least one dimension (..., D)")
    if targets.shape != e.shape[:-1]:
        raise ValueError(
            f"targets must have e's leading shape {tuple(e.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    lead_shape = targets.shape
    e2 = e.reshape(-1, e.shape[-1])
    t1 = targets.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    check_inputs(e2, c, t1, bias, weight, reduction, float(label_smoothing), softcap,
                 float(logit_scale))

    scalar_loss = reduction != "none"
    grad_needed = torch.is_grad_enabled() and prefers_forward_gradients(e.device)
    precompute = [
        grad_needed and scalar_loss and not return_lse and t is not None
        and t.requires_grad
        for t in (e, c, bias)
    ]
    loss, lse, *_ = linear_cross_entropy_op(
        e2, c, t1, bias, weight, int(ignore_index), reduction, float(label_smoothing),
        softcap, float(logit_scale), precompute,
    )
    loss = loss.to(loss_dtype)
    if not scalar_loss:
        loss = loss.view(lead_shape)
    if return_lse:
        return loss, lse.view(lead_shape)
    return loss
