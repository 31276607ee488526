"""The op as torch.library and torch.compile see it, and its argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import float64_leaf, reference_loss
from test_op import make_inputs

from cce_inductor import linear_cross_entropy
from cce_inductor.op import linear_cross_entropy_backward_op, linear_cross_entropy_op


def _opcheck_cases():
    for reduction, smoothing, softcap, scale, with_bias, with_weight, pre in \
            itertools.product(["mean", "sum", "none"], [0.0, 0.2], [None, 3.0],
                              [1.0, 0.5], [False, True], [False, True], [False, True]):
        if pre and reduction == "none":
            continue
        yield reduction, smoothing, softcap, scale, with_bias, with_weight, pre


@pytest.mark.parametrize("case", list(_opcheck_cases()), ids=str)
def test_opcheck_every_option_combination(case):
    reduction, smoothing, softcap, scale, with_bias, with_weight, pre = case
    e, c, targets, b, w = make_inputs(7, 5, 11, bias=with_bias, weight=with_weight)
    args = (e, c, targets, b, w, -100, reduction, smoothing, softcap, scale,
            [pre, pre, pre and with_bias])
    torch.library.opcheck(linear_cross_entropy_op, args)


@pytest.mark.parametrize("with_targets", [True, False])
def test_opcheck_with_row_statistics(with_targets):
    """Entropy and argmax next to the loss, and without targets at all."""
    e, c, targets, b, _ = make_inputs(7, 5, 11, bias=True, ignore_index=-100)
    args = (e, c, targets if with_targets else None, b, None, -100, "none", 0.0, 2.0,
            1.3, [False] * 3, True, torch.bfloat16)
    torch.library.opcheck(linear_cross_entropy_op, args)


def test_opcheck_backward_op():
    e, c, targets, b, w = make_inputs(7, 5, 11, bias=True, weight=True)
    with torch.no_grad():
        _, lse, entropy, *_ = linear_cross_entropy_op(
            e, c, targets, b, w, -100, "none", 0.1, 2.0, 1.0, [False] * 3, True)
    args = (torch.randn(7), torch.randn(7), torch.randn(7), e.detach(), c.detach(),
            targets, b.detach(), w, lse, entropy, lse.new_empty(0), -100, "none", 0.1, 2.0,
            1.0, [True, True, True])
    torch.library.opcheck(linear_cross_entropy_backward_op, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiles_fullgraph_dynamic_without_recompiling(reduction):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    def loss_fn(e, c, targets, b):
        loss, lse = linear_cross_entropy(e, c, targets, bias=b, reduction=reduction,
                                         softcap=3.0, return_lse=True)
        return loss.sum() + 1e-3 * lse.pow(2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=True, backend=counter)
    frames_after_first = None
    for n in (9, 13, 31):
        e, c, targets, b, _ = make_inputs(n, 6, 19, bias=True, seed=n)
        out = compiled(e, c, targets, b)
        out.backward()
        if frames_after_first is None:
            frames_after_first = counter.frame_count
        e64, c64, b64 = float64_leaf(e), float64_leaf(c), float64_leaf(b)
        ref_loss, ref_lse = reference_loss(e64, c64, targets, bias=b64,
                                           reduction=reduction, softcap=3.0,
                                           return_lse=True)
        ref = ref_loss.sum() + 1e-3 * ref_lse.pow(2).sum()
        ref.backward()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for t, t64 in zip((e, c, b), (e64, c64, b64)):
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames_after_first, "recompiled when N changed"


def test_compiled_scalar_loss_uses_forward_gradients():
    torch._dynamo.reset()
    e, c, targets, b, _ = make_inputs(16, 6, 19, bias=True)
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    compiled(e, c, targets, bias=b, label_smoothing=0.1).backward()
    e64, c64, b64 = float64_leaf(e), float64_leaf(c), float64_leaf(b)
    reference_loss(e64, c64, targets, bias=b64, label_smoothing=0.1).backward()
    for t, t64 in zip((e, c, b), (e64, c64, b64)):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-7)


BAD_INPUTS = [
    ("c", dict(c=torch.randn(11, 4)), "e's last dimension"),
    ("c 1-D", dict(c=torch.randn(11)), "c must be 2-D"),
    ("targets shape", dict(targets=torch.zeros(6, dtype=torch.long)), "targets must"),
    ("targets float", dict(targets=torch.zeros(7)), "targets must hold integer"),
    ("targets bool", dict(targets=torch.zeros(7, dtype=torch.bool)), "targets"),
    ("targets range", dict(targets=torch.full((7,), 11)), r"targets must be in \[0, 11\)"),
    ("targets negative", dict(targets=torch.full((7,), -3)), "targets must be in"),
    ("mixed dtypes", dict(c=torch.randn(11, 5, dtype=torch.float64)), "same dtype"),
    ("bias shape", dict(bias=torch.randn(10)), "bias must have shape"),
    ("bias dtype", dict(bias=torch.randn(11, dtype=torch.float64)), "bias must have c's"),
    ("weight shape", dict(weight=torch.rand(3)), "weight must have shape"),
    ("weight int", dict(weight=torch.ones(11, dtype=torch.long)), "weight must be float"),
    ("reduction", dict(reduction="avg"), "reduction must be one of"),
    ("label_smoothing", dict(label_smoothing=1.5), "label_smoothing must be in"),
    ("softcap zero", dict(softcap=0.0), "softcap must be positive"),
    ("softcap negative", dict(softcap=-1.0), "softcap must be positive"),
    ("logit_scale", dict(logit_scale=float("nan")), "logit_scale must be finite"),
    ("e int", dict(e=torch.ones(7, 5, dtype=torch.long)), "e must be a floating"),
]


@pytest.mark.parametrize("name,override,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(name, override, message):
    args = dict(e=torch.randn(7, 5), c=torch.randn(11, 5),
                targets=torch.randint(0, 11, (7,)))
    args.update(override)
    with pytest.raises((ValueError, TypeError), match=message):
        linear_cross_entropy(args.pop("e"), args.pop("c"), args.pop("targets"), **args)


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(1, 40), d=st.integers(1, 24), v=st.integers(1, 90),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    smoothing=st.sampled_from([0.0, 0.05, 0.5]),
    softcap=st.sampled_from([None, 1.0, 30.0]),
    logit_scale=st.sampled_from([1.0, 0.25, 2.0]),
    with_bias=st.booleans(), with_weight=st.booleans(),
    ignored_fraction=st.sampled_from([0.0, 0.3, 1.1]),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes_and_options(n, d, v, reduction, smoothing, softcap,
                                            logit_scale, with_bias, with_weight,
                                            ignored_fraction, seed):
    from test_op import check_against_reference
    e, c, targets, b, w = make_inputs(n, d, v, bias=with_bias, weight=with_weight,
                                      ignored_fraction=ignored_fraction, seed=seed)
    check_against_reference(e, c, targets, b, w, torch.float32,
                            dict(reduction=reduction, label_smoothing=smoothing,
                                 softcap=softcap, logit_scale=logit_scale))
