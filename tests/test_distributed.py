"""Two CPU ranks over gloo: DDP, FSDP2 and tensor parallelism with the rewrite,
and the vocabulary-parallel loss, each against a single-process float64 run.

Each test spawns one pair of processes and runs all its cases there, since
starting a process (importing torch) costs seconds.  Workers assert on their
own; a failure in either rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from reference import TOLERANCES, float64_leaf, reference_loss

WORLD = 2

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, worker_name: str, done_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        globals()[worker_name](rank)
        dist.barrier()
        open(os.path.join(done_dir, f"rank{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def spawn(worker_name: str) -> None:
    """Run ``worker_name(rank)`` on two gloo ranks; raise if either fails."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as done_dir:
        try:
            mp.spawn(_entry, args=(_free_port(), worker_name, done_dir), nprocs=WORLD)
        except mp.ProcessExitedException:
            # Gloo's threads occasionally abort a process while it tears the
            # group down, after every check passed; only a rank that did not
            # get that far is a failure.
            if sorted(os.listdir(done_dir)) != [f"rank{r}" for r in range(WORLD)]:
                raise


class _Rewrites(logging.Handler):
    """Collects what the graph pass logs about each loss it meets."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logger = logging.getLogger("cce_inductor")
        logger.setLevel(logging.INFO)
        logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def rewritten(self) -> int:
        return sum("rewrote" in m for m in self.messages)


# --- vocabulary parallel -------------------------------------------------------

VP_CASES = {
    "even_plain": {"splits": (18, 18)},
    "uneven_bias_ignored": {"splits": (20, 17), "bias": True, "ignored": 0.3},
    "uneven_softcap_scale_sum": {"splits": (20, 17), "softcap": 2.5, "logit_scale": 1.7,
                                 "reduction": "sum", "ignored": 0.2},
    "none_softcap_bias": {"splits": (9, 28), "softcap": 1.5, "bias": True,
                          "reduction": "none", "ignored": 0.25},
    "ignore_index_3": {"splits": (20, 17), "ignore_index": 3, "ignored": 0.3},
    "empty_shard": {"splits": (11, 0), "bias": True},
    "many_blocks": {"splits": (20, 17), "softcap": 3.0, "bias": True, "block_rows": 4},
    "three_dim_e": {"splits": (20, 17), "lead": (3, 5), "ignored": 0.2},
    "bfloat16": {"splits": (20, 17), "dtype": torch.bfloat16, "bias": True},
    "label_smoothing": {"splits": (20, 17), "label_smoothing": 0.2, "ignored": 0.2,
                        "vocab_size": 37},
    "weight_smoothing_softcap": {"splits": (9, 28), "weight": True, "label_smoothing": 0.1,
                                 "softcap": 2.0, "bias": True, "ignored": 0.2},
    "weight_none": {"splits": (20, 17), "weight": True, "reduction": "none",
                    "ignored": 0.3},
}


def _vp_case(rank: int, name: str, splits: tuple[int, ...], *, dtype=torch.float32,
             bias=False, weight=False, ignored=0.0, lead=(13,), d=8, block_rows=None,
             vocab_size=None, **options):
    from cce_inductor import config
    from cce_inductor.parallel import vocab_parallel_linear_cross_entropy

    vocab = sum(splits)
    gen = torch.Generator().manual_seed(len(name))  # the same inputs on both ranks
    e = torch.randn(*lead, d, generator=gen).to(dtype).requires_grad_()
    c = (torch.randn(vocab, d, generator=gen) * d**-0.5).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, vocab, lead, generator=gen)
    drop = torch.rand(lead, generator=gen) < ignored
    targets = torch.where(drop, options.get("ignore_index", -100), targets)
    w = torch.rand(vocab, generator=gen) + 0.1 if weight else None
    start = sum(splits[:rank])
    rows = slice(start, start + splits[rank])
    c_shard = c[rows].clone().requires_grad_()
    b_shard = None if b is None else b[rows].clone().requires_grad_()

    saved_budget = config.logits_chunk_bytes
    if block_rows is not None:
        config.logits_chunk_bytes = 4 * max(splits[rank], 1) * block_rows
    try:
        loss = vocab_parallel_linear_cross_entropy(e, c_shard, targets, vocab_start=start,
                                                   bias_shard=b_shard, weight=w,
                                                   vocab_size=vocab_size, **options)
    finally:
        config.logits_chunk_bytes = saved_budget

    e64, c64 = float64_leaf(e), c.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    ref = reference_loss(e64, c64, targets, bias=b64,
                         weight=None if w is None else w.double(), **options)
    rtol, atol = TOLERANCES[dtype]
    assert loss.dtype == dtype and loss.shape == ref.shape, name
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol, msg=name)

    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    wrt = [e, c_shard] + ([b_shard] if bias else [])
    grads = torch.autograd.grad((loss.double() * upstream).sum(), wrt)
    ref_grads = torch.autograd.grad((ref * upstream).sum(),
                                    [e64, c64] + ([b64] if bias else []))
    # dE is the full gradient on every rank; dC and d(bias) are this rank's rows.
    expected = [ref_grads[0]] + [g[rows] for g in ref_grads[1:]]
    for what, ours, want in zip(("dE", "dC", "dbias"), grads, expected):
        assert ours.dtype == dtype, (name, what)
        scale = want.abs().max().clamp_min(1e-30) if want.numel() else 1.0
        torch.testing.assert_close(ours.double(), want, rtol=rtol, atol=atol * scale,
                                   msg=f"{name}: {what}")


def _vocab_parallel_worker(rank: int) -> None:
    from cce_inductor.parallel import vocab_parallel_linear_cross_entropy

    for name, case in VP_CASES.items():
        _vp_case(rank, name, **case)

    e = torch.randn(6, 4, requires_grad=True)
    c_shard = torch.randn(5, 4, requires_grad=True)

    # Every row ignored: NaN mean, zero gradients, as F.cross_entropy.
    targets = torch.full((6,), -100)
    loss = vocab_parallel_linear_cross_entropy(e, c_shard, targets, vocab_start=5 * rank)
    assert loss.isnan()
    total = vocab_parallel_linear_cross_entropy(e, c_shard, targets, vocab_start=5 * rank,
                                                reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))
    assert torch.equal(c_shard.grad, torch.zeros_like(c_shard))

    # A target beyond the last shard is refused on every rank alike.
    with pytest.raises(ValueError, match="no rank's vocabulary shard"):
        vocab_parallel_linear_cross_entropy(e, c_shard, torch.full((6,), 10),
                                            vocab_start=5 * rank)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_linear_cross_entropy(e, c_shard, targets, vocab_start=5 * rank,
                                            label_smoothing=0.1)


def test_vocab_parallel_matches_float64_reference():
    """Loss, dE, each rank's dC and d(bias) slices; uneven and empty shards,
    ignored rows, softcap, scale, every reduction, several row blocks, bf16,
    label smoothing and class weights."""
    spawn("_vocab_parallel_worker")


# --- data parallel ---------------------------------------------------------------

V, D = 37, 16
BATCH, SEQ = 4, 6  # the whole batch; each rank takes BATCH // WORLD sequences


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.hidden = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.hidden(self.embed(x))))
        return F.cross_entropy(logits.view(-1, V), y.view(-1))


def _model_and_batch() -> tuple[TinyLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyLM()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (BATCH, SEQ), generator=gen)
    y = torch.randint(0, V, (BATCH, SEQ), generator=gen)
    y[:, 0] = -100  # ignored, the same number of rows on every rank
    return model, x, y


def _float64_reference(model: nn.Module, x, y) -> tuple[torch.Tensor, dict]:
    import copy

    ref = copy.deepcopy(model).double()
    loss = ref(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def _local_batch(rank: int, x, y):
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return x[rows], y[rows]


def _assert_matches(loss, grads: dict, ref_loss, ref_grads: dict, what: str) -> None:
    """The mean of the ranks' losses and the reduced gradients against float64."""
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    torch.testing.assert_close(mean_loss.double(), ref_loss, rtol=1e-5, atol=1e-6,
                               msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        want = ref_grads[name]
        torch.testing.assert_close(grad.double(), want, rtol=1e-5,
                                   atol=1e-6 * want.abs().max().item(),
                                   msg=f"{what}: grad of {name}")


# Inductor on CPU compiles C++ for every graph; the tests after DDP's check the
# rewrite itself with a cheaper inner compiler.
FAST_BACKEND = "aot_eager"


def _ddp_worker(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    log = _Rewrites()
    model, x, y = _model_and_batch()
    ref_loss, ref_grads = _float64_reference(model, x, y)
    ddp = DDP(model)
    compiled = torch.compile(ddp, backend="cce")
    loss = compiled(*_local_batch(rank, x, y))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    _assert_matches(loss, grads, ref_loss, ref_grads, "DDP")
    assert log.rewritten == 1, log.messages


def test_ddp_compiled_with_cce_matches_single_process():
    spawn("_ddp_worker")


def _fsdp_worker(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard


    log = _Rewrites()
    model, x, y = _model_and_batch()
    ref_loss, ref_grads = _float64_reference(model, x, y)
    fully_shard(model.hidden)
    fully_shard(model)
    compiled = torch.compile(model, backend="cce")
    loss = compiled(*_local_batch(rank, x, y))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    _assert_matches(loss, grads, ref_loss, ref_grads, "FSDP2")
    assert log.rewritten == 1, log.messages


def test_fsdp2_compiled_with_cce_matches_single_process():
    spawn("_fsdp_worker")


# --- tensor parallel: vocabulary-sharded DTensor classifiers -------------------------


def _colwise_case(mesh, backend, what: str) -> None:
    """ColwiseParallel head + loss_parallel(), PyTorch's tensor-parallel loss recipe."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        loss_parallel,
        parallelize_module,
    )

    log = _Rewrites()
    model, x, y = _model_and_batch()
    ref_loss, ref_grads = _float64_reference(model, x, y)
    parallelize_module(model, mesh, {"head": ColwiseParallel(use_local_output=False)})
    compiled = torch.compile(model, backend=backend)
    with loss_parallel():
        loss = compiled(x, y)  # tensor parallel: both ranks see the whole batch
        loss.backward()
    assert isinstance(loss, DTensor) and loss.placements[0].is_replicate(), what
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters()}
    _assert_matches(loss.full_tensor(), grads, ref_loss, ref_grads, what)
    assert log.rewritten == 1, log.messages
    assert any("vocab-parallel loss: V=37 over 2 ranks" in m for m in log.messages), \
        log.messages


# F.linear on DTensors: h replicated, the classifier (and bias) Shard(0).
TP_CASES = {
    "even": {"vocab": 36},
    "uneven_bias_scale_softcap_sum": {"vocab": 37, "bias": True, "scale": 1.5,
                                      "softcap": 2.0, "reduction": "sum", "ignored": 0.3},
    "uneven_rows_3d_none": {"vocab": 37, "lead": (2, 5), "reduction": "none",
                            "ignored": 0.2},
    "ragged_ignore_index_7": {"vocab": 3, "ignore_index": 7, "ignored": 0.3},
    "class_weight": {"vocab": 37, "class_weight": True, "ignored": 0.2},
}


def _linear_case(mesh, name: str, *, vocab: int, lead=(10,), bias=False, scale=1.0,
                 softcap=None, reduction="mean", ignored=0.0, ignore_index=-100,
                 class_weight=False, z_loss=False, rewritten=True) -> None:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    from cce_inductor import make_backend
    from cce_inductor.graph.vocab_parallel import shard_range

    log = _Rewrites()
    gen = torch.Generator().manual_seed(len(name))
    h = torch.randn(*lead, D, generator=gen)
    c = torch.randn(vocab, D, generator=gen) * D**-0.5
    b = torch.randn(vocab, generator=gen) if bias else None
    w = torch.rand(vocab, generator=gen) + 0.5 if class_weight else None
    y = torch.randint(0, vocab, lead, generator=gen)
    y = torch.where(torch.rand(lead, generator=gen) < ignored, ignore_index, y)
    h_dt = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
    c_dt = distribute_tensor(c, mesh, [Shard(0)]).requires_grad_()
    b_dt = None if b is None else distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    start, size = shard_range(vocab, WORLD, dist.get_rank())
    rows = slice(start, start + size)
    # The offsets the rewrite computes are where DTensor put this rank's rows.
    assert torch.equal(c_dt.to_local(), c[rows]), name

    def loss_fn(h, c, b, y):
        z = F.linear(h, c, b) * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        loss = F.cross_entropy(z.view(-1, vocab), y.view(-1), ignore_index=ignore_index,
                               reduction=reduction, weight=w)
        return loss + 1e-2 * torch.logsumexp(z, -1).pow(2).mean() if z_loss else loss

    torch._dynamo.reset()  # each case's constants stay constants, not graph inputs
    compiled = torch.compile(loss_fn, backend=make_backend(FAST_BACKEND))
    with loss_parallel():
        loss = compiled(h_dt, c_dt, b_dt, y)
        upstream = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
        (loss.to_local().double() * upstream).sum().backward()
    assert log.rewritten == int(rewritten), (name, log.messages)
    assert any("vocab-parallel loss" in m for m in log.messages) == rewritten, name

    h64, c64, b64 = (None if t is None else t.double().requires_grad_() for t in (h, c, b))
    ref = reference_loss(h64, c64, y, bias=b64, ignore_index=ignore_index,
                         reduction=reduction, weight=None if w is None else w.double(),
                         softcap=softcap, logit_scale=scale, return_lse=z_loss)
    if z_loss:
        ref = ref[0] + 1e-2 * ref[1].pow(2).mean()
    ref = ref.reshape(loss.shape)
    wrt = [h64, c64] + ([b64] if bias else [])
    ref_grads = torch.autograd.grad((ref * upstream).sum(), wrt)
    torch.testing.assert_close(loss.to_local().double(), ref, rtol=1e-5, atol=1e-6,
                               msg=name)
    # dh whole (loss_parallel leaves it partial); dC and d(bias): this rank's rows.
    ours = [h_dt.grad.full_tensor(), c_dt.grad.to_local()] + \
        ([b_dt.grad.to_local()] if bias else [])
    expected = [ref_grads[0]] + [g[rows] for g in ref_grads[1:]]
    for what, grad, want in zip(("dh", "dC", "dbias"), ours, expected):
        torch.testing.assert_close(grad.double(), want, rtol=1e-5,
                                   atol=1e-6 * max(want.abs().max().item(), 1.0),
                                   msg=f"{name}: {what}")


def _tensor_parallel_worker(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from cce_inductor import make_backend

    mesh = init_device_mesh("cpu", (WORLD,))
    _colwise_case(mesh, make_backend(FAST_BACKEND), "ColwiseParallel, aot_eager")
    _colwise_case(mesh, "cce", "ColwiseParallel, cce")
    for name, case in TP_CASES.items():
        _linear_case(mesh, name, **case)

    # What the vocabulary-parallel loss does not take stays with loss_parallel().
    log = _Rewrites()
    _linear_case(mesh, "z_loss", vocab=37, z_loss=True, rewritten=False)
    assert any("DTensor sharded over the vocabulary" in m and "logsumexp" in m
               for m in log.messages), log.messages


def test_tensor_parallel_vocab_sharded_classifier_served():
    """ColwiseParallel + loss_parallel(), and F.linear on a Shard(0) DTensor: the loss
    is rewritten to the vocabulary-parallel one and matches float64 (loss, dh, each
    rank's dC and d(bias) rows), even, uneven and ragged shards, a class weight; a
    z-loss on the same logits is left to loss_parallel()."""
    spawn("_tensor_parallel_worker")


def test_shard_range_splits_like_dtensor():
    from torch.distributed.tensor import Shard

    from cce_inductor.graph.vocab_parallel import shard_range

    for size in range(0, 12):
        for parts in range(1, 6):
            for index in range(parts):
                length, offset = Shard.local_shard_size_and_offset(size, parts, index)
                assert shard_range(size, parts, index) == (offset, length), \
                    (size, parts, index)


def test_vocab_parallel_ops_pass_opcheck(tmp_path):
    """The two custom ops behind the vocabulary-parallel loss, on a 1-rank group."""
    from cce_inductor.parallel import vocab_parallel_backward_op, vocab_parallel_op

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        name = dist.group.WORLD.group_name
        gen = torch.Generator().manual_seed(0)
        e, c = torch.randn(7, 5, generator=gen), torch.randn(11, 5, generator=gen)
        b, w = torch.randn(11, generator=gen), torch.rand(11, generator=gen) + 0.1
        y = torch.randint(0, 11, (7,), generator=gen)
        for reduction, smoothing in (("mean", 0.1), ("none", 0.0), ("sum", 0.3)):
            options = (0, 11, name, -100, reduction, smoothing, 2.0, 0.5)
            torch.library.opcheck(vocab_parallel_op, (e.requires_grad_(), c, y, b, w,
                                                      *options))
            _, lse = vocab_parallel_op(e.detach(), c, y, b, w, *options)
            grad = torch.randn(7 if reduction == "none" else (), generator=gen)
            torch.library.opcheck(vocab_parallel_backward_op,
                                  (grad, e.detach(), c, y, b, w, lse, *options,
                                   [True, True, True]))
    finally:
        dist.destroy_process_group()
