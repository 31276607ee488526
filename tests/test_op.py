"""The op's numbers: values and gradients against a float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import TOLERANCES, float64_leaf, reference_loss

from cce_inductor import linear_cross_entropy

OPTION_CASES = {
    "plain": {},
    "bias": {"bias": True},
    "weight": {"weight": True},
    "ignore_index_7": {"ignore_index": 7},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "label_smoothing": {"label_smoothing": 0.2},
    "softcap": {"softcap": 2.5},
    "logit_scale": {"logit_scale": 0.37},
    "all_mean": {"bias": True, "weight": True, "label_smoothing": 0.1, "softcap": 4.0,
                 "logit_scale": 1.7},
    "all_none": {"bias": True, "weight": True, "label_smoothing": 0.3, "softcap": 1.5,
                 "logit_scale": 0.5, "reduction": "none"},
    "all_sum_smoothing_1": {"weight": True, "label_smoothing": 1.0, "reduction": "sum"},
}


def make_inputs(n, d, v, dtype=torch.float32, *, lead=None, bias=False, weight=False,
                ignore_index=-100, ignored_fraction=0.25, seed=0):
    """Random operands (never zeros) with roughly a quarter of rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    e = torch.randn(*shape, d, generator=gen).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=gen) * d**-0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignored_fraction
    targets = torch.where(ignored, ignore_index, targets)
    b = torch.randn(v, generator=gen).to(dtype).requires_grad_() if bias else None
    w = torch.rand(v, generator=gen) + 0.1 if weight else None
    return e, c, targets, b, w


def check_against_reference(e, c, targets, bias, weight, dtype, options,
                            grad_seed=1):
    """Compare loss, lse and every gradient with the float64 reference."""
    rtol, atol = TOLERANCES[dtype]
    ours_loss, ours_lse = linear_cross_entropy(e, c, targets, bias=bias, weight=weight,
                                               return_lse=True, **options)
    e64, c64, b64 = float64_leaf(e), float64_leaf(c), float64_leaf(bias)
    w64 = None if weight is None else weight.double()
    ref_loss, ref_lse = reference_loss(e64, c64, targets, bias=b64, weight=w64,
                                       return_lse=True, **options)
    assert ours_loss.dtype == e.dtype
    assert ours_lse.dtype == torch.float32
    torch.testing.assert_close(ours_loss.double(), ref_loss, rtol=rtol, atol=atol,
                               equal_nan=True)
    torch.testing.assert_close(ours_lse.double(), ref_lse, rtol=1e-5, atol=1e-5)

    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(ref_loss.shape, generator=gen, dtype=torch.float64)
    lse_upstream = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64)
    inputs = [t for t in (e, c, bias) if t is not None]
    inputs64 = [t for t in (e64, c64, b64) if t is not None]
    ours_grads = torch.autograd.grad(
        (ours_loss.double() * upstream).sum() + (ours_lse.double() * lse_upstream).sum(),
        inputs)
    ref_grads = torch.autograd.grad(
        (ref_loss * upstream).sum() + (ref_lse * lse_upstream).sum(), inputs64)
    for ours, ref, x in zip(ours_grads, ref_grads, inputs):
        assert ours.dtype == x.dtype
        scale = ref.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(ours.double(), ref, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("case", list(OPTION_CASES), ids=str)
def test_options_match_float64_reference(case, dtype):
    options = dict(OPTION_CASES[case])
    bias, weight = options.pop("bias", False), options.pop("weight", False)
    e, c, targets, b, w = make_inputs(29, 23, 67, dtype, bias=bias, weight=weight,
                                      ignore_index=options.get("ignore_index", -100))
    check_against_reference(e, c, targets, b, w, dtype, options)


@pytest.mark.parametrize("n,d,v", [(1, 1, 1), (1, 5, 3), (3, 1, 7), (2, 9, 1),
                                   (17, 13, 1031), (130, 7, 3)])
def test_odd_shapes(n, d, v):
    e, c, targets, b, w = make_inputs(n, d, v, bias=True, weight=True,
                                      ignored_fraction=0.0)
    check_against_reference(e, c, targets, b, w, torch.float32,
                            {"label_smoothing": 0.1, "softcap": 3.0})


@pytest.mark.parametrize("case", [k for k, o in OPTION_CASES.items()
                                  if o.get("reduction") != "none"], ids=str)
def test_gradients_formed_in_the_forward(case):
    """A scalar loss without ``return_lse`` has its gradients formed in the
    forward on the CPU; ``.backward()`` hands them over."""
    options = dict(OPTION_CASES[case])
    bias, weight = options.pop("bias", False), options.pop("weight", False)
    e, c, targets, b, w = make_inputs(21, 13, 83, bias=bias, weight=weight,
                                      ignore_index=options.get("ignore_index", -100))
    linear_cross_entropy(e, c, targets, bias=b, weight=w, **options).backward()
    leaves = [t for t in (e, c, b) if t is not None]
    leaves64 = [float64_leaf(t) for t in leaves]
    reference_loss(*leaves64[:2], targets, bias=leaves64[2] if b is not None else None,
                   weight=None if w is None else w.double(), **options).backward()
    for t, t64 in zip(leaves, leaves64):
        scale = t64.grad.abs().max()
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5 * scale)


def test_softmax_in_place_matches_out_of_place():
    """The CPU path relies on ``torch.softmax(z, 1, out=z)`` being exact."""
    from cce_inductor.kernels.chunked import softmax_
    gen = torch.Generator().manual_seed(3)
    for shape in [(37, 5003), (3, 131101)]:  # up to a large vocabulary's row
        z = torch.randn(shape, generator=gen) * 9.0
        expected = torch.softmax(z, 1)
        assert torch.equal(softmax_(z.clone()), expected)


UNDERFLOW = {"logit_scale": 60.0, "reduction": "none"}


def with_underflowing_targets(e, c, targets):
    """Targets at each even row's smallest logit (under ``UNDERFLOW`` their
    probability is far below float32's normal range) and at each odd row's
    largest; checks that the loss shows both."""
    with torch.no_grad():
        logits = e @ c.T
        targets[::2] = logits[::2].argmin(1)
        targets[1::2] = logits[1::2].argmax(1)
        loss = linear_cross_entropy(e, c, targets, **UNDERFLOW)
    assert loss[::2].min() > 90, "the case must put p_y below float32's normal range"
    assert loss[1::2].max() < 10
    return targets


def test_target_probability_below_float32_range():
    """Rows whose target probability underflows (loss above ~90) take the
    exact route to their lse, mixed with ordinary rows in one block."""
    e, c, targets, _, _ = make_inputs(16, 9, 50, ignored_fraction=0.0)
    targets = with_underflowing_targets(e, c, targets)
    for reduction in ("none", "mean"):
        check_against_reference(e, c, targets, None, None, torch.float32,
                                {**UNDERFLOW, "reduction": reduction})


def test_route_of_other_devices(monkeypatch):
    """The chunked path's route for devices other than the CPU (the CUDA
    fallback without Triton): one matmul per block, a three-op softmax and a
    sync-free lse, checked here on CPU tensors."""
    from cce_inductor.kernels import chunked
    monkeypatch.setattr(chunked, "on_cpu", lambda t: False)
    e, c, targets, b, w = make_inputs(19, 11, 73, bias=True, weight=True)
    options = {k: v for k, v in OPTION_CASES["all_mean"].items() if k not in ("bias", "weight")}
    check_against_reference(e, c, targets, b, w, torch.float32, options)
    targets = with_underflowing_targets(e, c, targets)
    check_against_reference(e, c, targets, None, None, torch.float32, UNDERFLOW)


def test_many_blocks_of_rows(monkeypatch):
    """More rows than one block holds, with a partial last block, and (on the
    CPU) the vocabulary in pieces with a partial last piece."""
    from cce_inductor import config
    from cce_inductor.kernels import chunked
    monkeypatch.setattr(config, "logits_chunk_bytes", 4 * 61 * 5)
    monkeypatch.setattr(chunked, "VOCAB_PIECE", 16)
    e, c, targets, b, w = make_inputs(23, 6, 61, bias=True)
    check_against_reference(e, c, targets, b, w, torch.float32, {"softcap": 2.0})
    check_against_reference(e, c, targets, b, w, torch.float32, {"reduction": "none"})


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_three_dimensional_inputs(reduction):
    e, c, targets, b, _ = make_inputs(0, 11, 37, lead=(3, 5), bias=True)
    check_against_reference(e, c, targets, b, None, torch.float32,
                            {"reduction": reduction})
    loss = linear_cross_entropy(e, c, targets, reduction=reduction)
    assert loss.shape == ((3, 5) if reduction == "none" else ())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction):
    e, c, targets, _, _ = make_inputs(6, 4, 9, ignored_fraction=1.1)
    loss = linear_cross_entropy(e, c, targets, reduction=reduction)
    ref = reference_loss(e.double(), c.double(), targets, reduction=reduction)
    torch.testing.assert_close(loss.double(), ref, equal_nan=True)
    if reduction == "mean":
        assert loss.isnan()
    loss.sum().backward()
    if reduction != "mean":
        assert torch.equal(e.grad, torch.zeros_like(e))
        assert torch.equal(c.grad, torch.zeros_like(c))


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3))[1:])
def test_gradients_only_where_required(needs):
    e, c, targets, b, _ = make_inputs(9, 5, 21, bias=True)
    for t, need in zip((e, c, b), needs):
        t.requires_grad_(need)
    linear_cross_entropy(e, c, targets, bias=b).backward()
    e64, c64, b64 = (t.detach().double().requires_grad_(need)
                     for t, need in zip((e, c, b), needs))
    reference_loss(e64, c64, targets, bias=b64).backward()
    for t, t64 in zip((e, c, b), (e64, c64, b64)):
        if t.requires_grad:
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)
        else:
            assert t.grad is None


def test_second_backward_with_retain_graph_is_exact():
    """The first backward hands over gradients computed in the forward; a
    second one recomputes them and must give the same numbers."""
    e, c, targets, b, _ = make_inputs(12, 6, 17, bias=True)
    loss = linear_cross_entropy(e, c, targets, bias=b, label_smoothing=0.1)
    first = torch.autograd.grad(loss, (e, c, b), retain_graph=True)
    second = torch.autograd.grad(loss * 3.0, (e, c, b))
    for g1, g2 in zip(first, second):
        torch.testing.assert_close(g2, 3.0 * g1, rtol=1e-5, atol=1e-7)


def test_z_loss_trains_through_returned_lse():
    e, c, targets, b, _ = make_inputs(15, 8, 40, bias=True)
    loss, lse = linear_cross_entropy(e, c, targets, bias=b, return_lse=True)
    (loss + 1e-2 * lse.pow(2).mean()).backward()
    e64, c64, b64 = float64_leaf(e), float64_leaf(c), float64_leaf(b)
    ref_loss, ref_lse = reference_loss(e64, c64, targets, bias=b64, return_lse=True)
    (ref_loss + 1e-2 * ref_lse.pow(2).mean()).backward()
    for t, t64 in zip((e, c, b), (e64, c64, b64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)


def test_no_grad_forward_matches():
    e, c, targets, _, _ = make_inputs(10, 4, 30)
    with torch.no_grad():
        loss = linear_cross_entropy(e, c, targets)
    torch.testing.assert_close(loss.double(), reference_loss(e.double(), c.double(),
                                                             targets))


def test_int32_targets_accepted():
    e, c, targets, _, _ = make_inputs(10, 4, 30)
    loss = linear_cross_entropy(e, c, targets.int())
    torch.testing.assert_close(loss, linear_cross_entropy(e, c, targets))
