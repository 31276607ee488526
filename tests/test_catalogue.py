"""Every catalogue form compiled with the rewrite: rewritten (or left alone with
the stated reason), and numerically the same as eager.

Tolerances: float32 forms agree with eager to rtol 1e-5 / atol 1e-6 (both
accumulate in float32, in different orders).  bf16 forms: the rewrite computes
the logits in float32 where eager rounds them to bf16, so losses agree to
rtol 2e-2 and gradients to 2e-2 of their largest entry.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from catalogue import FORMS, Form

from cce_inductor.backend import make_backend
from cce_inductor.functional import fused_linear_cross_entropy


def count_rewrites(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is fused_linear_cross_entropy)


def compile_form(form: Form, inner="aot_eager"):
    """The form's model compiled with the rewrite, and the graphs it produced."""
    graphs = []

    def recording_inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(inner)(gm, example_inputs)

    torch._dynamo.reset()
    model = form.model()
    return model, torch.compile(model, backend=make_backend(recording_inner)), graphs


def tolerances(form: Form) -> tuple[float, float]:
    return (2e-2, 2e-2) if form.dtype == torch.bfloat16 or form.autocast else (1e-5, 1e-6)


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_form_rewritten_and_exact(form: Form):
    if not form.available:
        pytest.skip("this torch lacks what the form calls")
    model, compiled, graphs = compile_form(form)
    h, y = form.inputs()
    loss = compiled(h, y)
    rewrites = sum(count_rewrites(gm) for gm in graphs)
    assert rewrites == (form.calls if form.rewritten else 0)

    h_ref = h.detach().clone().requires_grad_()
    ref = model(h_ref, y)
    rtol, atol = tolerances(form)
    torch.testing.assert_close(loss.float(), ref.float(), rtol=rtol, atol=atol)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [h_ref, *params], allow_unused=True)
    for g, g_ref in zip(grads, ref_grads):
        assert (g is None) == (g_ref is None)
        if g is not None:
            scale = g_ref.float().abs().max().clamp_min(1e-12)
            torch.testing.assert_close(g.float(), g_ref.float(), rtol=rtol,
                                       atol=atol * float(scale) if atol > 1e-5 else atol)


@pytest.mark.parametrize("form", [f for f in FORMS if not f.rewritten], ids=lambda f: f.name)
def test_form_left_alone_says_why(form: Form):
    import cce_inductor

    torch._dynamo.reset()
    report = cce_inductor.explain(form.model(), *form.inputs())
    reasons = [s.reason for s in report.skipped]
    assert not report.rewritten, str(report)
    assert any(form.reason in (r or "") for r in reasons), str(report)


@pytest.mark.parametrize("name", ["view_3d", "shift_contiguous", "softcap", "z_loss"])
def test_form_under_inductor(name):
    from catalogue import FORMS_BY_NAME

    form = FORMS_BY_NAME[name]
    model, compiled, graphs = compile_form(form, inner="inductor")
    h, y = form.inputs()
    with contextlib.nullcontext():
        loss = compiled(h, y)
    loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    model.zero_grad()
    ref = form.model()(h_ref, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)


def test_docs_table_is_up_to_date():
    import pathlib
    import subprocess
    import sys

    tool = pathlib.Path(__file__).parent.parent / "tools" / "catalogue_table.py"
    assert subprocess.run([sys.executable, str(tool), "--check"]).returncode == 0, \
        "docs/catalogue.md is stale: run python tools/catalogue_table.py"
