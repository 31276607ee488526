"""The Triton kernels against the float64 reference.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (set
before the kernel modules are imported), on small shapes that still span
several tiles in every dimension at the interpreter's block sizes (16 x 32 x
16; tile maxima in blocks of 8 x 16).  With CUDA they run compiled, with
autotuning off (one pinned config), and the realistic-shape tests at the end
check the acceptance rule: our error against float64 is no worse than
PyTorch's own bf16 error plus a stated tolerance.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # conftest.py asks for the interpreter without CUDA

from reference import TOLERANCES, float64_leaf, reference_loss  # noqa: E402
from test_op import OPTION_CASES  # noqa: E402

from cce_inductor import config, linear_cross_entropy  # noqa: E402
from cce_inductor.kernels import triton_backward, triton_forward  # noqa: E402
from cce_inductor.kernels.chunked import LossSpec  # noqa: E402
from cce_inductor.op import prefers_forward_gradients  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# The loss and lse are formed in fp32 from the operands whatever their dtype.
STAT_TOL = (2e-5, 2e-5)



@pytest.fixture(autouse=True)
def _exact_gradients(monkeypatch):
    """Filtering off unless a test turns it on; one pinned config."""
    monkeypatch.setattr(config, "filter_eps", None)
    monkeypatch.setattr(config, "triton_autotune", False)


def make_inputs(n, d, v, dtype=torch.float32, *, bias=False, weight=False,
                ignore_index=-100, ignored_fraction=0.25, seed=0, peaked=False,
                target_classes=None):
    """Random operands on DEVICE; ``peaked`` makes each row's target dominate
    its softmax, like a trained model; targets are among the first
    ``target_classes`` classes (all by default)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, target_classes or v, (n,), generator=gen)
    c = torch.randn(v, d, generator=gen) * d**-0.5
    if peaked:
        e = 25.0 * c[targets] / c[targets].norm(dim=1, keepdim=True) ** 2 \
            + 0.05 * torch.randn(n, d, generator=gen)
    else:
        e = torch.randn(n, d, generator=gen)
    ignored = torch.rand(n, generator=gen) < ignored_fraction
    targets = torch.where(ignored, ignore_index, targets)
    b = torch.randn(v, generator=gen) if bias else None
    w = torch.rand(v, generator=gen) + 0.1 if weight else None

    def place(t, cast=True):
        if t is None:
            return None
        return t.to(DEVICE, dtype if cast else t.dtype)
    return place(e), place(c), targets.to(DEVICE), place(b), place(w, cast=False)


def spec_of(options: dict) -> LossSpec:
    return LossSpec(options.get("ignore_index", -100), options.get("reduction", "mean"),
                    options.get("label_smoothing", 0.0), options.get("softcap"),
                    options.get("logit_scale", 1.0))


def reference_and_grads(e, c, targets, bias, weight, options, grad_loss, grad_lse):
    """Float64 loss, lse and gradients (e, c, bias) for the given upstreams."""
    e64, c64 = float64_leaf(e).requires_grad_(), float64_leaf(c).requires_grad_()
    b64 = None if bias is None else float64_leaf(bias).requires_grad_()
    w64 = None if weight is None else weight.double()
    loss, lse = reference_loss(e64, c64, targets, bias=b64, weight=w64, return_lse=True,
                               **options)
    total = (loss * 0).sum()
    if grad_loss is not None:
        total = total + (loss * grad_loss.double()).sum()
    if grad_lse is not None:
        total = total + (lse * grad_lse.double()).sum()
    inputs = [t for t in (e64, c64, b64) if t is not None]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return loss.detach(), lse.detach(), grads


def run_ours(e, c, targets, bias, weight, options, grad_loss, grad_lse,
             needs=(True, True, True)):
    """Our forward (recording the tile maxima) and backward (using them)."""
    spec = spec_of(options)
    loss, lse, *empties, tile_max = triton_forward.forward(
        e, c, targets, bias, weight, spec, (False, False, False), tile_max=True)
    assert all(t.numel() == 0 for t in empties)
    grads = triton_backward.backward(grad_loss, grad_lse, e, c, targets, bias, weight,
                                     lse, spec, needs, tile_max=tile_max)
    return loss, lse, grads


# For half-precision operands the kernels round the logit gradient to the
# operands' dtype before the two backward matmuls (as PyTorch's own bf16 and
# fp16 backward does), which costs more than the final rounding that
# TOLERANCES allows for: the absolute part is relative to the largest entry.
HALF_GRAD_TOL = {torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def assert_grads_close(ours, ref, dtype, loose=None):
    rtol, atol = loose or HALF_GRAD_TOL.get(dtype) or TOLERANCES[dtype]
    scale = ref.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(ours.double().cpu(), ref.cpu(), rtol=rtol, atol=atol * scale)


def check(e, c, targets, bias, weight, options, *, with_loss=True, with_lse=True,
          seed=1, loose=None):
    """Forward and backward of the kernels against float64, every output."""
    dtype = e.dtype
    spec = spec_of(options)
    gen = torch.Generator().manual_seed(seed)
    shape = (e.shape[0],) if spec.reduction == "none" else ()
    grad_loss = torch.randn(shape, generator=gen).to(DEVICE) if with_loss else None
    grad_lse = torch.randn(e.shape[0], generator=gen).to(DEVICE) if with_lse else None
    loss, lse, grads = run_ours(e, c, targets, bias, weight, options, grad_loss, grad_lse)
    ref_loss, ref_lse, ref_grads = reference_and_grads(e, c, targets, bias, weight, options,
                                                       grad_loss, grad_lse)
    assert loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=STAT_TOL[0], atol=STAT_TOL[1],
                               equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=STAT_TOL[0], atol=STAT_TOL[1])
    for ours, ref, x in zip(grads, ref_grads, (e, c, bias)):
        assert ours.dtype == x.dtype and ours.shape == x.shape
        assert_grads_close(ours, ref, dtype, loose)
    if bias is None:
        assert grads[2].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(OPTION_CASES), ids=str)
def test_options_match_float64(case, dtype):
    options = dict(OPTION_CASES[case])
    bias, weight = options.pop("bias", False), options.pop("weight", False)
    inputs = make_inputs(29, 23, 67, dtype, bias=bias, weight=weight,
                         ignore_index=options.get("ignore_index", -100))
    check(*inputs, options)


# V=100 spans 4 vocabulary tiles: with 3 splits the last split is empty.
@pytest.mark.parametrize("n,d,v", [(1, 1, 1), (1, 5, 3), (3, 1, 7), (2, 9, 1),
                                   (17, 13, 100), (37, 40, 130)])
def test_odd_shapes(n, d, v):
    inputs = make_inputs(n, d, v, bias=True, weight=True, ignored_fraction=0.0)
    check(*inputs, {"label_smoothing": 0.1, "softcap": 3.0})


@pytest.mark.parametrize("with_loss,with_lse", [(True, False), (False, True)])
def test_one_upstream_gradient(with_loss, with_lse):
    inputs = make_inputs(19, 12, 50, bias=True)
    check(*inputs, {"label_smoothing": 0.1}, with_loss=with_loss, with_lse=with_lse)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction):
    e, c, targets, b, _ = make_inputs(6, 4, 9, bias=True, ignored_fraction=1.1)
    options = {"reduction": reduction}
    check(e, c, targets, b, None, options, with_lse=False)
    loss, _, (grad_e, grad_c, grad_bias) = run_ours(
        e, c, targets, b, None, options, torch.ones(()) if reduction != "none" else
        torch.ones(6), None)
    if reduction == "mean":
        assert loss.isnan()
    else:
        assert not grad_e.any() and not grad_c.any() and not grad_bias.any()


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, False, False)])
def test_only_needed_gradients(needs):
    e, c, targets, b, _ = make_inputs(11, 7, 40, bias=True)
    grad_loss = torch.tensor(1.5, device=DEVICE)
    _, lse, *_ = triton_forward.forward(e, c, targets, b, None, spec_of({}), (False,) * 3)
    grads = triton_backward.backward(grad_loss, None, e, c, targets, b, None, lse,
                                     spec_of({}), needs)
    _, _, ref = reference_and_grads(e, c, targets, b, None, {}, grad_loss, None)
    for need, ours, r in zip(needs, grads, ref):
        if need:
            assert_grads_close(ours, r, torch.float32)
        else:
            assert ours.numel() == 0


# Interpreter blocks: 16 rows x 32 classes x 16 dims; on a GPU the pinned
# configs use 64-128 rows x 128-256 classes x 64 dims.
SPAN_SHAPE = (150, 200, 600) if DEVICE.type == "cuda" else (70, 50, 200)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_exact_mode_across_many_tiles(dtype):
    """Filter off: elementwise against float64 at a ragged shape (no dimension
    a multiple of its block) spanning several tiles in N, V and D."""
    n, d, v = SPAN_SHAPE
    inputs = make_inputs(n, d, v, dtype, bias=True, weight=True)
    check(*inputs, {"label_smoothing": 0.1, "softcap": 5.0})


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_operands(layout):
    """C (and E) as transposed views (stride 1 over V) or with a stride over D."""
    e, c, targets, b, _ = make_inputs(45, 20, 90, bias=True)
    if layout == "transposed":
        c_view, e_view = c.T.contiguous().T, e.T.contiguous().T
    else:
        c_view = torch.stack([c, torch.randn_like(c)], 2).flatten(1)[:, ::2]
        e_view = torch.stack([e, torch.randn_like(e)], 2).flatten(1)[:, ::2]
    assert not c_view.is_contiguous() and not e_view.is_contiguous()
    assert torch.equal(c_view, c) and torch.equal(e_view, e)
    check(e_view, c_view, targets, b, None, {"softcap": 2.0})


def test_classifier_gradient_in_vocabulary_groups(monkeypatch):
    """bf16 dC through a scratch smaller than the vocabulary (several groups)."""
    monkeypatch.setattr(triton_backward, "_GROUP_ALIGN", 32)
    monkeypatch.setattr(triton_backward, "GRAD_C_SCRATCH_BYTES", 4 * 10 * 40)
    assert triton_backward._group_rows(67, 10, 2) == 32
    inputs = make_inputs(21, 10, 67, torch.bfloat16, bias=True, weight=True, ignore_index=3)
    check(*inputs, {"label_smoothing": 0.1, "ignore_index": 3})


def _gradient_digest(filter_eps) -> str:
    config.filter_eps = filter_eps
    e, c, targets, b, _ = make_inputs(33, 20, 70, torch.bfloat16, bias=True, peaked=True)
    one = torch.ones((), device=DEVICE)
    _, _, grads = run_ours(e, c, targets, b, None, {"label_smoothing": 0.1}, one, None)
    digest = hashlib.sha256()
    for g in grads:
        digest.update(g.float().cpu().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_backward_is_deterministic(filter_eps):
    """Bitwise the same gradients twice in this process and in another one."""
    first = _gradient_digest(filter_eps)
    assert _gradient_digest(filter_eps) == first
    code = ("import sys; sys.path.insert(0, 'tests'); import conftest, test_triton_kernels "
            f"as t; print(t._gradient_digest({filter_eps!r}))")
    env = dict(os.environ, CCE_INDUCTOR_AUTOTUNE="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-1] == first


def test_forward_records_tile_maxima():
    """The tile maxima equal float64 block maxima of the logits (fp32 tolerance)."""
    e, c, targets, b, _ = make_inputs(37, 30, 150, bias=True)
    spec = spec_of({"softcap": 3.0, "logit_scale": 1.3})
    *_, tile_max = triton_forward.forward(e, c, targets, b, None, spec, (False,) * 3,
                                          tile_max=True)
    z = 3.0 * torch.tanh((e.double() @ c.double().T + b.double()) * 1.3 / 3.0)
    rec_n, rec_v = triton_forward.REC_N, triton_forward.REC_V
    ref = F.max_pool2d(z[None, None], (rec_n, rec_v), ceil_mode=True)[0, 0]
    assert tile_max.shape == (-(-37 // rec_n), -(-150 // rec_v))
    torch.testing.assert_close(tile_max.double().cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)


def _filter_inputs(seed: int, options: dict):
    """Peaked operands, upstream gradients and per-row filter terms."""
    e, c, targets, b, w = make_inputs(40, 64, 320, bias=True, weight=True, peaked=True,
                                      seed=seed, target_classes=96)
    gen = torch.Generator().manual_seed(seed)
    grad_loss = torch.randn((), generator=gen).to(DEVICE)
    grad_lse = 1e-4 * torch.randn(40, generator=gen).to(DEVICE)
    return e, c, targets, b, w, grad_loss, grad_lse


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.05, "softcap": 20.0}],
                         ids=["plain", "smoothing_softcap"])
def test_tile_maxima_skip_keeps_every_tile_the_rule_keeps(seed, options):
    """Property: a tile the filter rule keeps (some |S_ij| > eps r_i, S the
    tile part from float64 logits) is never skipped by the tile-maxima test."""
    e, c, targets, b, w, grad_loss, grad_lse = _filter_inputs(seed, options)
    spec = spec_of(options)
    _, lse, *_, tile_max = triton_forward.forward(e, c, targets, b, w, spec, (False,) * 3,
                                                  tile_max=True)
    eps = 1e-3
    # The per-row terms exactly as the backward forms them.
    from cce_inductor.kernels.chunked import row_terms
    n, v = e.shape[0], c.shape[0]
    terms = row_terms(targets, w, spec, v)
    s = spec.label_smoothing
    grad_row = torch.where(terms.valid, grad_loss / terms.mean_denominator(), 0.0)
    coeff = grad_row * ((1 - s) * terms.target_weight + s * terms.weight_total / v) + grad_lse
    onehot = grad_row * (1 - s) * terms.target_weight
    smooth = grad_row * (s / v)
    threshold = eps * torch.maximum(coeff.abs(), onehot.abs())
    cutoffs = triton_backward.row_cutoffs(lse, coeff, smooth, threshold,
                                          float(w.max()) if s else 0.0)
    block_n, block_v, *_ = triton_backward.grad_config(n, e.shape[1])
    keep = triton_backward.keep_mask(tile_max, cutoffs, block_n, block_v, n, v).cpu()

    u = (e.double() @ c.double().T + b.double()) * spec.logit_scale
    z = u if spec.softcap is None else spec.softcap * torch.tanh(u / spec.softcap)
    tile = coeff.double()[:, None] * torch.exp(z - lse.double()[:, None]) \
        - smooth.double()[:, None] * w.double()[None, :]
    if spec.softcap is not None:
        tile = tile * (1 - (z / spec.softcap) ** 2)
    above = (tile.abs() > threshold.double()[:, None]).cpu()
    rows_pad, cols_pad = (-n) % block_n, (-v) % block_v
    above = F.pad(above.float(), (0, cols_pad, 0, rows_pad))
    rule = above.view(keep.shape[0], block_n, keep.shape[1], block_v).amax((1, 3)) > 0
    assert not (rule & ~keep).any(), "a tile the rule keeps was skipped"
    assert rule.any() and (~keep).any(), "the test exercises neither side"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtering_on_peaked_softmax(monkeypatch, dtype):
    """With the default eps the gradients of a peaked softmax stay within a
    loose tolerance (2e-2 of the largest entry, rtol 2e-2): every skipped
    entry is below eps times its row's scale, and with filtering dE and dC
    are accumulated in the operands' dtype."""
    monkeypatch.setattr(config, "filter_eps", "auto")
    inputs = make_inputs(40, 24, 130, dtype, bias=True, peaked=True)
    check(*inputs, {}, loose=(2e-2, 2e-2))
    check(*inputs, {"label_smoothing": 0.1, "softcap": 30.0}, loose=(2e-2, 2e-2))


def test_filtering_skips_tiles(monkeypatch):
    """An eps above every entry skips every tile before its matmul: what is
    left is the target part, -t_i at (i, y_i), exactly."""
    monkeypatch.setattr(config, "filter_eps", 1e30)
    e, c, targets, b, _ = make_inputs(20, 8, 50, bias=True, peaked=True)
    spec, one = spec_of({}), torch.ones((), device=DEVICE)
    _, lse, *_, tile_max = triton_forward.forward(e, c, targets, b, None, spec, (False,) * 3,
                                                  tile_max=True)
    grads = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec,
                                     (True, True, True), tile_max=tile_max)
    valid = targets != -100
    t = valid.double() / valid.sum()
    safe = torch.where(valid, targets, 0)
    onehot = F.one_hot(safe, 50).double() * t[:, None]
    ref = (-onehot @ c.double(), -onehot.T @ e.double(), -onehot.sum(0))
    for ours, r in zip(grads, ref):
        torch.testing.assert_close(ours.double(), r, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_tile_max", [True, False])
def test_filtering_error_within_its_bound(monkeypatch, with_tile_max):
    """Peaked softmax, large eps: some tiles are skipped, and the error obeys
    the bound of the rule (every skipped entry |S_ij| <= eps * r_i, here
    r_i = 1 / valid rows): |dE_i err| <= eps r_i sum_j |c_j| and
    |dC_j err| <= eps sum_i r_i |e_i|, per coordinate (fp32 operands)."""
    eps = 1e-3
    e, c, targets, b, _ = make_inputs(40, 24, 130, bias=True, peaked=True)
    spec, one = spec_of({}), torch.ones((), device=DEVICE)
    _, lse, *_, tile_max = triton_forward.forward(e, c, targets, b, None, spec, (False,) * 3,
                                                  tile_max=True)
    exact = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec,
                                     (True, True, True))
    monkeypatch.setattr(config, "filter_eps", eps)
    filtered = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec,
                                        (True, True, True),
                                        tile_max=tile_max if with_tile_max else None)
    assert any(not torch.equal(f, x) for f, x in zip(filtered, exact)), "nothing skipped"
    r = eps / (targets != -100).sum()
    bound_e = r * c.abs().sum(0)
    bound_c = r * e.abs().sum(0)
    assert ((filtered[0] - exact[0]).abs() <= bound_e * 1.01 + 1e-7).all()
    assert ((filtered[1] - exact[1]).abs() <= bound_c * 1.01 + 1e-7).all()
    assert ((filtered[2] - exact[2]).abs() <= eps * 1.01).all()


def test_grouped_program_order_covers_the_grid():
    """Every (row block, split) pair is taken by exactly one program."""
    import triton
    import triton.language as tl

    @triton.jit
    def order(out_ptr, num_row_blocks, num_splits, GROUP_N: tl.constexpr):
        pid = tl.program_id(0)
        row_block, split = triton_forward.grouped_program(pid, num_row_blocks, num_splits,
                                                          GROUP_N)
        tl.store(out_ptr + 2 * pid, row_block)
        tl.store(out_ptr + 2 * pid + 1, split)

    for blocks, splits in [(5, 3), (8, 2), (19, 4)]:
        out = torch.full((blocks * splits, 2), -1, dtype=torch.int32, device=DEVICE)
        order[(blocks * splits,)](out, blocks, splits, GROUP_N=triton_forward.GROUP_N)
        pairs = {tuple(p) for p in out.cpu().tolist()}
        assert pairs == {(r, s) for r in range(blocks) for s in range(splits)}


def test_pinned_config_and_bucket(monkeypatch):
    """Autotuning off leaves one config; the autotune key's N bucket."""
    monkeypatch.setattr(config, "triton_autotune", False)
    assert len(triton_forward.candidate_configs(triton_forward._FORWARD_GPU_CONFIGS)) == 1
    limit = triton_forward.SHARED_MEMORY_BYTES
    for itemsize in (2, 4):  # some GPU config fits shared memory for either size
        assert any(triton_forward.shared_bytes(cfg, itemsize) <= limit
                   for cfg in triton_forward._FORWARD_GPU_CONFIGS)
    assert [triton_forward.n_bucket(n) for n in (1, 2, 3, 2048, 2049)] == [1, 2, 4, 2048, 4096]
    for n, d in [(1, 8), (2048, 2304), (8192, 4096)]:
        block_n, block_v, *_ = triton_backward.grad_config(n, d)
        assert block_n % triton_forward.REC_N == 0 and block_v % triton_forward.REC_V == 0


def test_filter_eps_resolution(monkeypatch):
    monkeypatch.setattr(config, "filter_eps", "auto")
    assert triton_backward.resolve_filter_eps(torch.bfloat16) == 2.0**-7 / 32
    monkeypatch.setattr(config, "filter_eps", None)
    assert triton_backward.resolve_filter_eps(torch.bfloat16) is None
    monkeypatch.setattr(config, "filter_eps", 1e-5)
    assert triton_backward.resolve_filter_eps(torch.float32) == 1e-5


def test_forward_refuses_precompute():
    e, c, targets, _, _ = make_inputs(3, 4, 5)
    with pytest.raises(ValueError, match="precompute"):
        triton_forward.forward(e, c, targets, None, None, spec_of({}), (True, False, False))


def test_forward_gradients_preference():
    assert prefers_forward_gradients(torch.device("cpu"))
    if torch.cuda.is_available():
        assert not prefers_forward_gradients(torch.device("cuda"))


# ---- CUDA only: the public function at realistic shapes ------------------------------


@needs_cuda
@pytest.mark.parametrize("case", ["plain", "all_mean", "all_none"])
def test_cuda_public_function_small(case):
    options = dict(OPTION_CASES[case])
    bias, weight = options.pop("bias", False), options.pop("weight", False)
    e, c, targets, b, w = make_inputs(300, 96, 1000, torch.bfloat16, bias=bias,
                                      weight=weight)
    for t in (e, c, b):
        if t is not None:
            t.requires_grad_()
    loss = linear_cross_entropy(e, c, targets, bias=b, weight=w, **options)
    loss.sum().backward()
    detached = [None if t is None else t.detach() for t in (e, c, b)]
    ref_loss, _, ref_grads = reference_and_grads(
        *detached[:2], targets, detached[2], w, options, torch.ones(loss.shape, device=DEVICE),
        None)
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for t, ref in zip((e, c, b), ref_grads):
        if t is not None:
            assert_grads_close(t.grad, ref, torch.bfloat16)


# Acceptance tolerance on top of PyTorch's own bf16 error: absolute for the
# loss, relative (to the reference's norm) for the gradients.
ACCEPT_LOSS_ATOL = 1e-3
ACCEPT_GRAD_RTOL = 2e-3


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@needs_cuda
@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_cuda_acceptance_rule_bf16(kind, monkeypatch):
    """Error vs float64 no worse than F.cross_entropy on bf16 logits, plus a
    tolerance, for the loss, dE and dC (default filtering on)."""
    monkeypatch.setattr(config, "filter_eps", "auto")
    n, d, v = 4096, 2048, 128256
    e, c, targets, _, _ = make_inputs(n, d, v, torch.bfloat16, ignored_fraction=0.05,
                                      peaked=kind == "peaked")
    e.requires_grad_()
    c.requires_grad_()

    ours = linear_cross_entropy(e, c, targets)
    ours_e, ours_c = torch.autograd.grad(ours, (e, c))
    torch_loss = F.cross_entropy(e @ c.T, targets)
    torch_e, torch_c = torch.autograd.grad(torch_loss, (e, c))
    torch_loss = torch_loss.detach()
    torch.cuda.empty_cache()

    e64 = e.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    ref = F.cross_entropy(e64 @ c64.T, targets)
    ref_e, ref_c = torch.autograd.grad(ref, (e64, c64))

    loss_err = abs(ours.double() - ref).item()
    torch_loss_err = abs(torch_loss.double() - ref).item()
    assert loss_err <= torch_loss_err + ACCEPT_LOSS_ATOL, (loss_err, torch_loss_err)
    for name, x, base, r in (("dE", ours_e, torch_e, ref_e), ("dC", ours_c, torch_c, ref_c)):
        err, torch_err = _relative_error(x, r), _relative_error(base, r)
        assert err <= torch_err + ACCEPT_GRAD_RTOL, (name, err, torch_err)
