"""Float64 reference for the op, built from PyTorch's own operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Tolerances (rtol, atol) for comparing an output of the given input dtype with
# the float64 reference.  float32 is limited by float32 accumulation over D and
# V; the half types by the final rounding of the output to 8 (bf16) or 11
# (fp16) significant bits.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def reference_loss(e: Tensor, c: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                   weight: Tensor | None = None, ignore_index: int = -100,
                   reduction: str = "mean", label_smoothing: float = 0.0,
                   softcap: float | None = None, logit_scale: float = 1.0,
                   return_lse: bool = False):
    """The op's contract, written with materialized logits.

    Called on float64 copies it is the reference; it keeps the autograd graph so
    gradients can be taken through it.
    """
    z = e @ c.T
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    flat = z.reshape(-1, z.shape[-1])
    loss = F.cross_entropy(flat, targets.reshape(-1).long(), weight=weight,
                           ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.view(targets.shape)
    if return_lse:
        return loss, torch.logsumexp(z, -1)
    return loss


def float64_leaf(t: Tensor | None) -> Tensor | None:
    """A float64 copy of ``t`` that requires grad when ``t`` does."""
    if t is None:
        return None
    return t.detach().double().requires_grad_(t.requires_grad)
