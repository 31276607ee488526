"""Cut Cross-Entropy for torch.compile: the loss over a large vocabulary without
the N x V logits."""

from .functional import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
__version__ = "0.1.0"
