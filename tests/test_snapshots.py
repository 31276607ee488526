"""Snapshots of Dynamo graphs before and after the rewrite, one per catalogue form,
and of the AOT forward/backward graphs for two forms.

The graphs are rendered by ``graph_snapshot.render`` so that they read the same
on every supported torch.  To re-record after an intended change:
``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_snapshots.py``.
"""

from __future__ import annotations

import unittest

import expecttest
import torch
import torch._dynamo.testing
from catalogue import FORMS_BY_NAME
from graph_snapshot import render

from cce_inductor.backend import make_backend, rewrite_graph


def snapshot(name: str) -> tuple[str, str]:
    """The rendered Dynamo graph of a catalogue form, before and after the rewrite."""
    form = FORMS_BY_NAME[name]
    if not form.available:
        raise unittest.SkipTest(f"{name} needs a newer torch")
    graphs = {}

    def backend(gm, example_inputs):
        graphs["before"] = render(gm.graph)
        rewrite_graph(gm.graph)
        gm.recompile()
        graphs["after"] = render(gm.graph)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(form.model(), backend=backend)(*form.inputs())
    return graphs["before"], graphs["after"]


def aot_snapshot(name: str) -> tuple[str, str]:
    """The rendered AOT forward and backward graphs of a rewritten form."""
    form = FORMS_BY_NAME[name]
    recorder = torch._dynamo.testing.AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    loss = torch.compile(form.model(), backend=make_backend(recorder))(*form.inputs())
    loss.backward()
    return render(recorder.fw_graphs[0].graph), render(recorder.bw_graphs[0].graph)


class _ReturnsLogits(torch.nn.Module):
    """A Hugging Face causal LM's head: the loss of shifted rows, and all logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(12, 37, bias=False)

    def forward(self, h, y):
        logits = self.lm_head(h)
        shifted = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(shifted.reshape(-1, 37), y[:, 1:].reshape(-1))
        return loss, logits


def returned_logits_snapshots() -> tuple[str, str, str]:
    """The Dynamo graph after the rewrite and the AOT forward and backward graphs
    of ``_ReturnsLogits``, differentiating the loss only."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    y = torch.randint(0, 37, (2, 5), generator=gen)
    graphs = {}
    recorder = torch._dynamo.testing.AotEagerAndRecordGraphs()

    def inner(gm, example_inputs):
        graphs["after"] = render(gm.graph)
        return recorder(gm, example_inputs)

    torch._dynamo.reset()
    loss, _ = torch.compile(_ReturnsLogits(), backend=make_backend(inner))(h, y)
    loss.backward()
    return (graphs["after"], render(recorder.fw_graphs[0].graph),
            render(recorder.bw_graphs[0].graph))


class TestRewriteSnapshots(expecttest.TestCase):
    def test_returned_logits(self):
        """The returned logits come from ``returned_logits``, whose backward
        receives the zero gradient of logits nobody differentiated."""
        after, forward, backward = returned_logits_snapshots()
        self.assertExpectedInline(after, """\
v0 = returned_logits(h, lm_head_weight)
v1 = getitem(y, (:, 1:))
v2 = v1.reshape(-1)
v3 = getitem(h, (:, :-1))
v4 = v3.flatten(0, -2)
v5 = fused_linear_cross_entropy(v4, lm_head_weight, v2, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5, v0)""")
        self.assertExpectedInline(forward, """\
v0 = returned_logits.default(primals_2, primals_1)
v1 = slice.Tensor(primals_3, 1, 1, 9223372036854775807)
v2 = clone.default(v1, memory_format=torch.contiguous_format)
v3 = _unsafe_view.default(v2, [8])
v4 = slice.Tensor(primals_2, 1, 0, -1)
v5 = clone.default(v4, memory_format=torch.contiguous_format)
v6 = _unsafe_view.default(v5, [8, 12])
v7 = view.default(v6, [-1, 12])
v8 = view.default(v3, [-1])
v9 = linear_cross_entropy.default(v7, primals_1, v8, None, None, -100, 'mean', 0.0, None, 1.0, [True, True, False])
v10 = getitem(v9, 0)
v11 = getitem(v9, 5)
v12 = getitem(v9, 6)
return (v10, v0, primals_1, primals_2, v11, v12)""")
        self.assertExpectedInline(backward, """\
v0 = mul.Tensor(getitem_5, tangents_1)
v1 = mul.Tensor(getitem_6, tangents_1)
v2 = view.default(v0, [8, 12])
v3 = view.default(v2, [2, 4, 12])
v4 = slice_backward.default(v3, [2, 5, 12], 1, 0, -1, 1)
v5 = returned_logits_backward.default(tangents_2, primals_2, primals_1, [True, True])
v6 = getitem(v5, 0)
v7 = getitem(v5, 1)
v8 = add.Tensor(v4, v6)
v9 = add.Tensor(v1, v7)
return (v9, v8, None)""")

    def test_categorical(self):
        """``Categorical(logits=z)``: log_prob's broadcast and entropy's clamp
        are seen through; one call serves both."""
        _, after = snapshot("categorical")
        self.assertExpectedInline(after, """\
v0 = y.long()
v1 = v0.unsqueeze(-1)
v2 = h.flatten(0, -2)
v3 = v1.reshape(-1)
v4 = fused_linear_cross_entropy(v2, weight, v3, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32, return_entropy=True)
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
v7 = neg(v5)
v8 = v7.view_as(v1)
v9 = neg(v6)
v10 = v9.reshape((2, 7))
v11 = v8.squeeze(-1)
v12 = neg(v10)
v13 = mul(0.01, v12)
v14 = add(v11, v13)
v15 = v14.mean()
v16 = neg(v15)
return (v16,)""")

    def test_chunked_entropy(self):
        """TRL's entropy over ``split`` pieces of rows: the op's entropy of all
        rows, split as the pieces were, next to the log-probs."""
        _, after = snapshot("chunked_entropy")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (Ellipsis, None))
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, True, loss_dtype=torch.float32, return_entropy=True)
v4 = getitem(v3, 0)
v5 = getitem(v3, 1)
v6 = getitem(v3, 2)
v7 = neg(v4)
v8 = add(v7, v5)
v9 = v8.view_as(v0)
v10 = v5.reshape((2, 7))
v11 = neg(v6)
v12 = v11.reshape((14,))
v13 = getitem(v12, (0:4,))
v14 = v13.reshape((4,))
v15 = neg(v6)
v16 = v15.reshape((14,))
v17 = getitem(v16, (4:8,))
v18 = v17.reshape((4,))
v19 = neg(v6)
v20 = v19.reshape((14,))
v21 = getitem(v20, (8:12,))
v22 = v21.reshape((4,))
v23 = neg(v6)
v24 = v23.reshape((14,))
v25 = getitem(v24, (12:14,))
v26 = v25.reshape((2,))
v27 = v9.squeeze(-1)
v28 = sub(v27, v10)
v29 = neg(v14)
v30 = neg(v18)
v31 = neg(v22)
v32 = neg(v26)
v33 = v28.mean()
v34 = neg(v33)
v35 = cat([v29, v30, v31, v32])
v36 = v35.mean()
v37 = mul(0.01, v36)
v38 = sub(v34, v37)
return (v38,)""")

    def test_linear_2d(self):
        before, after = snapshot("linear_2d")
        self.assertExpectedInline(before, """\
v0 = h.view(-1, 12)
v1 = linear(v0, weight)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = h.view(-1, 12)
v1 = y.view(-1)
v2 = fused_linear_cross_entropy(v0, weight, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_view_3d(self):
        before, after = snapshot("view_3d")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_reshape_3d(self):
        before, after = snapshot("reshape_3d")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.reshape(-1, 37)
v2 = y.reshape(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.reshape(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_flatten_3d(self):
        before, after = snapshot("flatten_3d")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.flatten(0, 1)
v2 = y.flatten()
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.flatten()
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_matmul_t(self):
        before, after = snapshot("matmul_t")
        self.assertExpectedInline(before, """\
v0 = weight.t()
v1 = matmul(h, v0)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_matmul_T(self):
        before, after = snapshot("matmul_T")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_torch_matmul(self):
        before, after = snapshot("torch_matmul")
        self.assertExpectedInline(before, """\
v0 = weight.t()
v1 = matmul(h, v0)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_nn_linear(self):
        before, after = snapshot("nn_linear")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, lm_head_weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_nn_linear_bias(self):
        before, after = snapshot("nn_linear_bias")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight, lm_head_bias)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, lm_head_weight, v0, lm_head_bias, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_bias_add(self):
        before, after = snapshot("bias_add")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = add(v1, bias)
v3 = v2.view(-1, 37)
v4 = y.view(-1)
v5 = cross_entropy(v3, v4)
return (v5,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, bias, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_tied_embedding(self):
        before, after = snapshot("tied_embedding")
        self.assertExpectedInline(before, """\
v0 = y.clamp(min=0)
v1 = embedding(v0, embed_weight, None, None, 2.0, False, False)
v2 = add(h, v1)
v3 = linear(v2, embed_weight)
v4 = v3.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = y.clamp(min=0)
v1 = embedding(v0, embed_weight, None, None, 2.0, False, False)
v2 = add(h, v1)
v3 = y.view(-1)
v4 = v2.flatten(0, -2)
v5 = fused_linear_cross_entropy(v4, embed_weight, v3, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5,)""")

    def test_upcast_float(self):
        before, after = snapshot("upcast_float")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = v0.float()
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, lm_head_weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_upcast_to(self):
        before, after = snapshot("upcast_to")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.to(torch.float32)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_autocast_bf16(self):
        before, after = snapshot("autocast_bf16")
        self.assertExpectedInline(before, """\
v0 = _enter_autocast('cpu', torch.bfloat16, True)
v1 = linear(h, lm_head_weight)
v2 = _exit_autocast(v0)
v3 = v1.float()
v4 = v3.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = _enter_autocast('cpu', torch.bfloat16, True)
v1 = _exit_autocast(v0)
v2 = y.view(-1)
v3 = h.flatten(0, -2)
v4 = v3.to(torch.bfloat16)
v5 = lm_head_weight.to(torch.bfloat16)
v6 = fused_linear_cross_entropy(v4, v5, v2, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v6,)""")

    def test_shift_contiguous(self):
        before, after = snapshot("shift_contiguous")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = getitem(v0, (:, :-1))
v2 = v1.contiguous()
v3 = v2.view(-1, 37)
v4 = getitem(y, (:, 1:))
v5 = v4.contiguous()
v6 = v5.view(-1)
v7 = cross_entropy(v3, v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (:, 1:))
v1 = v0.contiguous()
v2 = v1.view(-1)
v3 = getitem(h, (:, :-1))
v4 = v3.flatten(0, -2)
v5 = fused_linear_cross_entropy(v4, weight, v2, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5,)""")

    def test_shift_reshape(self):
        before, after = snapshot("shift_reshape")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = getitem(v0, (:, :-1))
v2 = v1.reshape(-1, 37)
v3 = getitem(y, (:, 1:))
v4 = v3.reshape(-1)
v5 = cross_entropy(v2, v4)
return (v5,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (:, 1:))
v1 = v0.reshape(-1)
v2 = getitem(h, (:, :-1))
v3 = v2.flatten(0, -2)
v4 = fused_linear_cross_entropy(v3, weight, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v4,)""")

    def test_hf_pad_shift(self):
        before, after = snapshot("hf_pad_shift")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = v0.float()
v2 = pad(y, (0, 1), 'constant', -100)
v3 = getitem(v2, (Ellipsis, 1:))
v4 = v3.contiguous()
v5 = v1.view(-1, 37)
v6 = v4.view(-1)
v7 = cross_entropy(v5, v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = pad(y, (0, 1), 'constant', -100)
v1 = getitem(v0, (Ellipsis, 1:))
v2 = v1.contiguous()
v3 = v2.view(-1)
v4 = h.flatten(0, -2)
v5 = fused_linear_cross_entropy(v4, lm_head_weight, v3, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5,)""")

    def test_log_softmax_nll(self):
        before, after = snapshot("log_softmax_nll")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = log_softmax(v1, -1)
v3 = y.view(-1)
v4 = nll_loss(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_gather_mean(self):
        before, after = snapshot("gather_mean")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = log_softmax(v1, -1)
v3 = y.unsqueeze(-1)
v4 = v2.gather(-1, v3)
v5 = v4.squeeze(-1)
v6 = v5.mean()
v7 = neg(v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = y.unsqueeze(-1)
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v4 = neg(v3)
v5 = v4.view_as(v0)
v6 = v5.squeeze(-1)
v7 = v6.mean()
v8 = neg(v7)
return (v8,)""")

    def test_gather_sum(self):
        before, after = snapshot("gather_sum")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = log_softmax(v1, dim=-1)
v3 = y.unsqueeze(-1)
v4 = v2.gather(-1, v3)
v5 = v4.sum()
v6 = neg(v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = y.unsqueeze(-1)
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v4 = neg(v3)
v5 = v4.view_as(v0)
v6 = v5.sum()
v7 = neg(v6)
return (v7,)""")

    def test_gather_masked_mean(self):
        before, after = snapshot("gather_masked_mean")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = log_softmax(v1, dim=-1)
v3 = y.unsqueeze(-1)
v4 = v2.gather(-1, v3)
v5 = v4.squeeze(-1)
v6 = neg(v5)
v7 = mod(y, 3)
v8 = ne(v7, 0)
v9 = v8.float()
v10 = mul(v6, v9)
v11 = v10.sum()
v12 = v9.sum()
v13 = truediv(v11, v12)
return (v13,)""")
        self.assertExpectedInline(after, """\
v0 = y.unsqueeze(-1)
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v4 = neg(v3)
v5 = v4.view_as(v0)
v6 = v5.squeeze(-1)
v7 = neg(v6)
v8 = mod(y, 3)
v9 = ne(v8, 0)
v10 = v9.float()
v11 = mul(v7, v10)
v12 = v11.sum()
v13 = v10.sum()
v14 = truediv(v12, v13)
return (v14,)""")

    def test_cross_entropy_module(self):
        before, after = snapshot("cross_entropy_module")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = v2.clamp(min=0)
v4 = cross_entropy(v1, v3, ignore_index=5)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = v0.clamp(min=0)
v2 = h.flatten(0, -2)
v3 = fused_linear_cross_entropy(v2, lm_head_weight, v1, None, None, 5, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v3,)""")

    def test_ignore_index(self):
        before, after = snapshot("ignore_index")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = v2.clamp(min=0)
v4 = cross_entropy(v1, v3, ignore_index=3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = v0.clamp(min=0)
v2 = h.flatten(0, -2)
v3 = fused_linear_cross_entropy(v2, weight, v1, None, None, 3, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v3,)""")

    def test_reduction_none(self):
        before, after = snapshot("reduction_none")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2, reduction='none')
v4 = v3.pow(2)
v5 = v4.sum()
return (v5,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v3 = v2.view_as(v0)
v4 = v3.pow(2)
v5 = v4.sum()
return (v5,)""")

    def test_reduction_sum(self):
        before, after = snapshot("reduction_sum")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2, reduction='sum')
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'sum', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_sum_over_count(self):
        before, after = snapshot("sum_over_count")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2, reduction='sum')
v4 = ne(y, -100)
v5 = v4.sum()
v6 = truediv(v3, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'sum', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v3 = ne(y, -100)
v4 = v3.sum()
v5 = truediv(v2, v4)
return (v5,)""")

    def test_label_smoothing(self):
        before, after = snapshot("label_smoothing")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2, label_smoothing=0.1)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.1, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_class_weight(self):
        before, after = snapshot("class_weight")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = getitem(embed_weight, (:, 0))
v4 = v3.detach()
v5 = v4.abs()
v6 = add(v5, 0.5)
v7 = cross_entropy(v1, v2, weight=v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = getitem(embed_weight, (:, 0))
v2 = v1.detach()
v3 = v2.abs()
v4 = add(v3, 0.5)
v5 = h.flatten(0, -2)
v6 = fused_linear_cross_entropy(v5, weight, v0, None, v4, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v6,)""")

    def test_softcap(self):
        before, after = snapshot("softcap")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = truediv(v0, 30.0)
v2 = tanh(v1)
v3 = mul(30.0, v2)
v4 = v3.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, 30.0, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_softcap_gemma(self):
        before, after = snapshot("softcap_gemma")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = truediv(v0, 5.0)
v2 = tanh(v1)
v3 = mul(v2, 5.0)
v4 = v3.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, 5.0, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_scale_mul(self):
        before, after = snapshot("scale_mul")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = mul(v0, 0.5)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 0.5, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_scale_div(self):
        before, after = snapshot("scale_div")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = truediv(v0, 0.7)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.428571, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_z_loss(self):
        before, after = snapshot("z_loss")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
v4 = logsumexp(v1, -1)
v5 = v4.pow(2)
v6 = v5.mean()
v7 = mul(0.01, v6)
v8 = add(v3, v7)
return (v8,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, True, loss_dtype=torch.float32)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = v4.reshape((14,))
v6 = v5.pow(2)
v7 = v6.mean()
v8 = mul(0.01, v7)
v9 = add(v3, v8)
return (v9,)""")

    def test_soft_targets(self):
        before, after = snapshot("soft_targets")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = v2.clamp(min=0)
v4 = one_hot(v3, 37)
v5 = v4.float()
v6 = cross_entropy(v1, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = v2.clamp(min=0)
v4 = one_hot(v3, 37)
v5 = v4.float()
v6 = cross_entropy(v1, v5)
return (v6,)""")

    def test_log_softmax_other_dim(self):
        before, after = snapshot("log_softmax_other_dim")
        self.assertExpectedInline(before, """\
v0 = h.view(-1, 12)
v1 = linear(v0, weight)
v2 = log_softmax(v1, 0)
v3 = y.view(-1, 1)
v4 = v2.gather(-1, v3)
v5 = v4.mean()
v6 = neg(v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = h.view(-1, 12)
v1 = linear(v0, weight)
v2 = log_softmax(v1, 0)
v3 = y.view(-1, 1)
v4 = v2.gather(-1, v3)
v5 = v4.mean()
v6 = neg(v5)
return (v6,)""")

    def test_argmax_consumer(self):
        before, after = snapshot("argmax_consumer")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = v1.argmax(-1)
v3 = y.view(-1)
v4 = eq(v2, v3)
v5 = v4.float()
v6 = v5.mean()
v7 = y.view(-1)
v8 = cross_entropy(v1, v7)
v9 = mul(0.0, v6)
v10 = add(v8, v9)
return (v10,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, argmax_dtype=torch.float32, loss_dtype=torch.float32)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = v4.reshape((14,))
v6 = y.view(-1)
v7 = eq(v5, v6)
v8 = v7.float()
v9 = v8.mean()
v10 = mul(0.0, v9)
v11 = add(v3, v10)
return (v11,)""")

    def test_two_losses(self):
        before, after = snapshot("two_losses")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
v4 = log_softmax(v1, -1)
v5 = y.view(-1)
v6 = v5.clamp(min=0)
v7 = nll_loss(v4, v6)
v8 = add(v3, v7)
return (v8,)""")
        self.assertExpectedInline(after, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
v4 = log_softmax(v1, -1)
v5 = y.view(-1)
v6 = v5.clamp(min=0)
v7 = nll_loss(v4, v6)
v8 = add(v3, v7)
return (v8,)""")

    def test_class_dim_1(self):
        before, after = snapshot("class_dim_1")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.transpose(1, 2)
v2 = cross_entropy(v1, y)
return (v2,)""")
        self.assertExpectedInline(after, """\
v0 = h.flatten(0, -2)
v1 = y.reshape(-1)
v2 = fused_linear_cross_entropy(v0, weight, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_ellipsis_shift(self):
        before, after = snapshot("ellipsis_shift")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = getitem(v0, (Ellipsis, :-1, :))
v2 = v1.contiguous()
v3 = getitem(y, (Ellipsis, 1:))
v4 = v3.contiguous()
v5 = v2.view(-1, 37)
v6 = v4.view(-1)
v7 = cross_entropy(v5, v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (Ellipsis, 1:))
v1 = v0.contiguous()
v2 = v1.view(-1)
v3 = getitem(h, (:, :-1))
v4 = v3.flatten(0, -2)
v5 = fused_linear_cross_entropy(v4, lm_head_weight, v2, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5,)""")

    def test_log_softmax_view_nll(self):
        before, after = snapshot("log_softmax_view_nll")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = log_softmax(v0, -1)
v2 = v1.view(-1, 37)
v3 = y.view(-1)
v4 = nll_loss(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_permute_class_dim(self):
        before, after = snapshot("permute_class_dim")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.permute(0, 2, 1)
v2 = cross_entropy(v1, y)
return (v2,)""")
        self.assertExpectedInline(after, """\
v0 = h.flatten(0, -2)
v1 = y.reshape(-1)
v2 = fused_linear_cross_entropy(v0, weight, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_einsum(self):
        before, after = snapshot("einsum")
        self.assertExpectedInline(before, """\
v0 = einsum('btd,vd->btv', h, weight)
v1 = v0.reshape(-1, 37)
v2 = y.reshape(-1)
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = y.reshape(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_addmm(self):
        before, after = snapshot("addmm")
        self.assertExpectedInline(before, """\
v0 = h.view(-1, 12)
v1 = weight.t()
v2 = addmm(bias, v0, v1)
v3 = y.view(-1)
v4 = cross_entropy(v2, v3)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = h.view(-1, 12)
v1 = y.view(-1)
v2 = fused_linear_cross_entropy(v0, weight, v1, bias, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_last_position(self):
        before, after = snapshot("last_position")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = getitem(v0, (:, -1, :))
v2 = getitem(y, (:, -1))
v3 = cross_entropy(v1, v2)
return (v3,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (:, -1))
v1 = getitem(h, (:, -1))
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")

    def test_final_logits_bias(self):
        before, after = snapshot("final_logits_bias")
        self.assertExpectedInline(before, """\
v0 = bias.detach()
v1 = v0.view(1, 37)
v2 = linear(h, weight)
v3 = add(v2, v1)
v4 = v3.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = bias.detach()
v1 = v0.view(1, 37)
v2 = y.view(-1)
v3 = h.flatten(0, -2)
v4 = v1.reshape(-1)
v5 = fused_linear_cross_entropy(v3, weight, v2, v4, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v5,)""")

    def test_padded_vocabulary(self):
        before, after = snapshot("padded_vocabulary")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = getitem(v0, (Ellipsis, :32))
v2 = v1.reshape(-1, 32)
v3 = mod(y, 32)
v4 = v3.reshape(-1)
v5 = cross_entropy(v2, v4)
return (v5,)""")
        self.assertExpectedInline(after, """\
v0 = mod(y, 32)
v1 = v0.reshape(-1)
v2 = h.flatten(0, -2)
v3 = getitem(weight, 0:32)
v4 = fused_linear_cross_entropy(v2, v3, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v4,)""")

    def test_take_along_dim(self):
        before, after = snapshot("take_along_dim")
        self.assertExpectedInline(before, """\
v0 = getattr(weight, 'T')
v1 = matmul(h, v0)
v2 = log_softmax(v1, -1)
v3 = getitem(y, (Ellipsis, None))
v4 = take_along_dim(v2, v3, dim=-1)
v5 = v4.mean()
v6 = neg(v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (Ellipsis, None))
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v4 = neg(v3)
v5 = v4.view_as(v0)
v6 = v5.mean()
v7 = neg(v6)
return (v7,)""")

    def test_handwritten_log_softmax(self):
        before, after = snapshot("handwritten_log_softmax")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.logsumexp(-1, keepdim=True)
v2 = sub(v0, v1)
v3 = getitem(y, (Ellipsis, None))
v4 = v2.gather(-1, v3)
v5 = v4.mean()
v6 = neg(v5)
return (v6,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (Ellipsis, None))
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v4 = neg(v3)
v5 = v4.view_as(v0)
v6 = v5.mean()
v7 = neg(v6)
return (v7,)""")

    def test_selective_log_softmax(self):
        before, after = snapshot("selective_log_softmax")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = y.unsqueeze(-1)
v2 = v0.gather(-1, v1)
v3 = v2.squeeze(-1)
v4 = v0.logsumexp(-1)
v5 = sub(v3, v4)
v6 = v5.mean()
v7 = neg(v6)
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = y.unsqueeze(-1)
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, True, loss_dtype=torch.float32)
v4 = getitem(v3, 0)
v5 = getitem(v3, 1)
v6 = neg(v4)
v7 = add(v6, v5)
v8 = v7.view_as(v0)
v9 = v5.reshape((2, 7))
v10 = v8.squeeze(-1)
v11 = sub(v10, v9)
v12 = v11.mean()
v13 = neg(v12)
return (v13,)""")

    def test_grpo_inplace_temperature(self):
        before, after = snapshot("grpo_inplace_temperature")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = getitem(v0, (:, :-1, :))
v2 = getitem(v1, (:, -4:))
v3 = v2.div_(0.7)
v4 = log_softmax(v2, -1)
v5 = getitem(y, (:, -4:, None))
v6 = v4.gather(-1, v5)
v7 = v6.squeeze(-1)
v8 = v7.sum()
v9 = neg(v8)
return (v9,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (:, -4:, None))
v1 = getitem(h, (:, :-1))
v2 = getitem(v1, (:, -4:))
v3 = v2.flatten(0, -2)
v4 = v0.reshape(-1)
v5 = fused_linear_cross_entropy(v3, weight, v4, None, None, -9223372036854775808, 'none', 0.0, None, 1.428571, False, loss_dtype=torch.float32)
v6 = neg(v5)
v7 = v6.view_as(v0)
v8 = v7.squeeze(-1)
v9 = v8.sum()
v10 = neg(v9)
return (v10,)""")

    def test_logprob_and_entropy(self):
        before, after = snapshot("logprob_and_entropy")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = truediv(v0, 0.9)
v2 = log_softmax(v1, -1)
v3 = getitem(y, (Ellipsis, None))
v4 = v2.gather(-1, v3)
v5 = v4.squeeze(-1)
v6 = v2.exp()
v7 = mul(v6, v2)
v8 = v7.sum(-1)
v9 = neg(v8)
v10 = mul(0.01, v9)
v11 = add(v5, v10)
v12 = v11.mean()
v13 = neg(v12)
return (v13,)""")
        self.assertExpectedInline(after, """\
v0 = getitem(y, (Ellipsis, None))
v1 = h.flatten(0, -2)
v2 = v0.reshape(-1)
v3 = fused_linear_cross_entropy(v1, weight, v2, None, None, -9223372036854775808, 'none', 0.0, None, 1.111111, False, loss_dtype=torch.float32, return_entropy=True)
v4 = getitem(v3, 0)
v5 = getitem(v3, 1)
v6 = neg(v4)
v7 = v6.view_as(v0)
v8 = neg(v5)
v9 = v8.reshape((2, 7))
v10 = v7.squeeze(-1)
v11 = neg(v9)
v12 = mul(0.01, v11)
v13 = add(v10, v12)
v14 = v13.mean()
v15 = neg(v14)
return (v15,)""")

    def test_entropy_softmax(self):
        before, after = snapshot("entropy_softmax")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = softmax(v0, -1)
v2 = log_softmax(v0, -1)
v3 = mul(v1, v2)
v4 = v3.sum(-1)
v5 = neg(v4)
v6 = v0.view(-1, 37)
v7 = y.view(-1)
v8 = cross_entropy(v6, v7)
v9 = v5.mean()
v10 = mul(0.1, v9)
v11 = sub(v8, v10)
return (v11,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32, return_entropy=True)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = neg(v4)
v6 = v5.reshape((2, 7))
v7 = neg(v6)
v8 = v7.mean()
v9 = mul(0.1, v8)
v10 = sub(v3, v9)
return (v10,)""")

    def test_entropy_lse(self):
        before, after = snapshot("entropy_lse")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = logsumexp(v0, -1)
v2 = softmax(v0, -1)
v3 = mul(v2, v0)
v4 = v3.sum(-1)
v5 = sub(v1, v4)
v6 = v5.pow(2)
v7 = v6.mean()
return (v7,)""")
        self.assertExpectedInline(after, """\
v0 = h.flatten(0, -2)
v1 = fused_linear_cross_entropy(v0, weight, None, None, None, -100, 'none', 0.0, None, 1.0, True, loss_dtype=torch.float32, return_entropy=True)
v2 = getitem(v1, 1)
v3 = getitem(v1, 2)
v4 = v2.reshape((2, 7))
v5 = sub(v2, v3)
v6 = v5.reshape((2, 7))
v7 = sub(v4, v6)
v8 = v7.pow(2)
v9 = v8.mean()
return (v9,)""")

    def test_reference_logprobs(self):
        before, after = snapshot("reference_logprobs")
        self.assertExpectedInline(before, """\
v0 = _set_grad_enabled(False)
v1 = linear(h, embed_weight)
v2 = log_softmax(v1, -1)
v3 = getitem(y, (Ellipsis, None))
v4 = v2.gather(-1, v3)
v5 = v4.squeeze(-1)
v6 = _set_grad_enabled(True)
v7 = linear(h, lm_head_weight)
v8 = v7.view(-1, 37)
v9 = y.view(-1)
v10 = cross_entropy(v8, v9, reduction='none')
v11 = neg(v10)
v12 = v11.view_as(v5)
v13 = sub(v12, v5)
v14 = pow(v13, 2)
v15 = v14.mean()
return (v15,)""")
        self.assertExpectedInline(after, """\
v0 = _set_grad_enabled(False)
v1 = getitem(y, (Ellipsis, None))
v2 = h.flatten(0, -2)
v3 = v1.reshape(-1)
v4 = fused_linear_cross_entropy(v2, embed_weight, v3, None, None, -9223372036854775808, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v5 = neg(v4)
v6 = v5.view_as(v1)
v7 = v6.squeeze(-1)
v8 = _set_grad_enabled(True)
v9 = y.view(-1)
v10 = h.flatten(0, -2)
v11 = fused_linear_cross_entropy(v10, lm_head_weight, v9, None, None, -100, 'none', 0.0, None, 1.0, False, loss_dtype=torch.float32)
v12 = v11.view_as(v9)
v13 = neg(v12)
v14 = v13.view_as(v7)
v15 = sub(v14, v7)
v16 = pow(v15, 2)
v17 = v16.mean()
return (v17,)""")

    def test_accuracy_no_grad(self):
        before, after = snapshot("accuracy_no_grad")
        self.assertExpectedInline(before, """\
v0 = linear(h, lm_head_weight)
v1 = v0.view(-1, 37)
v2 = y.view(-1)
v3 = cross_entropy(v1, v2)
v4 = _set_grad_enabled(False)
v5 = v0.argmax(-1)
v6 = eq(v5, y)
v7 = v6.float()
v8 = v7.mean()
v9 = _set_grad_enabled(True)
v10 = mul(0.0, v8)
v11 = add(v3, v10)
return (v11,)""")
        self.assertExpectedInline(after, """\
v0 = y.view(-1)
v1 = h.flatten(0, -2)
v2 = fused_linear_cross_entropy(v1, lm_head_weight, v0, None, None, -100, 'mean', 0.0, None, 1.0, False, argmax_dtype=torch.float32, loss_dtype=torch.float32)
v3 = getitem(v2, 0)
v4 = getitem(v2, 1)
v5 = v4.reshape((2, 7))
v6 = _set_grad_enabled(False)
v7 = eq(v5, y)
v8 = v7.float()
v9 = v8.mean()
v10 = _set_grad_enabled(True)
v11 = mul(0.0, v9)
v12 = add(v3, v11)
return (v12,)""")

    def test_sampling(self):
        before, after = snapshot("sampling")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = softmax(v1, -1)
v3 = multinomial(v2, 1)
v4 = v0.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
v7 = v3.sum()
v8 = mul(0.0, v7)
v9 = add(v6, v8)
return (v9,)""")
        self.assertExpectedInline(after, """\
v0 = linear(h, weight)
v1 = v0.view(-1, 37)
v2 = softmax(v1, -1)
v3 = multinomial(v2, 1)
v4 = v0.view(-1, 37)
v5 = y.view(-1)
v6 = cross_entropy(v4, v5)
v7 = v3.sum()
v8 = mul(0.0, v7)
v9 = add(v6, v8)
return (v9,)""")

    def test_full_kl(self):
        before, after = snapshot("full_kl")
        self.assertExpectedInline(before, """\
v0 = linear(h, weight)
v1 = log_softmax(v0, -1)
v2 = linear(h, embed_weight)
v3 = log_softmax(v2, -1)
v4 = v3.detach()
v5 = kl_div(v1, v4, log_target=True, reduction='batchmean')
v6 = getitem(y, (Ellipsis, None))
v7 = v1.gather(-1, v6)
v8 = v7.mean()
v9 = neg(v8)
v10 = add(v9, v5)
return (v10,)""")
        self.assertExpectedInline(after, """\
v0 = linear(h, weight)
v1 = log_softmax(v0, -1)
v2 = linear(h, embed_weight)
v3 = log_softmax(v2, -1)
v4 = v3.detach()
v5 = kl_div(v1, v4, log_target=True, reduction='batchmean')
v6 = getitem(y, (Ellipsis, None))
v7 = v1.gather(-1, v6)
v8 = v7.mean()
v9 = neg(v8)
v10 = add(v9, v5)
return (v10,)""")

    def test_aot_graphs_view_3d(self):
        forward, backward = aot_snapshot("view_3d")
        self.assertExpectedInline(forward, """\
v0 = view.default(primals_3, [-1])
v1 = view.default(primals_2, [14, 12])
v2 = view.default(v1, [-1, 12])
v3 = view.default(v0, [-1])
v4 = linear_cross_entropy.default(v2, primals_1, v3, None, None, -100, 'mean', 0.0, None, 1.0, [True, True, False])
v5 = getitem(v4, 0)
v6 = getitem(v4, 5)
v7 = getitem(v4, 6)
return (v5, v6, v7)""")
        self.assertExpectedInline(backward, """\
v0 = mul.Tensor(getitem_5, tangents_1)
v1 = mul.Tensor(getitem_6, tangents_1)
v2 = view.default(v0, [14, 12])
v3 = view.default(v2, [2, 7, 12])
return (v1, v3, None)""")

    def test_aot_graphs_reduction_none(self):
        forward, backward = aot_snapshot("reduction_none")
        self.assertExpectedInline(forward, """\
v0 = view.default(primals_3, [-1])
v1 = view.default(primals_2, [14, 12])
v2 = view.default(v1, [-1, 12])
v3 = view.default(v0, [-1])
v4 = linear_cross_entropy.default(v2, primals_1, v3, None, None, -100, 'none', 0.0, None, 1.0, [False, False, False])
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
v7 = getitem(v4, 2)
v8 = getitem(v4, 4)
v9 = detach.default(v6)
v10 = detach.default(v7)
v11 = view.default(v5, [14])
v12 = view.default(v11, [14])
v13 = pow.Tensor_Scalar(v12, 2)
v14 = sum.default(v13)
v15 = pow.Tensor_Scalar(v12, 1.0)
v16 = mul.Scalar(v15, 2.0)
v17 = detach.default(v9)
v18 = detach.default(v10)
return (v14, primals_1, v2, v3, v8, v16, v17, v18)""")
        self.assertExpectedInline(backward, """\
v0 = expand.default(tangents_1, [14])
v1 = mul.Tensor(v0, mul)
v2 = view.default(v1, [14])
v3 = view.default(v2, [14])
v4 = linear_cross_entropy_backward.default(v3, None, None, view_2, primals_1, view_3, None, None, detach_2, detach_3, getitem_4, -100, 'none', 0.0, None, 1.0, [True, True, False])
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
v7 = view.default(v5, [14, 12])
v8 = view.default(v7, [2, 7, 12])
return (v6, v8, None)""")

    def test_torch_linear_cross_entropy(self):
        before, after = snapshot("torch_linear_cross_entropy")
        self.assertExpectedInline(before, """\
v0 = h.view(-1, 12)
v1 = y.view(-1)
v2 = linear(v0, weight)
v3 = v2.reshape((14, 37))
v4 = cross_entropy(v3, v1)
return (v4,)""")
        self.assertExpectedInline(after, """\
v0 = h.view(-1, 12)
v1 = y.view(-1)
v2 = fused_linear_cross_entropy(v0, weight, v1, None, None, -100, 'mean', 0.0, None, 1.0, False, loss_dtype=torch.float32)
return (v2,)""")
