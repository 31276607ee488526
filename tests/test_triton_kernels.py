"""The Triton kernels against the float64 reference.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (set
before the kernel modules are imported), on tiny shapes that still span
several blocks in every dimension.  With CUDA they run compiled, and the
realistic-shape tests at the end check the acceptance rule: our error against
float64 is no worse than PyTorch's own bf16 error plus a stated tolerance.
"""

from __future__ import annotations

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
    """Filtering off unless a test turns it on."""
    monkeypatch.setattr(config, "filter_eps", None)


def make_inputs(n, d, v, dtype=torch.float32, *, bias=False, weight=False,
                ignore_index=-100, ignored_fraction=0.25, seed=0, peaked=False):
    """Random operands on DEVICE; ``peaked`` makes each row's target dominate
    its softmax, like a trained model."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=gen)
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
    spec = spec_of(options)
    loss, lse, *empties = triton_forward.forward(e, c, targets, bias, weight, spec,
                                                 (False, False, False))
    assert all(t.numel() == 0 for t in empties)
    grads = triton_backward.backward(grad_loss, grad_lse, e, c, targets, bias, weight,
                                     lse, spec, needs)
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


def test_non_contiguous_classifier():
    e, c, targets, b, _ = make_inputs(13, 20, 45, bias=True)
    c_strided = c.T.contiguous().T  # same values, strides (1, V)
    assert not c_strided.is_contiguous()
    check(e, c_strided, targets, b, None, {"softcap": 2.0})


def test_classifier_gradient_in_vocabulary_groups(monkeypatch):
    """bf16 dC through a scratch smaller than the vocabulary (several groups)."""
    monkeypatch.setattr(triton_backward, "_GROUP_ALIGN", 32)
    monkeypatch.setattr(triton_backward, "GRAD_C_SCRATCH_BYTES", 4 * 10 * 40)
    assert triton_backward._group_rows(67, 10, 2) == 32
    inputs = make_inputs(21, 10, 67, torch.bfloat16, bias=True, weight=True, ignore_index=3)
    check(*inputs, {"label_smoothing": 0.1, "ignore_index": 3})


def test_backward_is_deterministic():
    e, c, targets, b, _ = make_inputs(33, 20, 70, torch.bfloat16, bias=True)
    _, lse, *_ = triton_forward.forward(e, c, targets, b, None, spec_of({}), (False,) * 3)
    one = torch.ones((), device=DEVICE)
    first = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec_of({}),
                                     (True, True, True))
    second = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec_of({}),
                                      (True, True, True))
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtering_on_peaked_softmax(monkeypatch, dtype):
    """With the default eps the gradients of a peaked softmax stay within a
    loose tolerance: every skipped entry is below eps times its row's scale."""
    monkeypatch.setattr(config, "filter_eps", "auto")
    inputs = make_inputs(40, 24, 130, dtype, bias=True, peaked=True)
    # eps/32 of bf16 (2^-12) relative to the row scale, summed over <= V entries.
    check(*inputs, {}, loose=(2e-2, 2e-2))
    check(*inputs, {"label_smoothing": 0.1, "softcap": 30.0}, loose=(2e-2, 2e-2))


def test_filtering_skips_tiles(monkeypatch):
    """An eps above every entry skips every tile: all gradients are zero."""
    monkeypatch.setattr(config, "filter_eps", 1e30)
    e, c, targets, b, _ = make_inputs(20, 8, 50, bias=True, peaked=True)
    _, lse, *_ = triton_forward.forward(e, c, targets, b, None, spec_of({}), (False,) * 3)
    grads = triton_backward.backward(torch.ones((), device=DEVICE), None, e, c, targets, b,
                                     None, lse, spec_of({}), (True, True, True))
    assert all(not g.any() for g in grads)


def test_filtering_error_within_its_bound(monkeypatch):
    """Peaked softmax, large eps: some tiles are skipped, and the error obeys
    the bound of the rule (every skipped entry |G_ij| <= eps * r_i, here
    r_i = 1 / valid rows): |dE_i err| <= eps r_i sum_j |c_j| and
    |dC_j err| <= eps sum_i r_i |e_i|, per coordinate."""
    eps = 1e-3
    e, c, targets, b, _ = make_inputs(40, 24, 130, bias=True, peaked=True)
    spec, one = spec_of({}), torch.ones((), device=DEVICE)
    _, lse, *_ = triton_forward.forward(e, c, targets, b, None, spec, (False,) * 3)
    exact = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec,
                                     (True, True, True))
    monkeypatch.setattr(config, "filter_eps", eps)
    filtered = triton_backward.backward(one, None, e, c, targets, b, None, lse, spec,
                                        (True, True, True))
    assert any(not torch.equal(f, x) for f, x in zip(filtered, exact)), "nothing skipped"
    r = eps / (targets != -100).sum()
    bound_e = r * c.abs().sum(0)
    bound_c = r * e.abs().sum(0)
    assert ((filtered[0] - exact[0]).abs() <= bound_e * 1.01 + 1e-7).all()
    assert ((filtered[1] - exact[1]).abs() <= bound_c * 1.01 + 1e-7).all()
    assert ((filtered[2] - exact[2]).abs() <= eps * 1.01).all()


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
