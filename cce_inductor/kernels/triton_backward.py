"""Backward of the op on CUDA: recompute logit tiles, skip negligible ones.

Two deterministic kernels, each recomputing the logits it needs:

* ``_grad_e_kernel``: one program per block of rows walks the whole
  vocabulary and accumulates ``dE[rows] += G @ C[cols]``;
* ``_grad_c_kernel``: one program per block of vocabulary walks every row and
  accumulates ``dC[cols] += G.T @ E[rows]`` and ``dbias[cols] += sum(G)``.

A program is the only writer of its rows of the fp32 accumulator, so the sums
are formed in a fixed order (bitwise reproducible) without atomics or locks.
``G`` is the gradient with respect to ``x + bias`` (``x = e @ c.T``) given in
``chunked``'s module docstring; it is rounded to the operands' dtype for the
two matmuls, as PyTorch's own backward does with half-precision logits.

Gradient filtering: a tile is skipped when every entry satisfies
``|G_ij| <= eps * r_i`` (before the constant factor ``logit_scale``), where
``r_i = max(|a_i g_i + l_i|, |(1 - s) w_y g_i|)`` is the size of row i's
gradient (``g_i`` the upstream gradient of the row's loss, ``l_i`` that of its
lse).  For the plain loss that is the reference rule ``|softmax - onehot| <=
eps``.  The constant label-smoothing term ``(s / V) w_j`` is below the
threshold for large vocabularies, so in skipped tiles it is dropped with the
rest: leave filtering off (``config.filter_eps = None``) for exact gradients.

dC is accumulated in an fp32 buffer of at most ``GRAD_C_SCRATCH_BYTES`` (the
vocabulary is processed in groups that fit), dE in an (N, D) fp32 buffer; for
fp32 operands the outputs themselves are the accumulators.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from .chunked import LossSpec, row_terms
from .triton_forward import INTERPRET, autotune_configs, dot_precision, logits_tile

# Upper bound on the fp32 scratch for dC when c is not fp32.
GRAD_C_SCRATCH_BYTES = 256 * 2**20

_GRAD_GPU_CONFIGS = [
    # (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (128, 64, 64, 4, 3),
    (64, 128, 128, 8, 3),
]
# Vocabulary groups are multiples of this (the largest BLOCK_V above).
_GROUP_ALIGN = 256


@triton.jit
def _grad_tile(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, lse_ptr, coeff_ptr,
               onehot_ptr, smooth_ptr, threshold_ptr, rows, cols, N, V, D,
               stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
               HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               SMOOTHING: tl.constexpr, FILTER: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """fp32 gradient wrt x + bias of a tile (zero outside the masks) and
    whether any entry is above the filtering threshold."""
    row_mask = rows < N
    col_mask = cols < V
    z = logits_tile(e_ptr, c_ptr, bias_ptr, rows, cols, N, V, D,
                    stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                    HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coeff = tl.load(coeff_ptr + rows, mask=row_mask, other=0.0)
    onehot = tl.load(onehot_ptr + rows, mask=row_mask, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    g = coeff[:, None] * tl.exp(z - lse[:, None])
    g -= tl.where(cols[None, :] == targets[:, None], onehot[:, None], 0.0)
    if SMOOTHING:
        smooth = tl.load(smooth_ptr + rows, mask=row_mask, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            g -= smooth[:, None] * w[None, :]
        else:
            g -= smooth[:, None]
    if HAS_SOFTCAP:
        t = z / softcap
        g *= 1.0 - t * t
    g = tl.where(row_mask[:, None] & col_mask[None, :], g, 0.0)
    if FILTER:
        threshold = tl.load(threshold_ptr + rows, mask=row_mask, other=0.0)
        above = tl.where(tl.abs(g) > threshold[:, None], 1, 0)
        keep = tl.max(tl.max(above, 1), 0) > 0
    else:
        keep = True
    return g * logit_scale, keep


@triton.jit
def _add_product(out_rows, out_mask, lhs, src_rows, src_mask, stride_src_d, D,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """out[r, :] += lhs @ src, one BLOCK_D slice of D at a time.

    ``out_rows`` points at the fp32 output rows (contiguous over D, masked by
    ``out_mask``), ``src_rows`` at the source rows (stride ``stride_src_d``
    over D, masked by ``src_mask``).  Each program is the only writer of its
    output rows, so the read-modify-write needs no atomics.
    """
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        src = tl.load(src_rows + dims[None, :] * stride_src_d,
                      mask=src_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST:
            src = src.to(tl.float32)
        mask = out_mask[:, None] & dim_mask[None, :]
        acc = tl.load(out_rows + dims[None, :], mask=mask, other=0.0)
        acc = tl.dot(lhs, src, acc, input_precision=DOT_PRECISION)
        tl.store(out_rows + dims[None, :], acc, mask=mask)
    # Makes these stores visible to every thread of the program before the
    # next tile reads them back, whatever the layouts.
    tl.debug_barrier()


@triton.autotune(configs=autotune_configs(_GRAD_GPU_CONFIGS), key=["V", "D"],
                 reset_to_zero=["grad_e_ptr"])
@triton.jit
def _grad_e_kernel(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, lse_ptr, coeff_ptr,
                   onehot_ptr, smooth_ptr, threshold_ptr, grad_e_ptr, N, V, D,
                   stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                   HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, FILTER: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_e (N, D) fp32, zeroed beforehand, += G @ C over the vocabulary."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    out_rows = grad_e_ptr + rows.to(tl.int64)[:, None] * D
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        g, keep = _grad_tile(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, lse_ptr,
                             coeff_ptr, onehot_ptr, smooth_ptr, threshold_ptr, rows, cols,
                             N, V, D, stride_en, stride_ed, stride_cv, stride_cd,
                             logit_scale, softcap, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP,
                             SMOOTHING, FILTER, UPCAST, DOT_PRECISION,
                             BLOCK_N, BLOCK_V, BLOCK_D)
        if keep:
            g = g.to(e_ptr.dtype.element_ty)
            if UPCAST:
                g = g.to(tl.float32)
            c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_cv
            _add_product(out_rows, row_mask, g, c_rows, cols < V, stride_cd, D, UPCAST,
                         DOT_PRECISION, BLOCK_D)


@triton.autotune(configs=autotune_configs(_GRAD_GPU_CONFIGS), key=["V", "D"],
                 reset_to_zero=["grad_c_ptr", "grad_bias_ptr"])
@triton.jit
def _grad_c_kernel(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, lse_ptr, coeff_ptr,
                   onehot_ptr, smooth_ptr, threshold_ptr, grad_c_ptr, grad_bias_ptr, N, V, D,
                   stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                   HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, FILTER: tl.constexpr,
                   NEED_C: tl.constexpr, NEED_BIAS: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_c (V, D) fp32, zeroed beforehand, += G.T @ E over the rows, and
    grad_bias (V,) fp32 = column sums of G."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    out_cols = grad_c_ptr + cols.to(tl.int64)[:, None] * D
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        g, keep = _grad_tile(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, lse_ptr,
                             coeff_ptr, onehot_ptr, smooth_ptr, threshold_ptr, rows, cols,
                             N, V, D, stride_en, stride_ed, stride_cv, stride_cd,
                             logit_scale, softcap, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP,
                             SMOOTHING, FILTER, UPCAST, DOT_PRECISION,
                             BLOCK_N, BLOCK_V, BLOCK_D)
        if keep:
            if NEED_BIAS:
                bias_acc += tl.sum(g, 0)
            if NEED_C:
                g_t = tl.trans(g.to(e_ptr.dtype.element_ty))
                if UPCAST:
                    g_t = g_t.to(tl.float32)
                e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_en
                _add_product(out_cols, col_mask, g_t, e_rows, rows < N, stride_ed, D,
                             UPCAST, DOT_PRECISION, BLOCK_D)
    if NEED_BIAS:
        tl.store(grad_bias_ptr + cols, bias_acc, mask=col_mask)


def resolve_filter_eps(dtype: torch.dtype) -> float | None:
    """``config.filter_eps`` as a number: "auto" is finfo(dtype).eps / 32."""
    eps = config.filter_eps
    if eps is None:
        return None
    if isinstance(eps, str):
        if eps != "auto":
            raise ValueError(f"config.filter_eps must be 'auto', None or a float, got {eps!r}")
        return torch.finfo(dtype).eps / 32
    return float(eps)


def _group_rows(vocab: int, dim: int, itemsize: int) -> int:
    if itemsize == 4:
        return max(vocab, 1)
    rows = GRAD_C_SCRATCH_BYTES // (4 * max(dim, 1))
    return max(_GROUP_ALIGN, rows // _GROUP_ALIGN * _GROUP_ALIGN)


def backward(grad_loss: Tensor | None, grad_lse: Tensor | None, e: Tensor, c: Tensor,
             targets: Tensor, bias: Tensor | None, weight: Tensor | None, lse: Tensor,
             spec: LossSpec, needs: tuple[bool, bool, bool]
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients wrt e, c and bias (empty where ``needs`` says no): same
    contract as ``chunked.backward``, with ``config.filter_eps`` filtering."""
    num_rows, dim = e.shape
    vocab = c.shape[0]
    need_e, need_c, need_bias = needs
    need_bias = need_bias and bias is not None
    empty = e.new_empty(0)
    if not (need_e or need_c or need_bias):
        return empty, e.new_empty(0), e.new_empty(0)

    terms = row_terms(targets, weight, spec, vocab)
    s = spec.label_smoothing
    coeff = torch.zeros(num_rows, device=e.device, dtype=torch.float32)
    onehot = torch.zeros_like(coeff)
    smooth = torch.zeros_like(coeff)
    if grad_loss is not None:
        grad_row = grad_loss.float()
        if spec.reduction == "mean":
            grad_row = grad_row / terms.mean_denominator()
        grad_row = torch.where(terms.valid, grad_row.expand(num_rows), 0.0)
        coeff += grad_row * ((1 - s) * terms.target_weight + s * terms.weight_total / vocab)
        onehot = grad_row * (1 - s) * terms.target_weight
        smooth = grad_row * (s / vocab)
    if grad_lse is not None:
        coeff += grad_lse.float()
    eps = resolve_filter_eps(e.dtype)
    threshold = coeff if eps is None else eps * torch.maximum(coeff.abs(), onehot.abs())
    lse = lse.float().contiguous()

    flags = dict(
        HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=spec.softcap is not None, SMOOTHING=s > 0, FILTER=eps is not None,
        UPCAST=INTERPRET, DOT_PRECISION=dot_precision(e.dtype),
    )
    scalars = (float(spec.logit_scale), float(spec.softcap or 1.0))
    dummy = e  # stands for absent inputs; never read
    # Stands for absent outputs: the autotuner zeroes it, so it must not be e.
    no_output = torch.zeros(1, device=e.device, dtype=torch.float32)

    grad_e = empty
    if need_e:
        grad_e = torch.zeros(num_rows, dim, device=e.device, dtype=torch.float32)
        if num_rows > 0:
            _grad_e_kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]),)](
                e, c, bias if bias is not None else dummy,
                weight if weight is not None else dummy, terms.targets, lse, coeff,
                onehot, smooth, threshold, grad_e, num_rows, vocab, dim,
                e.stride(0), e.stride(1), c.stride(0), c.stride(1), *scalars, **flags,
            )
        grad_e = grad_e.to(e.dtype)

    grad_c = torch.zeros(vocab, dim, device=e.device, dtype=torch.float32) \
        if need_c and c.dtype == torch.float32 else None
    if need_c and grad_c is None:
        grad_c = torch.empty_like(c, memory_format=torch.contiguous_format)
    grad_bias = torch.zeros(vocab, device=e.device, dtype=torch.float32) \
        if need_bias else None
    if need_c or need_bias:
        group = _group_rows(vocab, dim, c.element_size()) if need_c else max(vocab, 1)
        scratch = None
        if need_c and grad_c.dtype != torch.float32:
            scratch = torch.empty(min(group, vocab), dim, device=e.device,
                                  dtype=torch.float32)
        for v0 in range(0, vocab if num_rows > 0 else 0, group):
            v1 = min(v0 + group, vocab)
            if need_c:
                out_c = grad_c[v0:v1] if scratch is None else scratch[: v1 - v0].zero_()
            else:
                out_c = no_output
            _grad_c_kernel[lambda meta, n=v1 - v0: (triton.cdiv(n, meta["BLOCK_V"]),)](
                e, c[v0:v1], bias[v0:v1] if bias is not None else dummy,
                weight[v0:v1] if weight is not None else dummy, terms.targets - v0, lse,
                coeff, onehot, smooth, threshold, out_c,
                grad_bias[v0:v1] if need_bias else no_output, num_rows, v1 - v0, dim,
                e.stride(0), e.stride(1), c.stride(0), c.stride(1), *scalars,
                NEED_C=need_c, NEED_BIAS=need_bias, **flags,
            )
            if scratch is not None:
                grad_c[v0:v1] = out_c
        if scratch is not None and num_rows == 0:
            grad_c.zero_()
    grad_c = empty if grad_c is None else grad_c.to(c.dtype)
    grad_bias = empty if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_e, grad_c, grad_bias
