"""The public function: ``linear_cross_entropy``."""

from __future__ import annotations

import torch
from torch import Tensor

from .op import check_inputs, linear_cross_entropy_op, prefers_forward_gradients

# Matches no target: every row is kept.
NO_IGNORE_INDEX = -(2**63)


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


def linear_log_probs(
    e: Tensor,
    c: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each target under ``softmax(z)``, without the logits.

    ``z`` is as in ``linear_cross_entropy`` (pass ``logit_scale=1 / T`` for a
    sampling temperature ``T``).  Returns ``log_softmax(z, -1).gather(-1,
    targets[..., None]).squeeze(-1)`` in float32, shape ``targets.shape``,
    and with ``return_entropy`` also the entropy ``-sum(p * log p)`` of each
    row, from the same pass over the vocabulary.  Both are differentiable.
    Every target must be in [0, V).
    """
    out = fused_linear_cross_entropy(
        e, c, targets, bias, None, NO_IGNORE_INDEX, "none", 0.0, softcap, logit_scale,
        False, loss_dtype=torch.float32, return_entropy=return_entropy)
    if return_entropy:
        loss, entropy = out
        return -loss, entropy
    return -out


def linear_entropy(e: Tensor, c: Tensor, *, bias: Tensor | None = None,
                   softcap: float | None = None, logit_scale: float = 1.0) -> Tensor:
    """Entropy ``-sum(p * log p)`` of ``softmax(z)`` for each row of ``e``
    (``z`` as in ``linear_cross_entropy``), float32, differentiable, shape
    ``e.shape[:-1]``."""
    _, entropy = fused_linear_cross_entropy(
        e, c, None, bias, None, NO_IGNORE_INDEX, "none", 0.0, softcap, logit_scale,
        False, loss_dtype=torch.float32, return_entropy=True)
    return entropy


def linear_argmax(e: Tensor, c: Tensor, *, bias: Tensor | None = None,
                  softcap: float | None = None, logit_scale: float = 1.0) -> Tensor:
    """The predicted class ``z.argmax(-1)`` for each row of ``e`` (``z`` as in
    ``linear_cross_entropy``, computed in float32), int64, shape
    ``e.shape[:-1]``.  Ties go to the first index, as ``torch.argmax``."""
    _, argmax = fused_linear_cross_entropy(
        e, c, None, bias, None, NO_IGNORE_INDEX, "none", 0.0, softcap, logit_scale,
        False, loss_dtype=torch.float32, argmax_dtype=torch.float32)
    return argmax


def fused_linear_cross_entropy(
    e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
    weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    softcap: float | None, logit_scale: float, return_lse: bool, *,
    loss_dtype: torch.dtype, return_entropy: bool = False,
    argmax_dtype: torch.dtype | None = None, logits: Tensor | None = None,
) -> Tensor | tuple[Tensor | None, ...]:
    """``linear_cross_entropy`` with the loss returned in ``loss_dtype``, and the
    per-row statistics on request.

    This is what the graph rewrite calls: there the loss must come out in the
    dtype the original logits had (float32 after an upcast of bf16 logits,
    say), which need not be e's dtype.  ``logits``, where the graph computes
    them anyway (returned next to the loss), are the final float32 logits of
    the rows of ``e``, read by the forward instead of recomputed; they get no
    gradient from here.  Returns the loss alone, or, when any of
    ``return_lse``, ``return_entropy`` or ``argmax_dtype`` asks for more, the
    tuple ``(loss, lse, entropy, argmax)`` without the ones not asked for;
    ``loss`` is None where ``targets`` is None.  The argmax is taken over the
    logits rounded to ``argmax_dtype``, so that ties fall where they fall for
    logits of that dtype.
    """
    if e.dim() < 1:
        raise ValueError("e must have at least one dimension (..., D)")
    if targets is not None and targets.shape != e.shape[:-1]:
        raise ValueError(
            f"targets must have e's leading shape {tuple(e.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a string, got {type(reduction).__name__}")
    lead_shape = e.shape[:-1]
    e2 = e.reshape(-1, e.shape[-1])
    t1 = None if targets is None else targets.reshape(-1)
    softcap = None if softcap is None else float(softcap)
    check_inputs(e2, c, t1, bias, weight, reduction, float(label_smoothing), softcap,
                 float(logit_scale))

    scalar_loss = targets is not None and reduction != "none"
    grad_needed = torch.is_grad_enabled() and prefers_forward_gradients(e.device)
    precompute = [
        grad_needed and scalar_loss and not return_lse and not return_entropy
        and t is not None and t.requires_grad
        for t in (e, c, bias)
    ]
    loss, lse, entropy, argmax, *_ = linear_cross_entropy_op(
        e2, c, t1, bias, weight, int(ignore_index), reduction, float(label_smoothing),
        softcap, float(logit_scale), precompute, bool(return_entropy), argmax_dtype,
        None if logits is None else logits.detach().reshape(-1, c.shape[0]),
    )
    if targets is None:
        loss = None
    else:
        loss = loss.to(loss_dtype)
        if not scalar_loss:
            loss = loss.view(lead_shape)
    extras = [out.view(lead_shape) for out, wanted in
              ((lse, return_lse), (entropy, return_entropy), (argmax, argmax_dtype is not None))
              if wanted]
    return (loss, *extras) if extras else loss
