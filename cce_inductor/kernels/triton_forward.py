"""Forward of the op on CUDA: fused Triton kernels, logits never leave the chip.

The grid is (row blocks) x (vocabulary splits).  Each program walks its
split's vocabulary tiles, computes each logit tile ``z`` (an fp32-accumulated
matmul over D followed by bias, logit_scale and softcap) and folds it into
per-row running statistics: max, sum of ``exp(z - max)``, the target logit
(picked from the tile that holds it) and, under label smoothing, the weighted
sum ``sum_j w_j z_ij``.  A second, small step in PyTorch combines the splits
in a fixed order (deterministic, no locks) and applies the formulas of
``chunked``'s module docstring to these per-row numbers.

Importing this module needs Triton; ``cce_inductor.op`` imports it lazily.
Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors
(slowly) under Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .chunked import LossSpec, reduce_rows, row_loss, row_terms

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block sizes for the interpreter (also the single config it may be given):
# small, so tiny test shapes still span several tiles in every dimension.
INTERPRET_BLOCK_N = 16
INTERPRET_BLOCK_V = 32
INTERPRET_BLOCK_D = 16
# Vocabulary splits under the interpreter: more than one, so the combination
# step (and an empty split) is exercised by small tests.
INTERPRET_SPLITS = 3
# On a GPU, aim for this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 2
# Nominal row block used to decide the number of vocabulary splits.
NOMINAL_BLOCK_N = 128

_FORWARD_GPU_CONFIGS = [
    # (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
]


def autotune_configs(gpu_configs: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs for ``triton.autotune``: the given ones on a GPU, a single one
    under the interpreter (which cannot benchmark several)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": INTERPRET_BLOCK_N, "BLOCK_V": INTERPRET_BLOCK_V,
                               "BLOCK_D": INTERPRET_BLOCK_D}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w,
                          num_stages=s) for n, v, d, w, s in gpu_configs]


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 inputs
    unless PyTorch itself is allowed to use TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def tanh(x):
    """tanh from exp (portable to the interpreter); saturates to +-1."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def logits_tile(e_ptr, c_ptr, bias_ptr, rows, cols, N, V, D,
                stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits z of rows x cols (garbage outside the masks: mask them)."""
    row_mask = rows < N
    col_mask = cols < V
    e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_en
    c_rows = c_ptr + cols.to(tl.int64)[None, :] * stride_cv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        e_tile = tl.load(e_rows + dims[None, :] * stride_ed,
                         mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        c_tile = tl.load(c_rows + dims[:, None] * stride_cd,
                         mask=dim_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            e_tile = e_tile.to(tl.float32)
            c_tile = c_tile.to(tl.float32)
        acc = tl.dot(e_tile, c_tile, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * logit_scale
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc


@triton.autotune(configs=autotune_configs(_FORWARD_GPU_CONFIGS), key=["V", "D"])
@triton.jit
def _forward_kernel(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr,
                    max_ptr, sum_ptr, target_ptr, wsum_ptr,
                    N, V, D, stride_en, stride_ed, stride_cv, stride_cd, num_splits,
                    logit_scale, softcap,
                    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (row, split) statistics, each (N, num_splits): max, sum of
    exp(z - max), target logit (0 unless in this split), sum_j w_j z_ij."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    num_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    row_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    weighted_sum = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, last):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = logits_tile(e_ptr, c_ptr, bias_ptr, rows, cols, N, V, D,
                        stride_en, stride_ed, stride_cv, stride_cd, logit_scale, softcap,
                        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
                        BLOCK_N, BLOCK_V, BLOCK_D)
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), 1)
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            else:
                w = tl.where(col_mask, 1.0, 0.0)
            weighted_sum += tl.sum(tl.where(col_mask[None, :], z * w[None, :], 0.0), 1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, 1))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + \
            tl.sum(tl.exp(z - new_max[:, None]), 1)
        row_max = new_max

    at = rows.to(tl.int64) * num_splits + split
    tl.store(max_ptr + at, row_max, mask=row_mask)
    tl.store(sum_ptr + at, sum_exp, mask=row_mask)
    tl.store(target_ptr + at, target_logit, mask=row_mask)
    tl.store(wsum_ptr + at, weighted_sum, mask=row_mask)


def num_splits(num_rows: int, vocab: int, block_v: int, device: torch.device) -> int:
    """How many programs share the vocabulary of a block of rows."""
    tiles = triton.cdiv(vocab, block_v)
    if INTERPRET or device.type != "cuda":
        return max(1, min(INTERPRET_SPLITS, tiles))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = triton.cdiv(num_rows, NOMINAL_BLOCK_N)
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks), tiles))


def _largest_block_v() -> int:
    if INTERPRET:
        return INTERPRET_BLOCK_V
    return max(v for _, v, _, _, _ in _FORWARD_GPU_CONFIGS)


def forward(e: Tensor, c: Tensor, targets: Tensor, bias: Tensor | None,
            weight: Tensor | None, spec: LossSpec,
            precompute: tuple[bool, bool, bool]
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Float32 loss (reduced as ``spec.reduction`` says) and per-row lse
    (float32), plus three empty tensors: same contract as ``chunked.forward``
    for ``precompute == (False, False, False)``, the only value accepted."""
    if any(precompute):
        raise ValueError("the Triton forward does not precompute gradients; "
                         "use chunked.forward for that")
    num_rows, dim = e.shape
    vocab = c.shape[0]
    terms = row_terms(targets, weight, spec, vocab)
    smoothing = spec.label_smoothing > 0
    splits = num_splits(num_rows, vocab, _largest_block_v(), e.device)
    stats = torch.empty(4, num_rows, splits, device=e.device, dtype=torch.float32)
    if num_rows > 0:
        def grid(meta):
            return triton.cdiv(num_rows, meta["BLOCK_N"]), splits
        _forward_kernel[grid](
            e, c, bias if bias is not None else e, weight if weight is not None else e,
            terms.targets, *stats.unbind(0), num_rows, vocab, dim, e.stride(0), e.stride(1),
            c.stride(0), c.stride(1), splits, float(spec.logit_scale),
            float(spec.softcap or 1.0),
            HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None,
            HAS_SOFTCAP=spec.softcap is not None, SMOOTHING=smoothing,
            UPCAST=INTERPRET, DOT_PRECISION=dot_precision(e.dtype),
        )
    split_max, split_sum, split_target, split_wsum = stats.unbind(0)
    row_max = split_max.amax(1)
    sum_exp = (split_sum * torch.exp(split_max - row_max[:, None])).sum(1)
    lse = row_max + sum_exp.log()
    target_logit = split_target.sum(1)

    weighted_sum = split_wsum.sum(1) if smoothing else None
    loss = reduce_rows(row_loss(terms, spec, vocab, lse, target_logit, weighted_sum),
                       terms, spec.reduction)
    return loss, lse, e.new_empty(0), e.new_empty(0), e.new_empty(0)
