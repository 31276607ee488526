"""Entropy and argmax in the Triton kernels, against float64.

The forward keeps the entropy's statistic and the argmax per (row, split);
the backward adds the entropy's gradient ``-p (log p + H)`` to each tile.
Without CUDA the kernels run under Triton's interpreter (see
``test_triton_kernels``), on shapes that span several tiles and splits.

Tolerances: the entropy and lse are formed in float32 from the operands
whatever their dtype (rtol/atol 2e-5 for float32 operands, the half-precision
gradient tolerances of ``test_triton_kernels`` otherwise); argmax is exact.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # conftest.py asks for the interpreter without CUDA

from reference import float64_leaf  # noqa: E402
from test_triton_kernels import (  # noqa: E402
    DEVICE,
    STAT_TOL,
    assert_grads_close,
    make_inputs,
    spec_of,
)

from cce_inductor import config  # noqa: E402
from cce_inductor.kernels import triton_backward, triton_forward  # noqa: E402


@pytest.fixture(autouse=True)
def _exact_gradients(monkeypatch):
    monkeypatch.setattr(config, "filter_eps", None)
    monkeypatch.setattr(config, "triton_autotune", False)


def reference_logits(e, c, bias, options):
    """Float64 logits z, from float64 leaves of e, c and bias."""
    z = e @ c.T
    if bias is not None:
        z = z + bias
    z = z * options.get("logit_scale", 1.0)
    if options.get("softcap") is not None:
        z = options["softcap"] * torch.tanh(z / options["softcap"])
    return z


def reference_entropy(e, c, bias, options):
    log_p = torch.log_softmax(reference_logits(e, c, bias, options), -1)
    return -(log_p.exp() * log_p).sum(-1)


OPTIONS = {
    "plain": {},
    "bias_scale": {"logit_scale": 0.7},
    "softcap": {"softcap": 4.0, "logit_scale": 1.3},
}


@pytest.mark.parametrize("with_targets", [True, False], ids=["targets", "no_targets"])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entropy_and_its_gradient(name, dtype, with_targets):
    options = OPTIONS[name]
    e, c, targets, b, _ = make_inputs(29, 23, 100, dtype, bias=name != "plain")
    targets = targets if with_targets else None
    spec = spec_of(options)
    loss, lse, entropy, argmax, *grads, tile_max = triton_forward.forward(
        e, c, targets, b, None, spec, (False,) * 3, True, None, tile_max=True)
    assert argmax.numel() == 0 and all(g.numel() == 0 for g in grads)
    assert loss.numel() == (1 if with_targets else 0)

    e64, c64 = float64_leaf(e).requires_grad_(), float64_leaf(c).requires_grad_()
    b64 = None if b is None else float64_leaf(b).requires_grad_()
    ref = reference_entropy(e64, c64, b64, options)
    assert entropy.dtype == torch.float32 and entropy.shape == (29,)
    torch.testing.assert_close(entropy.double().cpu(), ref.detach().cpu(),
                               rtol=STAT_TOL[0], atol=STAT_TOL[1])

    gen = torch.Generator().manual_seed(5)
    grad_entropy = torch.randn(29, generator=gen).to(DEVICE)
    grad_lse = torch.randn(29, generator=gen).to(DEVICE)
    ours = triton_backward.backward(None, grad_lse, e, c, targets, b, None, lse, spec,
                                    (True, True, b is not None), grad_entropy, entropy,
                                    tile_max=tile_max)
    lse64 = torch.logsumexp(reference_logits(e64, c64, b64, options), -1)
    total = (ref * grad_entropy.double().cpu()).sum() + (lse64 * grad_lse.double().cpu()).sum()
    leaves = [t for t in (e64, c64, b64) if t is not None]
    want = torch.autograd.grad(total, leaves)
    for got, expected in zip(ours, want):
        assert_grads_close(got, expected, dtype)


def test_entropy_gradient_is_not_filtered(monkeypatch):
    """With filtering on, the entropy's gradient still matches float64 exactly
    (its tiles are never skipped)."""
    monkeypatch.setattr(config, "filter_eps", "auto")
    e, c, targets, _, _ = make_inputs(24, 16, 90, peaked=True)
    spec = spec_of({})
    _, lse, entropy, *_, tile_max = triton_forward.forward(
        e, c, targets, None, None, spec, (False,) * 3, True, tile_max=True)
    grad_entropy = torch.linspace(-1.0, 2.0, 24).to(DEVICE)
    ours = triton_backward.backward(None, None, e, c, None, None, None, lse, spec,
                                    (True, True, False), grad_entropy, entropy,
                                    tile_max=tile_max)
    e64, c64 = float64_leaf(e).requires_grad_(), float64_leaf(c).requires_grad_()
    total = (reference_entropy(e64, c64, None, {}) * grad_entropy.double().cpu()).sum()
    for got, want in zip(ours[:2], torch.autograd.grad(total, (e64, c64))):
        assert_grads_close(got, want, torch.float32)


@pytest.mark.parametrize("n,d,v", [(1, 3, 1), (1, 5, 33), (7, 9, 100), (40, 17, 130)])
def test_odd_shapes(n, d, v):
    e, c, targets, b, _ = make_inputs(n, d, v, bias=True, ignored_fraction=0.0)
    options = {"softcap": 3.0}
    _, _, entropy, argmax, *_ = triton_forward.forward(
        e, c, targets, b, None, spec_of(options), (False,) * 3, True, torch.float32)
    z64 = reference_logits(float64_leaf(e), float64_leaf(c), float64_leaf(b), options)
    ref = reference_entropy(float64_leaf(e), float64_leaf(c), float64_leaf(b), options)
    torch.testing.assert_close(entropy.double().cpu(), ref.cpu(), rtol=STAT_TOL[0],
                               atol=STAT_TOL[1])
    assert torch.equal(argmax.cpu(), z64.argmax(-1).cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_argmax_takes_the_first_of_tied_columns(dtype):
    """Copies of the best class in later tiles and splits lose to the first."""
    gen = torch.Generator().manual_seed(2)
    v, d = 100, 8
    c = torch.randn(v, d, generator=gen)
    e = torch.randn(13, d, generator=gen)
    best = (e @ c.T).argmax(-1)
    winner = int(best[0])
    for copy in (winner + 37, winner + 70, 99):  # another tile, another split
        c[copy % v] = c[winner]
    e, c = e.to(DEVICE), c.to(DEVICE)
    _, _, _, argmax, *_ = triton_forward.forward(
        e, c, None, None, None, spec_of({}), (False,) * 3, False, dtype)
    assert torch.equal(argmax.cpu(), (e @ c.T).to(dtype).argmax(-1).cpu())


def test_argmax_of_logits_rounded_to_the_callers_dtype():
    """Logits that differ only below bfloat16's precision tie after rounding,
    and the first of them wins, as ``z.to(bfloat16).argmax()`` says."""
    d = 4
    c = torch.zeros(64, d)
    c[:, 0] = 1.0
    c[40, 0] = 1.0 + 2**-12  # larger in float32, equal in bfloat16
    e = torch.tensor([[8.0, 0.0, 0.0, 0.0]])
    e, c = e.to(DEVICE), c.to(DEVICE)
    spec = spec_of({})
    first = triton_forward.forward(e, c, None, None, None, spec, (False,) * 3, False,
                                   torch.bfloat16)[3]
    exact = triton_forward.forward(e, c, None, None, None, spec, (False,) * 3, False,
                                   torch.float32)[3]
    assert first.tolist() == [0] and exact.tolist() == [40]


def test_unsupported_argmax_dtype_is_refused():
    e, c, targets, _, _ = make_inputs(3, 4, 5)
    with pytest.raises(ValueError, match="argmax_dtype"):
        triton_forward.forward(e, c, targets, None, None, spec_of({}), (False,) * 3,
                               False, torch.float64)
