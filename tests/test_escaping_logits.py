"""Logits returned next to the loss: the op reads them instead of recomputing them.

Hugging Face models return the logits with the loss, so the graph computes
them anyway.  Where they are float32 and the op's rows are a view of them, the
rewritten graph hands them to the op (``logits=``); otherwise it recomputes.
Tolerance: float32, rtol 1e-5 / atol 1e-6 for the loss and the gradients.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cce_inductor import config, make_backend
from cce_inductor.functional import fused_linear_cross_entropy
from cce_inductor.returned_logits import returned_logits, returned_logits_op


def returns_logits(shift: bool):
    def loss_and_logits(h, w, y):
        logits = F.linear(h, w)
        rows = logits[:, :-1] if shift else logits
        labels = y[:, 1:] if shift else y
        loss = F.cross_entropy(rows.float().reshape(-1, w.shape[0]), labels.reshape(-1))
        return loss, logits
    return loss_and_logits


def compiled_op_calls(fn, *args):
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(fn, backend=make_backend(inner))(*args)
    calls = [n for gm in graphs for n in gm.graph.nodes
             if n.target is fused_linear_cross_entropy]
    return out, calls


def operands(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(41, 16, generator=gen) * 0.3).to(dtype).requires_grad_()
    y = torch.randint(0, 41, (2, 9), generator=gen)
    return h, w, y


def test_float32_returned_logits_are_read_and_exact():
    h, w, y = operands()
    fn = returns_logits(shift=False)
    (loss, logits), calls = compiled_op_calls(fn, h, w, y)
    assert len(calls) == 1 and calls[0].kwargs["logits"] is not None
    ref_loss, ref_logits = fn(h, w, y)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (h, w))
    ref_grads = torch.autograd.grad(ref_loss, (h, w))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rows_that_need_a_copy_are_recomputed():
    h, w, y = operands()
    fn = returns_logits(shift=True)
    (loss, _), calls = compiled_op_calls(fn, h, w, y)
    assert len(calls) == 1 and calls[0].kwargs["logits"] is None
    torch.testing.assert_close(loss, fn(h, w, y)[0], rtol=1e-5, atol=1e-6)


def test_half_precision_logits_are_recomputed():
    h, w, y = operands(torch.bfloat16)
    _, calls = compiled_op_calls(returns_logits(shift=False), h, w, y)
    assert len(calls) == 1 and calls[0].kwargs["logits"] is None


def test_dropped_logits_are_not_read(monkeypatch):
    monkeypatch.setattr(config, "drop_escaping_logits", True)
    h, w, y = operands()
    with warnings.catch_warnings():  # warned about once per process
        warnings.simplefilter("ignore")
        (_, logits), calls = compiled_op_calls(returns_logits(shift=False), h, w, y)
    assert calls[0].kwargs["logits"] is None and logits.numel() == 0


# ---- the linear of returned logits -------------------------------------------------

def test_returned_logits_come_from_the_zero_skipping_linear():
    h, w, y = operands()
    fn = returns_logits(shift=True)
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    torch.compile(fn, backend=make_backend(inner))(h, w, y)
    targets = [n.target for gm in graphs for n in gm.graph.nodes]
    assert returned_logits in targets
    assert not any(t in (F.linear, torch._C._nn.linear) for t in targets)


@pytest.mark.parametrize("spelling", ["linear_bias", "addmm", "matmul"])
@pytest.mark.parametrize("use_logits", [False, True], ids=["loss_only", "loss_and_logits"])
def test_gradients_through_returned_logits(spelling, use_logits):
    """Only the loss differentiated (a zero gradient reaches the returned logits'
    linear) and both differentiated: the same gradients as eager."""
    h, w, y = operands()
    b = (torch.randn(41, generator=torch.Generator().manual_seed(1)) * 0.1).requires_grad_()

    def fn(h, w, b, y):
        flat = h.reshape(-1, 16)
        if spelling == "linear_bias":
            logits = F.linear(flat, w, b)
        elif spelling == "addmm":
            logits = torch.addmm(b, flat, w.t())
        else:
            logits = flat @ w.T
        return F.cross_entropy(logits, y.reshape(-1)), logits

    def total(loss, logits):
        return loss + (logits.square().mean() if use_logits else 0)

    torch._dynamo.reset()
    loss, logits = torch.compile(fn, backend=make_backend("aot_eager"))(h, w, b, y)
    params = (h, w, b) if spelling != "matmul" else (h, w)
    got = torch.autograd.grad(total(loss, logits), params)
    want = torch.autograd.grad(total(*fn(h, w, b, y)), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_returned_logits_under_autocast():
    h, w, y = operands()

    def fn(h, w, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(h, w)
        return F.cross_entropy(logits.float().reshape(-1, 41), y.reshape(-1)), logits

    torch._dynamo.reset()
    loss, logits = torch.compile(fn, backend=make_backend("aot_eager"))(h, w, y)
    ref_loss, ref_logits = fn(h, w, y)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, ref_logits, rtol=1e-2, atol=1e-2)  # bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)


def test_returned_logits_op_contract():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(11, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(returned_logits_op, (x, c))
    out = returned_logits(x, c)
    torch.testing.assert_close(out, x @ c.T, rtol=0, atol=0)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, c), upstream)
    want = torch.autograd.grad(x @ c.T, (x, c), upstream)
    for g, r in zip(got, want):  # float64 against float64: rounding only
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    zeros = torch.autograd.grad(returned_logits(x, c), (x, c), torch.zeros_like(out))
    assert all(not g.any() and g.shape == t.shape for g, t in zip(zeros, (x, c)))
    with pytest.raises(ValueError, match="same D"):
        returned_logits(x, c[:, :3])
