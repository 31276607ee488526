"""Forward of the op on CUDA: fused Triton kernels, logits never leave the chip.

The grid is (row blocks) x (vocabulary splits), flattened into one axis and
ordered in groups of ``GROUP_N`` row blocks: the programs of one group run
side by side and share their rows of E, and programs of the same split walk
the same tiles of C at the same time.  Each program walks its split's
vocabulary tiles, computes each logit tile ``z`` (an fp32-accumulated matmul
over D followed by bias, logit_scale and softcap) and folds it into per-row
running statistics: max, sum of ``exp(z - max)``, the target logit (picked
from the tile that holds it) and, under label smoothing, the weighted sum
``sum_j w_j z_ij``.  On request it also keeps, for the entropy, the sum of
``exp(z - max) (z - max)`` (moved along with the running max, so that
``H = log S - that / S`` needs no cancellation between large numbers), and
for the argmax the largest logit after rounding to the caller's dtype with
its first column.  A second, small step in PyTorch combines the splits in a
fixed order (deterministic, no locks) and applies the formulas of
``chunked``'s module docstring to these per-row numbers.

The number of splits comes from the card's SM count and the row block of the
config that runs (``PROGRAMS_PER_SM`` programs per SM in all).

On request the forward also records the **tile maxima**: the largest logit of
every ``REC_N x REC_V`` block of the logit matrix, a (cdiv(N, REC_N),
cdiv(V, REC_V)) float32 matrix (2 MB at N=8192, V=256000).  The backward
uses it to skip tiles whose softmax cannot reach the filtering threshold
before doing their matmul (``triton_backward``).

Importing this module needs Triton; ``cce_inductor.op`` imports it lazily.
Set ``TRITON_INTERPRET=1`` before importing to run the kernels on CPU tensors
(slowly) under Triton's interpreter.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import config
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
# Row blocks per group of the program order.
GROUP_N = 8
# Granularity of the recorded tile maxima (every BLOCK_N and BLOCK_V of the
# forward and backward configs is a multiple of these).
REC_N = 8 if INTERPRET else 64
REC_V = 16 if INTERPRET else 64

Config = tuple[int, int, int, int, int]  # (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)

_FORWARD_GPU_CONFIGS: list[Config] = [
    (128, 256, 64, 8, 3),  # the pinned config when autotuning is off
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 32, 4, 3),  # fits fp32 operands on every card
]
# Configs whose pipelined operand tiles need more shared memory than this are
# left out (fp32 operands; an A100 has 164 KiB per SM, an H100 228 KiB).
SHARED_MEMORY_BYTES = 160 * 2**10


def shared_bytes(cfg: Config, itemsize: int) -> int:
    """Shared memory the pipelined E and C tiles of a config take."""
    n, v, d, _, stages = cfg
    return stages * (n + v) * d * itemsize
_INTERPRET_CONFIG: Config = (INTERPRET_BLOCK_N, INTERPRET_BLOCK_V, INTERPRET_BLOCK_D, 4, 1)


def candidate_configs(gpu_configs: list[Config], itemsize: int = 2) -> list[Config]:
    """The configs a kernel may run with for operands of ``itemsize`` bytes: a
    single one under the interpreter (which cannot benchmark several), the
    first that fits alone when ``config.triton_autotune`` is off, else every
    one that fits ``SHARED_MEMORY_BYTES``."""
    if INTERPRET:
        return [_INTERPRET_CONFIG]
    fitting = [cfg for cfg in gpu_configs if shared_bytes(cfg, itemsize) <= SHARED_MEMORY_BYTES]
    return fitting if config.triton_autotune else fitting[:1]


def autotune_configs(configs: list[Config]) -> list[triton.Config]:
    """Configs for ``triton.autotune``."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d}, num_warps=w,
                          num_stages=s) for n, v, d, w, s in configs]


def config_kwargs(cfg: Config) -> dict[str, int]:
    """Launch keywords that pin one config on a plain ``triton.jit`` kernel."""
    n, v, d, w, s = cfg
    return {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d, "num_warps": w, "num_stages": s}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 inputs
    unless PyTorch itself is allowed to use TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def n_bucket(num_rows: int) -> int:
    """The autotuning key's row count: the next power of two (tuning results
    are shared within a bucket)."""
    return 1 << max(num_rows - 1, 0).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
    """fp32 logits z of rows x cols (garbage outside the masks: mask them).

    Every index is widened to 64 bits before it meets a stride, so transposed
    views (a stride of N or V over D) cannot overflow."""
    row_mask = rows < N
    col_mask = cols < V
    e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_en
    c_rows = c_ptr + cols.to(tl.int64)[None, :] * stride_cv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_mask = dims < D
        dims64 = dims.to(tl.int64)
        e_tile = tl.load(e_rows + dims64[None, :] * stride_ed,
                         mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        c_tile = tl.load(c_rows + dims64[:, None] * stride_cd,
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


@triton.jit
def grouped_program(pid, num_row_blocks, num_splits, GROUP_N: tl.constexpr):
    """(row block, split) of program ``pid``: consecutive programs take
    consecutive row blocks of a group of ``GROUP_N`` at the same split."""
    per_group = GROUP_N * num_splits
    first = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_row_blocks - first, GROUP_N)
    local = pid % per_group
    return first + local % group_size, local // group_size


@triton.jit
def _rounded(z, ARGMAX_ROUND: tl.constexpr):
    """z rounded to the dtype the argmax is taken in (1: bfloat16, 2: float16)."""
    if ARGMAX_ROUND == 1:
        return z.to(tl.bfloat16).to(tl.float32)
    if ARGMAX_ROUND == 2:
        return z.to(tl.float16).to(tl.float32)
    return z


@triton.jit
def _forward_kernel(e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr,
                    max_ptr, sum_ptr, target_ptr, wsum_ptr, shifted_ptr,
                    best_ptr, best_index_ptr, tile_max_ptr,
                    N, V, D, N_BUCKET, stride_en, stride_ed, stride_cv, stride_cd,
                    stats_stride, rec_cols, logit_scale, softcap,
                    HAS_BIAS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
                    ENTROPY: tl.constexpr, ARGMAX: tl.constexpr, ARGMAX_ROUND: tl.constexpr,
                    RECORD: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    GROUP_N: tl.constexpr, REC_N: tl.constexpr, REC_V: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (row, split) statistics, each (N, stats_stride): max m, sum of
    exp(z - m), target logit (0 unless in this split), sum_j w_j z_ij; with
    ENTROPY ``sum_j exp(z_ij - m) (z_ij - m)``; with ARGMAX the largest
    rounded logit and its first column; with RECORD the tile maxima
    (cdiv(N, REC_N), rec_cols)."""
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_splits = tl.num_programs(0) // num_row_blocks
    row_block, split = grouped_program(tl.program_id(0), num_row_blocks, num_splits, GROUP_N)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
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
    shifted_sum = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int64)
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
        if RECORD:
            _record_tile_max(tile_max_ptr, z, row_mask, col_mask, row_block, tile,
                             N, V, rec_cols, REC_N, REC_V, BLOCK_N, BLOCK_V)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, 1))
        rescale = tl.exp(row_max - new_max)
        shifted = z - new_max[:, None]
        unnormalized = tl.exp(shifted)
        if ENTROPY:
            # Moving the reference from row_max to new_max (a step of delta)
            # turns sum e^u u into rescale * (sum e^u u - delta * sum e^u).
            # (rescale is 0 before the first tile; delta must stay finite there.)
            delta = tl.where(row_max == float("-inf"), 0.0, new_max - row_max)
            shifted_sum = rescale * (shifted_sum - delta * sum_exp) + tl.sum(
                unnormalized * tl.where(col_mask[None, :], shifted, 0.0), 1)
        sum_exp = sum_exp * rescale + tl.sum(unnormalized, 1)
        row_max = new_max
        if ARGMAX:
            rounded = _rounded(z, ARGMAX_ROUND)
            tile_best = tl.max(rounded, 1)
            tile_index = tl.argmax(rounded, 1, tie_break_left=True).to(tl.int64)
            better = tile_best > best  # ties keep the earlier column
            best_index = tl.where(better, tile * BLOCK_V + tile_index, best_index)
            best = tl.where(better, tile_best, best)

    at = rows.to(tl.int64) * stats_stride + split
    tl.store(max_ptr + at, row_max, mask=row_mask)
    tl.store(sum_ptr + at, sum_exp, mask=row_mask)
    tl.store(target_ptr + at, target_logit, mask=row_mask)
    tl.store(wsum_ptr + at, weighted_sum, mask=row_mask)
    if ENTROPY:
        tl.store(shifted_ptr + at, shifted_sum, mask=row_mask)
    if ARGMAX:
        tl.store(best_ptr + at, best, mask=row_mask)
        tl.store(best_index_ptr + at, best_index, mask=row_mask)


@triton.jit
def _record_tile_max(tile_max_ptr, z, row_mask, col_mask, row_block, tile, N, V, rec_cols,
                     REC_N: tl.constexpr, REC_V: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Stores the maxima of the REC_N x REC_V blocks of one logit tile."""
    valid = row_mask[:, None] & col_mask[None, :]
    blocks = tl.reshape(tl.where(valid, z, float("-inf")),
                        (BLOCK_N // REC_N, REC_N, BLOCK_V // REC_V, REC_V))
    maxima = tl.max(tl.max(blocks, 3), 1)  # (BLOCK_N // REC_N, BLOCK_V // REC_V)
    rec_rows = row_block * (BLOCK_N // REC_N) + tl.arange(0, BLOCK_N // REC_N)
    rec_col = tile * (BLOCK_V // REC_V) + tl.arange(0, BLOCK_V // REC_V)
    mask = (rec_rows[:, None] < tl.cdiv(N, REC_N)) & (rec_col[None, :] < rec_cols)
    tl.store(tile_max_ptr + rec_rows.to(tl.int64)[:, None] * rec_cols + rec_col[None, :],
             maxima, mask=mask)


def _autotuner_kwargs() -> dict[str, object]:
    # Tuning results on disk: later processes reuse the same choice (and so
    # compute the same bits) instead of timing again.
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


def _tuned(configs: tuple[Config, ...]):
    return triton.autotune(configs=autotune_configs(list(configs)), key=["V", "D", "N_BUCKET"],
                           **_autotuner_kwargs())(_forward_kernel)


# One autotuner per list of candidates (half-precision and fp32 operands).
_forward_tuned = functools.cache(_tuned)


def num_splits(num_rows: int, vocab: int, block_n: int, block_v: int,
               device: torch.device) -> int:
    """How many programs share the vocabulary of a block of rows, for a
    config with these blocks: ``PROGRAMS_PER_SM`` programs per SM in all."""
    tiles = triton.cdiv(vocab, block_v)
    if INTERPRET or device.type != "cuda":
        return max(1, min(INTERPRET_SPLITS, tiles))
    row_blocks = triton.cdiv(num_rows, block_n)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks), tiles))


_ARGMAX_ROUND = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def forward(e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
            weight: Tensor | None, spec: LossSpec,
            precompute: tuple[bool, bool, bool], with_entropy: bool = False,
            argmax_dtype: torch.dtype | None = None, *, tile_max: bool = False
            ) -> tuple[Tensor, ...]:
    """Float32 loss (reduced as ``spec.reduction`` says; empty without
    targets), per-row lse, entropy and argmax where asked, and three empty
    gradients: the contract of ``chunked.forward`` for ``precompute ==
    (False, False, False)``, the only value accepted.

    With ``tile_max=True`` an eighth tensor is appended: the tile maxima of
    the module docstring, for ``triton_backward.backward(..., tile_max=...)``.
    """
    if any(precompute):
        raise ValueError("the Triton forward does not precompute gradients; "
                         "use chunked.forward for that")
    if argmax_dtype not in _ARGMAX_ROUND:
        raise ValueError(f"argmax_dtype must be float32, bfloat16 or float16, got "
                         f"{argmax_dtype}")
    num_rows, dim = e.shape
    vocab = c.shape[0]
    device = e.device
    terms = None if targets is None else row_terms(targets, weight, spec, vocab)
    safe_targets = terms.targets if terms is not None else \
        torch.full((num_rows,), -1, device=device, dtype=torch.long)
    smoothing = spec.label_smoothing > 0 and terms is not None
    with_argmax = argmax_dtype is not None
    configs = candidate_configs(_FORWARD_GPU_CONFIGS, e.element_size())
    max_splits = max(num_splits(num_rows, vocab, n, v, device) for n, v, *_ in configs)
    # max, sum, target logit, weighted sum, shifted sum, best rounded logit
    stats = torch.zeros(6, num_rows, max_splits, device=device, dtype=torch.float32)
    stats[0].fill_(float("-inf"))  # splits that do not run stay neutral
    stats[5].fill_(float("-inf"))
    best_index = torch.zeros(num_rows, max_splits, device=device, dtype=torch.long)
    record = torch.empty(triton.cdiv(num_rows, REC_N), triton.cdiv(vocab, REC_V),
                         device=device, dtype=torch.float32) if tile_max else None
    if num_rows > 0:
        def grid(meta):
            blocks = triton.cdiv(num_rows, meta["BLOCK_N"])
            return (blocks * num_splits(num_rows, vocab, meta["BLOCK_N"], meta["BLOCK_V"],
                                        device),)
        args = (e, c, bias if bias is not None else e, weight if weight is not None else e,
                safe_targets, *stats.unbind(0), best_index,
                record if record is not None else stats,
                num_rows, vocab, dim, n_bucket(num_rows), e.stride(0), e.stride(1),
                c.stride(0), c.stride(1), max_splits, triton.cdiv(vocab, REC_V),
                float(spec.logit_scale), float(spec.softcap or 1.0))
        flags = dict(HAS_BIAS=bias is not None, HAS_WEIGHT=weight is not None,
                     HAS_SOFTCAP=spec.softcap is not None, SMOOTHING=smoothing,
                     ENTROPY=with_entropy, ARGMAX=with_argmax,
                     ARGMAX_ROUND=_ARGMAX_ROUND[argmax_dtype],
                     RECORD=tile_max, UPCAST=INTERPRET, DOT_PRECISION=dot_precision(e.dtype),
                     GROUP_N=GROUP_N, REC_N=REC_N, REC_V=REC_V)
        if len(configs) > 1:
            _forward_tuned(tuple(configs))[grid](*args, **flags)
        else:
            _forward_kernel[grid](*args, **flags, **config_kwargs(configs[0]))
    split_max, split_sum, split_target, split_wsum, split_shifted, split_best = \
        stats.unbind(0)
    row_max = split_max.amax(1)
    offset = split_max - row_max[:, None]  # <= 0; -inf for splits that saw nothing
    rescale = torch.exp(offset)
    sum_exp = (split_sum * rescale).sum(1)
    lse = row_max + sum_exp.log()

    entropy = e.new_empty(0, dtype=torch.float32)
    if with_entropy:  # H = log S - sum_j e^(z_j - m) (z_j - m) / S
        moved = torch.where(split_max == float("-inf"), 0.0,
                            rescale * (split_shifted + offset * split_sum))
        entropy = sum_exp.log() - moved.sum(1) / sum_exp
    argmax = e.new_empty(0, dtype=torch.long)
    if with_argmax:  # the first split holding the best value has the first column
        argmax = best_index.gather(1, split_best.argmax(1, keepdim=True)).squeeze(1)

    loss = e.new_empty(0, dtype=torch.float32)
    if terms is not None:
        target_logit = split_target.sum(1)
        weighted_sum = split_wsum.sum(1) if smoothing else None
        loss = reduce_rows(row_loss(terms, spec, vocab, lse, target_logit, weighted_sum),
                           terms, spec.reduction)
    empty = e.new_empty(0)
    out = (loss, lse, entropy, argmax, empty, empty, empty)
    return (*out, record) if tile_max else out
