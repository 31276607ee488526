"""Backward of the op on CUDA: each kept logit tile is recomputed once.

Notation of ``chunked``'s module docstring.  The gradient with respect to
``x + bias`` (``x = e @ c.T``) is ``G = S - T`` times ``logit_scale``, where

* ``S_ij = d_ij (coeff_i p_ij - smooth_i w_j - h_i p_ij (log p_ij + H_i))``
  is the **tile part** (``d_ij`` the softcap's derivative, 1 without
  softcap; ``h_i`` the upstream gradient of the entropy ``H_i``, 0 when it
  is not differentiated), computed tile by tile, and
* ``T_ij = onehot_i d_iy [j == y_i]`` is the **target part**, one entry per
  row, applied outside the tiles.

Three steps, in this order on one stream:

1. ``_target_kernel`` (one program per block of rows) forms each row's target
   logit by a dot product, its coefficient ``t_i = onehot_i d_iy logit_scale``
   and writes ``dE_i = -t_i C_{y_i}``.
2. A keep mask per (row block, vocabulary block) tile.  With filtering and the
   forward's tile maxima ``M`` (``triton_forward``), a tile is skipped when for
   every row ``|coeff_i| exp(M - lse_i) + |smooth_i| max|w| <= eps r_i``: no
   entry of its tile part can pass the filter, decided without its matmul.
3. ``_tile_kernel``: one program per vocabulary block (plenty at any N) walks
   the row blocks in order.  For each kept tile it computes ``z`` once, forms
   ``S``, checks the filter entry by entry, and adds ``S.T @ E[rows]`` to its
   own rows of dC and ``S @ C[cols]`` to the rows of dE.  It then adds the
   target part of its columns to dC (the rows whose target it holds, in row
   order) and writes its columns of dbias.

Determinism: every sum is formed in a fixed order, whatever the timing.
dC[cols] and dbias[cols] have one writer.  dE[rows] receives the kept tiles
of its row block in increasing vocabulary order: a per-row-block ticket says
whose turn it is (the rank of the tile among the row block's kept tiles,
computed beforehand), and programs take their vocabulary block from an atomic
counter, so a program only ever waits for programs that started before it
(no deadlock).  The backward runs one pinned config per shape
(``grad_config``), never autotuned, so the order does not change between
processes either.

Filtering: a tile is skipped when every entry satisfies ``|S_ij| <= eps r_i``
(before the constant factor ``logit_scale``), where ``r_i = max(|coeff_i|,
|onehot_i|)`` is the size of row i's gradient.  For the plain loss that is the
reference rule on ``softmax - onehot``, except that the target entry is never
dropped.  The constant label-smoothing term ``(s / V) w_j`` is below the
threshold for large vocabularies, so in skipped tiles it is dropped with the
rest: leave filtering off (``config.filter_eps = None``) for exact gradients.

Accumulation: with filtering on, dE and dC are accumulated in the outputs
themselves (fp32 arithmetic, rounded to their dtype once per kept tile): no
scratch beyond a few small per-tile tables.  With filtering off and
half-precision operands, dE goes through an (N, D) fp32 buffer and dC through
an fp32 buffer of at most ``GRAD_C_SCRATCH_BYTES`` (the vocabulary is then
processed in groups that fit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import config
from .chunked import LossSpec, row_terms
from .triton_forward import (
    INTERPRET,
    INTERPRET_BLOCK_D,
    INTERPRET_BLOCK_N,
    INTERPRET_BLOCK_V,
    REC_N,
    REC_V,
    Config,
    config_kwargs,
    dot_precision,
    logits_tile,
    tanh,
)

# Upper bound on the fp32 scratch for dC in exact mode when c is not fp32.
GRAD_C_SCRATCH_BYTES = 256 * 2**20
# Vocabulary groups are multiples of this (the largest BLOCK_V of grad_config).
_GROUP_ALIGN = 256
# Slack of the tile-maxima test, in units of the logits: the forward's and the
# backward's logits may differ in their last bits (different tile orders).
SKIP_MARGIN = 1e-3
# Rows per program of the target kernel.
TARGET_BLOCK_N = 16 if INTERPRET else 64


def grad_config(num_rows: int, dim: int, itemsize: int = 2) -> Config:
    """The one config the backward runs for this shape and operand size
    (never autotuned, so its summation order is the same in every process).
    Its BLOCK_N and BLOCK_V are multiples of the tile maxima's REC_N and
    REC_V; fp32 operands take BLOCK_D=32 to fit shared memory."""
    if INTERPRET:
        return (INTERPRET_BLOCK_N, INTERPRET_BLOCK_V, INTERPRET_BLOCK_D, 4, 1)
    block_d = 64 if itemsize <= 2 else 32
    if num_rows >= 4096:
        return (128, 128, block_d, 8, 3)
    return (64, 128, block_d, 4, 3)


@triton.jit
def _tile_part(e_ptr, c_ptr, bias_ptr, weight_ptr, lse_ptr, coeff_ptr, smooth_ptr,
               threshold_ptr, entropy_ptr, entropy_coeff_ptr, rows, cols, N, V, D,
               stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
               HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               SMOOTHING: tl.constexpr, ENTROPY: tl.constexpr, FILTER: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """The tile part S of a tile, times logit_scale (fp32, zero outside the
    masks), and whether any entry passes the filter."""
    row_mask = rows < N
    col_mask = cols < V
    z = logits_tile(e_ptr, c_ptr, bias_ptr, rows, cols, N, V, D,
                    stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                    HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    coeff = tl.load(coeff_ptr + rows, mask=row_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    g = coeff[:, None] * p
    if ENTROPY:  # dH/dz = -p (log p + H)
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        entropy_coeff = tl.load(entropy_coeff_ptr + rows, mask=row_mask, other=0.0)
        g -= entropy_coeff[:, None] * p * (log_p + entropy[:, None])
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
    """out[r, :] += lhs @ src, one BLOCK_D slice of D at a time, in fp32.

    ``out_rows`` points at the output rows (contiguous over D, masked by
    ``out_mask``; fp32 or the operands' dtype), ``src_rows`` at the source
    rows (stride ``stride_src_d`` over D, masked by ``src_mask``).  The caller
    makes sure nobody else writes these rows meanwhile.
    """
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        src = tl.load(src_rows + dims.to(tl.int64)[None, :] * stride_src_d,
                      mask=src_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST:
            src = src.to(tl.float32)
        mask = out_mask[:, None] & dim_mask[None, :]
        acc = tl.load(out_rows + dims[None, :], mask=mask, other=0.0,
                      cache_modifier=".cg").to(tl.float32)
        acc = tl.dot(lhs, src, acc, input_precision=DOT_PRECISION)
        tl.store(out_rows + dims[None, :], acc.to(out_rows.dtype.element_ty), mask=mask)
    # Makes these stores visible to every thread of the program before the
    # next tile reads them back, whatever the layouts.
    tl.debug_barrier()


@triton.jit
def _target_kernel(e_ptr, c_ptr, bias_ptr, targets_ptr, onehot_ptr, coef_ptr, grad_e_ptr,
                   N, D, stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                   HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, NEED_E: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """coef_i = onehot_i d_iy logit_scale (fp32, N) and, with NEED_E, the
    first write of dE: dE_i = -coef_i C[y_i] (every row, ignored rows too)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=0)
    onehot = tl.load(onehot_ptr + rows, mask=row_mask, other=0.0)
    e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_en
    c_rows = c_ptr + targets.to(tl.int64)[:, None] * stride_cv
    coef = onehot * logit_scale
    if HAS_SOFTCAP:
        dot = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < D)[None, :]
            dims64 = dims.to(tl.int64)[None, :]
            e_tile = tl.load(e_rows + dims64 * stride_ed, mask=mask, other=0.0)
            c_tile = tl.load(c_rows + dims64 * stride_cd, mask=mask, other=0.0)
            dot += tl.sum(e_tile.to(tl.float32) * c_tile.to(tl.float32), 1)
        if HAS_BIAS:
            dot += tl.load(bias_ptr + targets, mask=row_mask, other=0.0).to(tl.float32)
        t = tanh(dot * logit_scale / softcap)
        coef = coef * (1.0 - t * t)
    tl.store(coef_ptr + rows, coef, mask=row_mask)
    if NEED_E:
        out_rows = grad_e_ptr + rows.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dims < D)[None, :]
            c_tile = tl.load(c_rows + dims.to(tl.int64)[None, :] * stride_cd, mask=mask,
                             other=0.0)
            value = -coef[:, None] * c_tile.to(tl.float32)
            tl.store(out_rows + dims[None, :], value.to(grad_e_ptr.dtype.element_ty),
                     mask=mask)


@triton.jit
def _tile_kernel(e_ptr, c_ptr, bias_ptr, weight_ptr, lse_ptr, coeff_ptr, smooth_ptr,
                 threshold_ptr, entropy_ptr, entropy_coeff_ptr, keep_ptr, rank_ptr,
                 ticket_ptr, counter_ptr, sorted_rows_ptr, starts_ptr, targets_ptr, coef_ptr,
                 grad_e_ptr, grad_c_ptr, grad_bias_ptr,
                 N, V, D, stride_en, stride_ed, stride_cv, stride_cd,
                 first_block, num_blocks, acc_v0, logit_scale, softcap,
                 HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, ENTROPY: tl.constexpr,
                 FILTER: tl.constexpr, NEED_E: tl.constexpr, NEED_C: tl.constexpr,
                 NEED_BIAS: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One vocabulary block (of ``num_blocks`` from ``first_block``) per
    program: its kept tiles' contributions to dE, dC and dbias, then the
    target part of its columns (module docstring, step 3).

    ``keep`` and ``rank`` are (row blocks, num_blocks) int32; ``ticket`` is
    (row blocks,) int32 and ``counter`` (1,) int32, both zero at launch.
    ``grad_c``'s row 0 is column ``acc_v0``."""
    local = tl.atomic_add(counter_ptr, 1)  # start order, not launch order
    block = first_block + local
    cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    out_cols = grad_c_ptr + (cols - acc_v0).to(tl.int64)[:, None] * D
    c_cols = c_ptr + cols.to(tl.int64)[:, None] * stride_cv
    bias_acc = tl.zeros((BLOCK_V,), tl.float32)
    for row_block in range(0, tl.cdiv(N, BLOCK_N)):
        at = row_block * num_blocks + local
        if tl.load(keep_ptr + at) != 0:
            rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            g, above = _tile_part(e_ptr, c_ptr, bias_ptr, weight_ptr, lse_ptr, coeff_ptr,
                                  smooth_ptr, threshold_ptr, entropy_ptr, entropy_coeff_ptr,
                                  rows, cols, N, V, D,
                                  stride_en, stride_ed, stride_cv, stride_cd,
                                  logit_scale, softcap, HAS_BIAS, HAS_WEIGHT, HAS_SOFTCAP,
                                  SMOOTHING, ENTROPY, FILTER, UPCAST, DOT_PRECISION,
                                  BLOCK_N, BLOCK_V, BLOCK_D)
            g_low = g.to(e_ptr.dtype.element_ty)
            if UPCAST:
                g_low = g_low.to(tl.float32)
            if above:
                if NEED_BIAS:
                    bias_acc += tl.sum(g, 0)
                if NEED_C:
                    e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_en
                    _add_product(out_cols, col_mask, tl.trans(g_low), e_rows, row_mask,
                                 stride_ed, D, UPCAST, DOT_PRECISION, BLOCK_D)
            if NEED_E:
                rank = tl.load(rank_ptr + at)
                while tl.atomic_add(ticket_ptr + row_block, 0, sem="acquire") != rank:
                    pass
                tl.debug_barrier()
                if above:
                    out_rows = grad_e_ptr + rows.to(tl.int64)[:, None] * D
                    _add_product(out_rows, row_mask, g_low, c_cols, col_mask, stride_cd, D,
                                 UPCAST, DOT_PRECISION, BLOCK_D)
                tl.atomic_xchg(ticket_ptr + row_block, rank + 1, sem="release")

    # The target part of these columns, rows in increasing order.
    start = tl.load(starts_ptr + block)
    stop = tl.load(starts_ptr + block + 1)
    for k in range(start, stop):
        row = tl.load(sorted_rows_ptr + k)
        target = tl.load(targets_ptr + row)
        coef = tl.load(coef_ptr + row)
        if NEED_BIAS:
            bias_acc -= tl.where(cols == target, coef, 0.0)
        if NEED_C:
            out = grad_c_ptr + (target - acc_v0).to(tl.int64) * D
            e_row = e_ptr + row.to(tl.int64) * stride_en
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_mask = dims < D
                src = tl.load(e_row + dims.to(tl.int64) * stride_ed, mask=dim_mask, other=0.0)
                acc = tl.load(out + dims, mask=dim_mask, other=0.0,
                              cache_modifier=".cg").to(tl.float32)
                acc -= coef * src.to(tl.float32)
                tl.store(out + dims, acc.to(grad_c_ptr.dtype.element_ty), mask=dim_mask)
            tl.debug_barrier()
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


def row_cutoffs(lse: Tensor, coeff: Tensor, smooth: Tensor, threshold: Tensor,
                weight_max: float | Tensor) -> Tensor:
    """Per row, the logit a tile's maximum must pass for the row to keep the
    tile: ``|coeff| exp(z - lse) + |smooth| weight_max > threshold`` needs
    ``z > lse + log((threshold - |smooth| weight_max) / |coeff|)``.  +inf when
    the row never keeps a tile, -inf when it keeps every tile."""
    slack = threshold - smooth.abs() * weight_max
    cutoff = lse + torch.log(slack.clamp_min(torch.finfo(torch.float32).tiny)) \
        - torch.log(coeff.abs())
    cutoff = torch.where(coeff == 0, math.inf, cutoff)
    return torch.where(slack <= 0, -math.inf, cutoff)


def keep_mask(tile_max: Tensor, cutoffs: Tensor, block_n: int, block_v: int,
              num_rows: int, vocab: int) -> Tensor:
    """(row blocks, vocabulary blocks) bool: the tiles of ``block_n x
    block_v`` whose recorded maximum passes the lowest cutoff of their rows
    (less ``SKIP_MARGIN``).  A skipped tile has no entry above the filter."""
    if block_n % REC_N or block_v % REC_V:
        raise ValueError(f"tiles of {block_n} x {block_v} do not align with the tile "
                         f"maxima's {REC_N} x {REC_V}")
    row_blocks, vocab_blocks = triton.cdiv(num_rows, block_n), triton.cdiv(vocab, block_v)
    bound = F.max_pool2d(tile_max[None, None], (block_n // REC_N, block_v // REC_V),
                         ceil_mode=True)[0, 0]
    padded = torch.full((row_blocks * block_n,), math.inf, device=cutoffs.device)
    padded[:num_rows] = cutoffs
    lowest = padded.view(row_blocks, block_n).amin(1)
    keep = bound > (lowest - SKIP_MARGIN)[:, None]
    assert keep.shape == (row_blocks, vocab_blocks)
    return keep


def backward(grad_loss: Tensor | None, grad_lse: Tensor | None, e: Tensor, c: Tensor,
             targets: Tensor | None, bias: Tensor | None, weight: Tensor | None,
             lse: Tensor, spec: LossSpec, needs: tuple[bool, bool, bool],
             grad_entropy: Tensor | None = None, entropy: Tensor | None = None, *,
             tile_max: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients wrt e, c and bias (empty where ``needs`` says no): same
    contract as ``chunked.backward``, with ``config.filter_eps`` filtering.

    ``tile_max``, the forward's tile maxima (``triton_forward.forward(...,
    tile_max=True)``), lets filtering skip tiles before their matmul; without
    it every tile's logits are computed once and checked.  The entropy's
    gradient ``-p (log p + H)`` is never filtered: with ``grad_entropy`` every
    tile is computed."""
    num_rows, dim = e.shape
    vocab = c.shape[0]
    need_e, need_c, need_bias = needs
    need_bias = need_bias and bias is not None
    if not (need_e or need_c or need_bias):
        return e.new_empty(0), e.new_empty(0), e.new_empty(0)
    device = e.device

    if targets is None:  # no loss: every row's target part is zero
        grad_loss = None
        targets = torch.full((num_rows,), spec.ignore_index, device=device,
                             dtype=torch.long)
    terms = row_terms(targets, weight, spec, vocab)
    s = spec.label_smoothing
    coeff = torch.zeros(num_rows, device=device, dtype=torch.float32)
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
    with_entropy = grad_entropy is not None
    if with_entropy:
        entropy_coeff = grad_entropy.float().contiguous()
        entropy = entropy.float().contiguous()
    eps = None if with_entropy else resolve_filter_eps(e.dtype)
    threshold = coeff if eps is None else eps * torch.maximum(coeff.abs(), onehot.abs())
    lse = lse.float().contiguous()

    block_n, block_v, block_d, warps, stages = grad_config(num_rows, dim, e.element_size())
    row_blocks, vocab_blocks = triton.cdiv(num_rows, block_n), triton.cdiv(vocab, block_v)
    if eps is not None and tile_max is not None and num_rows > 0:
        # A tensor, not a float: no device synchronization.
        weight_max = 0.0 if s == 0 or weight is None or weight.numel() == 0 else \
            weight.abs().max().float()
        if s > 0 and weight is None:
            weight_max = 1.0
        cutoffs = row_cutoffs(lse, coeff, smooth, threshold, weight_max)
        keep = keep_mask(tile_max, cutoffs, block_n, block_v, num_rows, vocab)
    else:
        keep = torch.ones(row_blocks, vocab_blocks, device=device, dtype=torch.bool)
    keep = keep.to(torch.int32)

    flags = dict(
        HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None,
        HAS_SOFTCAP=spec.softcap is not None, SMOOTHING=s > 0, ENTROPY=with_entropy,
        FILTER=eps is not None,
        UPCAST=INTERPRET, DOT_PRECISION=dot_precision(e.dtype),
    )
    scalars = (float(spec.logit_scale), float(spec.softcap or 1.0))
    strides = (e.stride(0), e.stride(1), c.stride(0), c.stride(1))
    dummy = e  # stands for absent inputs and outputs; never read or written

    # Accumulators: the outputs themselves with filtering (or fp32 operands),
    # fp32 buffers in exact mode.
    direct = eps is not None
    acc_e_dtype = e.dtype if direct else torch.float32
    acc_c_dtype = c.dtype if direct else torch.float32
    grad_e = torch.empty(num_rows, dim, device=device, dtype=acc_e_dtype) if need_e else None
    grad_c = None
    if need_c:
        grad_c = torch.zeros(vocab, dim, device=device, dtype=c.dtype) \
            if direct or c.dtype == torch.float32 else torch.empty(vocab, dim, device=device,
                                                                   dtype=c.dtype)
    grad_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if need_bias else None

    coef = torch.zeros(num_rows, device=device, dtype=torch.float32)
    if num_rows > 0:
        _target_kernel[(triton.cdiv(num_rows, TARGET_BLOCK_N),)](
            e, c, bias if bias is not None else dummy, terms.targets, onehot, coef,
            grad_e if grad_e is not None else dummy, num_rows, dim, *strides, *scalars,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=spec.softcap is not None, NEED_E=need_e,
            UPCAST=INTERPRET, BLOCK_N=TARGET_BLOCK_N, BLOCK_D=block_d,
        )
    # Rows by target (stable: increasing row order within a target); rows
    # without a target part go last, past every block's range.
    sort_key = torch.where(onehot != 0, terms.targets, vocab)
    order = torch.sort(sort_key, stable=True)
    sorted_rows = order.indices.to(torch.int32)
    block_starts = torch.arange(vocab_blocks + 1, device=device, dtype=torch.int64) * block_v
    starts = torch.searchsorted(order.values, block_starts.clamp_max(vocab)).to(torch.int32)

    # Vocabulary groups: one in filtered mode; in exact mode as many as the
    # fp32 dC buffer needs.
    scratch = None
    group_blocks = vocab_blocks
    if need_c and grad_c.dtype != acc_c_dtype:
        group_rows = _group_rows(vocab, dim, c.element_size())
        group_blocks = max(1, group_rows // block_v)
        scratch = torch.empty(min(group_blocks * block_v, vocab), dim, device=device,
                              dtype=torch.float32)
    ticket = torch.zeros(row_blocks, device=device, dtype=torch.int32)
    counter = torch.zeros(1, device=device, dtype=torch.int32)
    for first in range(0, vocab_blocks if num_rows > 0 else 0, group_blocks):
        blocks = min(group_blocks, vocab_blocks - first)
        group_keep = keep[:, first:first + blocks].contiguous()
        rank = (torch.cumsum(group_keep, 1, dtype=torch.int32) - group_keep).contiguous()
        ticket.zero_()
        counter.zero_()
        v0 = first * block_v
        out_c = grad_c if scratch is None else scratch.zero_()
        _tile_kernel[(blocks,)](
            e, c, bias if bias is not None else dummy, weight if weight is not None else dummy,
            lse, coeff, smooth, threshold, entropy if with_entropy else lse,
            entropy_coeff if with_entropy else lse, group_keep, rank, ticket, counter,
            sorted_rows, starts, terms.targets, coef,
            grad_e if grad_e is not None else dummy, out_c if need_c else dummy,
            grad_bias if grad_bias is not None else dummy,
            num_rows, vocab, dim, *strides, first, blocks, 0 if scratch is None else v0,
            *scalars, NEED_E=need_e, NEED_C=need_c, NEED_BIAS=need_bias, **flags,
            **config_kwargs((block_n, block_v, block_d, warps, stages)),
        )
        if scratch is not None:
            v1 = min(v0 + blocks * block_v, vocab)
            grad_c[v0:v1] = scratch[: v1 - v0]
    if scratch is not None and num_rows == 0:
        grad_c.zero_()
    if grad_e is not None and num_rows == 0:
        grad_e.zero_()
    empty = e.new_empty(0)
    return (empty if grad_e is None else grad_e.to(e.dtype),
            empty if grad_c is None else grad_c.to(c.dtype),
            empty if grad_bias is None else grad_bias.to(bias.dtype))
