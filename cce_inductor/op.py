"""The op's contract: schemas, argument checks, shapes, autograd and dispatch.

Two custom ops in the ``cce`` namespace carry the fused linear-cross-entropy
through torch.compile as opaque nodes:

``torch.ops.cce.linear_cross_entropy``
    e (N, D), c (V, D), targets (N,) or None -> loss, lse (N,), entropy (N,),
    argmax (N,), tile maxima and, where ``precompute_grads`` asks, the
    gradients for a unit upstream gradient (empty tensors otherwise).  ``loss`` is float32,
    (N,) for ``reduction="none"`` and () otherwise (empty without targets);
    callers cast it to the dtype the logits would have had.  ``lse`` and
    ``entropy`` (``-sum p log p``, empty unless ``with_entropy``) are float32;
    ``argmax`` is int64, the first largest logit of each row after rounding
    the logits to ``argmax_dtype`` (empty when that is None).  All of them
    come from the same pass over the vocabulary.  The tile maxima (the
    largest logit of each block of the logit matrix, float32) are filled
    where the Triton forward runs, for the backward to skip negligible tiles
    before their matmul; they are empty elsewhere.

``torch.ops.cce.linear_cross_entropy_backward``
    upstream gradients of loss, lse and entropy (and the forward's tile
    maxima) -> grad_e, grad_c, grad_bias (empty where not needed).

Computing the gradients during the forward saves recomputing every logit in
the backward (a third of the arithmetic); it is only valid when the loss is a
scalar and the lse is not used, which the public wrapper decides.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import Tensor

from ._dynamo_free import assume_constant_result, call_kernels_without_importing_dynamo
from .kernels import chunked
from .kernels.chunked import LossSpec

REDUCTIONS = ("mean", "sum", "none")


def check_inputs(e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
                 weight: Tensor | None, reduction: str, label_smoothing: float,
                 softcap: float | None, logit_scale: float) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument that is wrong.

    Only metadata is read (shapes, dtypes, devices, Python numbers), so this
    is safe on fake tensors and never synchronizes with a device.
    """
    if e.dim() != 2:
        raise ValueError(f"e must be 2-D (N, D) here, got shape {tuple(e.shape)}")
    if c.dim() != 2:
        raise ValueError(f"c must be 2-D (V, D), got shape {tuple(c.shape)}")
    if e.shape[1] != c.shape[1]:
        raise ValueError(
            f"e's last dimension ({e.shape[1]}) must equal c's second dimension "
            f"({c.shape[1]}): e is (..., D) and c is (V, D)"
        )
    if not e.is_floating_point():
        raise TypeError(f"e must be a floating-point tensor, got {e.dtype}")
    if e.dtype != c.dtype:
        raise TypeError(
            f"e and c must have the same dtype (like e @ c.T), got e: {e.dtype} "
            f"and c: {c.dtype}; cast one of them first"
        )
    if targets is not None and (targets.dtype.is_floating_point or
                                targets.dtype.is_complex or targets.dtype == torch.bool):
        raise TypeError(
            f"targets must hold integer class indices, got {targets.dtype} "
            "(probability targets are not supported)"
        )
    if targets is not None and (targets.dim() != 1 or targets.shape[0] != e.shape[0]):
        raise ValueError(
            f"targets must have one entry per row of e: expected shape "
            f"({e.shape[0]},), got {tuple(targets.shape)}"
        )
    for name, t in (("bias", bias), ("weight", weight)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != c.shape[0]:
            raise ValueError(
                f"{name} must have shape (V,) = ({c.shape[0]},), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if bias is not None and bias.dtype not in (c.dtype, torch.float32):
        raise TypeError(f"bias must have c's dtype {c.dtype} or float32, got {bias.dtype}")
    for name, t in (("c", c), ("targets", targets), ("bias", bias), ("weight", weight)):
        if t is not None and t.device != e.device:
            raise ValueError(f"{name} is on {t.device} but e is on {e.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None), got {softcap}")
    if not logit_scale == logit_scale or logit_scale in (float("inf"), float("-inf")):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")


def check_given_logits(logits: Tensor | None, e: Tensor, c: Tensor) -> None:
    """``logits``, when given, must be the (N, V) float32 logits of e and c."""
    if logits is None:
        return
    expected = (e.shape[0], c.shape[0])
    if tuple(logits.shape) != expected or logits.dtype != torch.float32 or \
            logits.device != e.device:
        raise ValueError(f"logits must be float32 of shape {expected} on {e.device}, got "
                         f"{logits.dtype} {tuple(logits.shape)} on {logits.device}")


def check_target_values(targets: Tensor | None, vocab: int, ignore_index: int) -> None:
    """Check that every target is in [0, V) or ``ignore_index``."""
    if targets is None:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    refuse_bad_targets(bad, targets, f"targets must be in [0, {vocab}) or equal "
                                     f"ignore_index ({ignore_index})")


def refuse_bad_targets(bad: Tensor, targets: Tensor, requirement: str) -> None:
    """Fail, stating ``requirement``, if any entry of ``bad`` is set.

    On the CPU this raises ``ValueError`` naming the first bad target;
    elsewhere it is a device-side assertion (no host synchronization), as
    PyTorch's own cross-entropy does.
    """
    if targets.device.type == "cpu":
        if bad.any():
            raise ValueError(f"{requirement}; found {targets[bad][0].item()}")
    else:
        torch._assert_async(~bad.any(), f"cce: {requirement}")


def _spec(ignore_index: int, reduction: str, label_smoothing: float,
          softcap: float | None, logit_scale: float) -> LossSpec:
    return LossSpec(ignore_index, reduction, label_smoothing, softcap, logit_scale)


@torch.library.custom_op("cce::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
    weight: Tensor | None, ignore_index: int, reduction: str, label_smoothing: float,
    softcap: float | None, logit_scale: float, precompute_grads: list[bool],
    with_entropy: bool = False, argmax_dtype: torch.dtype | None = None,
    logits: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring; e and targets are already flattened."""
    spec = _checked_spec(e, c, targets, bias, weight, ignore_index, reduction,
                         label_smoothing, softcap, logit_scale, logits)
    return _without_tile_maxima(chunked.forward(
        e, c, targets, bias, weight, spec, _three(precompute_grads), with_entropy,
        argmax_dtype, logits))


def _without_tile_maxima(outputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    loss, lse, entropy, argmax, *grads = outputs
    return (loss, lse, entropy, argmax, lse.new_empty(0), *grads)


@torch.library.custom_op("cce::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: Tensor | None, grad_lse: Tensor | None, grad_entropy: Tensor | None,
    e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
    weight: Tensor | None, lse: Tensor, entropy: Tensor, tile_max: Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None,
    logit_scale: float, needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for e, c and bias (empty tensors where ``needs_grad`` is False)."""
    spec = _spec(ignore_index, reduction, label_smoothing, softcap, logit_scale)
    return chunked.backward(grad_loss, grad_lse, e, c, targets, bias, weight, lse,
                            spec, _three(needs_grad), grad_entropy, entropy)


def _checked_spec(e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
                  weight: Tensor | None, ignore_index: int, reduction: str,
                  label_smoothing: float, softcap: float | None,
                  logit_scale: float, logits: Tensor | None = None) -> LossSpec:
    check_inputs(e, c, targets, bias, weight, reduction, label_smoothing, softcap,
                 logit_scale)
    check_given_logits(logits, e, c)
    check_target_values(targets, c.shape[0], ignore_index)
    return _spec(ignore_index, reduction, label_smoothing, softcap, logit_scale)


_triton: tuple[ModuleType, ModuleType] | None | bool = False  # False: not tried yet


def _triton_kernels() -> tuple[ModuleType, ModuleType] | None:
    """The Triton forward and backward modules, or None (warned about once)
    when Triton cannot be imported."""
    global _triton
    if _triton is False:
        try:
            from .kernels import triton_backward, triton_forward
            _triton = (triton_forward, triton_backward)
        except ImportError as err:
            logging.getLogger("cce_inductor").warning(
                "Triton is not available (%s): the CUDA path of cce::linear_cross_entropy "
                "falls back to the slower chunked PyTorch implementation", err)
            _triton = None
    return _triton


# Evaluated eagerly when traced: it may import Triton, which is no graph code.
@assume_constant_result
def prefers_forward_gradients(device: torch.device | str) -> bool:
    """Whether the op should compute gradients during the forward on ``device``.

    False where the fused Triton backward runs (CUDA with Triton): it
    recomputes logits cheaply and skips negligible tiles, and the forward
    then keeps no gradient-sized buffers alive.  True elsewhere.
    """
    return not (torch.device(device).type == "cuda" and _triton_kernels() is not None)


@linear_cross_entropy_op.register_kernel("cuda")
def _(e, c, targets, bias, weight, ignore_index, reduction, label_smoothing, softcap,
      logit_scale, precompute_grads, with_entropy=False, argmax_dtype=None, logits=None):
    spec = _checked_spec(e, c, targets, bias, weight, ignore_index, reduction,
                         label_smoothing, softcap, logit_scale, logits)
    flags = _three(precompute_grads)
    if not _triton_forward_serves(e, flags, logits):
        return _without_tile_maxima(chunked.forward(
            e, c, targets, bias, weight, spec, flags, with_entropy, argmax_dtype, logits))
    loss, lse, entropy, argmax, *grads, tile_max = _triton_kernels()[0].forward(
        e, c, targets, bias, weight, spec, flags, with_entropy, argmax_dtype, tile_max=True)
    return (loss, lse, entropy, argmax, tile_max, *grads)


def _triton_forward_serves(e: Tensor, flags: tuple[bool, bool, bool],
                           logits: Tensor | None) -> bool:
    """Whether the Triton forward computes this call from e and c; given
    logits and gradients formed in the forward take the chunked sweep."""
    return e.device.type == "cuda" and _triton_kernels() is not None and \
        not any(flags) and logits is None


@linear_cross_entropy_backward_op.register_kernel("cuda")
def _(grad_loss, grad_lse, grad_entropy, e, c, targets, bias, weight, lse, entropy,
      tile_max, ignore_index, reduction, label_smoothing, softcap, logit_scale, needs_grad):
    spec = _spec(ignore_index, reduction, label_smoothing, softcap, logit_scale)
    kernels = _triton_kernels()
    if kernels is None:
        return chunked.backward(grad_loss, grad_lse, e, c, targets, bias, weight, lse,
                                spec, _three(needs_grad), grad_entropy, entropy)
    return kernels[1].backward(grad_loss, grad_lse, e, c, targets, bias, weight, lse,
                               spec, _three(needs_grad), grad_entropy, entropy,
                               tile_max=tile_max if tile_max.numel() else None)


def _three(flags: list[bool]) -> tuple[bool, bool, bool]:
    if len(flags) != 3:
        raise ValueError(f"expected three flags (e, c, bias), got {flags}")
    return bool(flags[0]), bool(flags[1]), bool(flags[2])


def _fake_grads(e: Tensor, c: Tensor, bias: Tensor | None, need_e: bool, need_c: bool,
                need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(e) if need_e else e.new_empty(0),
        torch.empty_like(c) if need_c else e.new_empty(0),
        torch.empty_like(bias) if need_bias and bias is not None else e.new_empty(0),
    )


@linear_cross_entropy_op.register_fake
def _(e, c, targets, bias, weight, ignore_index, reduction, label_smoothing, softcap,
      logit_scale, precompute_grads, with_entropy=False, argmax_dtype=None, logits=None):
    check_inputs(e, c, targets, bias, weight, reduction, label_smoothing, softcap,
                 logit_scale)
    check_given_logits(logits, e, c)
    need_e, need_c, need_bias = _three(precompute_grads)
    num_rows = e.shape[0]
    loss_shape = (0,) if targets is None else (num_rows,) if reduction == "none" else ()
    loss = e.new_empty(loss_shape, dtype=torch.float32)
    lse = e.new_empty(num_rows, dtype=torch.float32)
    entropy = e.new_empty(num_rows if with_entropy else 0, dtype=torch.float32)
    argmax = e.new_empty(0 if argmax_dtype is None else num_rows, dtype=torch.long)
    tile_max_shape: tuple[int, ...] = (0,)
    if _triton_forward_serves(e, (need_e, need_c, need_bias), logits):
        forward_kernels = _triton_kernels()[0]
        tile_max_shape = (-(-num_rows // forward_kernels.REC_N),
                          -(-c.shape[0] // forward_kernels.REC_V))
    tile_max = e.new_empty(tile_max_shape, dtype=torch.float32)
    return (loss, lse, entropy, argmax, tile_max,
            *_fake_grads(e, c, bias, need_e, need_c, need_bias))


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_lse, grad_entropy, e, c, targets, bias, weight, lse, entropy,
      tile_max, ignore_index, reduction, label_smoothing, softcap, logit_scale, needs_grad):
    return _fake_grads(e, c, bias, *_three(needs_grad))


def _setup_context(ctx, inputs, output) -> None:
    (e, c, targets, bias, weight, ignore_index, reduction, label_smoothing, softcap,
     logit_scale, precompute_grads, *statistics) = inputs
    _, lse, entropy, argmax, tile_max, grad_e, grad_c, grad_bias = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(argmax, tile_max, grad_e, grad_c, grad_bias)
    ctx.save_for_backward(e, c, targets, bias, weight, lse, entropy, tile_max)
    ctx.options = (ignore_index, reduction, label_smoothing, softcap, logit_scale)
    ctx.has_loss = targets is not None
    ctx.has_entropy = bool(statistics and statistics[0])
    # Held as an attribute, not saved, so the backward can hand these buffers
    # to autograd without a copy; a second backward falls back to recomputing.
    ctx.precomputed = (grad_e, grad_c, grad_bias) if any(precompute_grads) else None
    ctx.precomputed_flags = _three(precompute_grads)


def _backward(ctx, grad_loss, grad_lse, grad_entropy, *unused_grads):
    e, c, targets, bias, weight, lse, entropy, tile_max = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             bias is not None and ctx.needs_input_grad[3])
    precomputed, ctx.precomputed = ctx.precomputed, None
    # Outputs that were not asked for are empty; gradients offered for them are not.
    grad_loss = grad_loss if ctx.has_loss else None
    grad_entropy = grad_entropy if ctx.has_entropy else None
    if grad_loss is None and grad_lse is None and grad_entropy is None:
        return (None,) * 14
    if (precomputed is not None and grad_lse is None and grad_entropy is None
            and all(have or not need
                    for have, need in zip(ctx.precomputed_flags, needs))):
        grads = tuple(g.mul_(grad_loss) if need else None
                      for g, need in zip(precomputed, needs))
    else:
        grads = linear_cross_entropy_backward_op(
            grad_loss, grad_lse, grad_entropy, e, c, targets, bias, weight, lse, entropy,
            tile_max, *ctx.options, list(needs),
        )
        grads = tuple(g if need else None for g, need in zip(grads, needs))
    grad_e, grad_c, grad_bias = grads
    return (grad_e, grad_c, None, grad_bias) + (None,) * 10


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
call_kernels_without_importing_dynamo(linear_cross_entropy_op, linear_cross_entropy_backward_op)
