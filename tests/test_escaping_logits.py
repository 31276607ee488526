"""Logits returned next to the loss: the op reads them instead of recomputing them.

Hugging Face models return the logits with the loss, so the graph computes
them anyway.  Where they are float32 and the op's rows are a view of them, the
rewritten graph hands them to the op (``logits=``); otherwise it recomputes.
Tolerance: float32, rtol 1e-5 / atol 1e-6 for the loss and the gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from cce_inductor import config, make_backend
from cce_inductor.functional import fused_linear_cross_entropy


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
