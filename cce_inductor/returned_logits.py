"""The linear behind logits that a compiled graph returns next to its loss.

Hugging Face causal LMs return their logits next to the loss.  When the
caller only differentiates the loss, torch.compile still runs the backward of
the returned logits: the autograd engine hands the compiled backward a zero
gradient of shape (N, V), and the head's backward multiplies it by the
classifier and by the hidden states, two matmuls of N x V x D that add
nothing.  Without the rewrite the zeros are added to the loss's gradient
before one pair of matmuls, so they cost little; once the loss is fused they
would cost a second pair.

``torch.ops.cce.returned_logits`` is the same linear, ``x @ c.T``, whose
backward checks that upstream gradient on the CPU and skips both matmuls when
it is zero everywhere (the results are the same: zeros).  On other devices
the check would synchronize with the device, so it multiplies as a linear
does.  The rewrite puts it in place of the head's linear wherever the graph
returns the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dynamo_free import call_kernels_without_importing_dynamo


@torch.library.custom_op("cce::returned_logits", mutates_args=())
def returned_logits_op(x: Tensor, c: Tensor) -> Tensor:
    """``x @ c.T`` for hidden states x (..., D) and a classifier c (V, D)."""
    _check(x, c)
    return x @ c.T


@torch.library.custom_op("cce::returned_logits_backward", mutates_args=())
def returned_logits_backward_op(grad: Tensor, x: Tensor, c: Tensor,
                                needs_grad: list[bool]) -> tuple[Tensor, Tensor]:
    """Gradients for x and c (empty where ``needs_grad`` is False)."""
    need_x, need_c = needs_grad
    # count_nonzero reads the gradient once with no temporary (any() would
    # make a boolean copy of it, N x V bytes).
    if grad.device.type == "cpu" and int(torch.count_nonzero(grad)) == 0:
        return (torch.zeros_like(x) if need_x else x.new_empty(0),
                torch.zeros_like(c) if need_c else c.new_empty(0))
    rows = grad.reshape(-1, grad.shape[-1])
    return (grad @ c if need_x else x.new_empty(0),
            rows.T @ x.reshape(-1, x.shape[-1]) if need_c else c.new_empty(0))


def _check(x: Tensor, c: Tensor) -> None:
    if x.dim() < 1 or c.dim() != 2 or x.shape[-1] != c.shape[1]:
        raise ValueError(f"x must be (..., D) and c (V, D) with the same D, got "
                         f"{tuple(x.shape)} and {tuple(c.shape)}")
    if x.dtype != c.dtype:
        raise TypeError(f"x and c must have the same dtype, got {x.dtype} and {c.dtype}")


@returned_logits_op.register_fake
def _(x, c):
    _check(x, c)
    return x.new_empty((*x.shape[:-1], c.shape[0]))


@returned_logits_backward_op.register_fake
def _(grad, x, c, needs_grad):
    need_x, need_c = needs_grad
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(c) if need_c else c.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, c = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
    grad_x, grad_c = returned_logits_backward_op(grad, x, c, needs)
    return (grad_x if needs[0] else None, grad_c if needs[1] else None)


returned_logits_op.register_autograd(_backward, setup_context=_setup_context)
call_kernels_without_importing_dynamo(returned_logits_op, returned_logits_backward_op)


def returned_logits(x: Tensor, c: Tensor) -> Tensor:
    """``x @ c.T``, with a backward that skips a gradient of zeros on the CPU."""
    return returned_logits_op(x, c)
