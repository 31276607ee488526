"""The ways in: backend objects, backend="cce", enable()/CCE_INDUCTOR=1, and safety."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import cce_inductor
from cce_inductor import backend as backend_module
from cce_inductor import config
from cce_inductor.functional import fused_linear_cross_entropy

V, D = 41, 9


def loss_fn(h, w, y):
    return F.cross_entropy(F.linear(h, w).view(-1, V), y.view(-1))


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 5, D, generator=gen, requires_grad=True)
    w = torch.randn(V, D, generator=gen, requires_grad=True)
    return h, w, torch.randint(0, V, (3, 5), generator=gen)


def rewrites_logged(caplog) -> int:
    return sum("rewrote cross_entropy" in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True)
def fresh_compile_state():
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", [cce_inductor.cce_backend, "cce",
                                     cce_inductor.make_backend("aot_eager"),
                                     cce_inductor.make_backend("eager")],
                         ids=["cce_backend", "by_name", "aot_eager", "eager"])
def test_backends_rewrite_and_match_eager(backend, caplog):
    caplog.set_level(logging.INFO, logger="cce_inductor")
    h, w, y = inputs()
    loss = torch.compile(loss_fn, backend=backend)(h, w, y)
    ref = loss_fn(h, w, y)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (h, w))
    ref_grads = torch.autograd.grad(ref, (h, w))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    assert rewrites_logged(caplog) == 1


def test_make_backend_accepts_a_callable():
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    h, w, y = inputs()
    torch.compile(loss_fn, backend=cce_inductor.make_backend(inner))(h, w, y)
    targets = [n.target for n in seen[0].graph.nodes]
    assert F.cross_entropy not in targets
    assert any(getattr(t, "__name__", "") == "fused_linear_cross_entropy" for t in targets)


def test_cce_backend_forwards_options(caplog):
    caplog.set_level(logging.INFO, logger="cce_inductor")
    h, w, y = inputs()
    compiled = torch.compile(loss_fn, backend="cce", options={"max_autotune": False})
    torch.testing.assert_close(compiled(h, w, y), loss_fn(h, w, y))
    with pytest.raises(Exception, match="no_such_option"):
        torch._dynamo.reset()
        torch.compile(loss_fn, backend="cce", options={"no_such_option": 1})(h, w, y)


def test_enable_is_idempotent_and_keeps_other_passes(caplog):
    caplog.set_level(logging.INFO, logger="cce_inductor")
    from torch._inductor import config as inductor_config
    from torch._inductor.custom_graph_pass import CustomGraphPass

    calls = []

    class OtherPass(CustomGraphPass):
        def __call__(self, graph):
            calls.append(graph)

        def uuid(self):
            return "other"

    other = OtherPass()
    with inductor_config.patch(pre_grad_custom_pass=other):
        cce_inductor.enable()
        cce_inductor.enable()
        passes = backend_module.get_pre_grad_passes()
        assert passes.count(backend_module.GRAPH_PASS) == 1 and other in passes
        h, w, y = inputs()
        torch.testing.assert_close(torch.compile(loss_fn)(h, w, y), loss_fn(h, w, y))
        assert rewrites_logged(caplog) == 1 and calls
        cce_inductor.disable()
        assert backend_module.get_pre_grad_passes() == [other]


def test_uuid_follows_settings(monkeypatch):
    before = backend_module.GRAPH_PASS.uuid()
    monkeypatch.setattr(config, "drop_escaping_logits", not config.drop_escaping_logits)
    assert backend_module.GRAPH_PASS.uuid() != before


def test_environment_variable_opts_every_compile_in(tmp_path):
    script = textwrap.dedent("""
        import logging, torch, torch.nn.functional as F
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        w = torch.randn(41, 9, requires_grad=True)
        f = lambda h, y: F.cross_entropy(F.linear(h, w), y)
        h, y = torch.randn(6, 9), torch.randint(0, 41, (6,))
        torch.testing.assert_close(torch.compile(f)(h, y), f(h, y))
        print("done")
    """)
    env = dict(os.environ, CCE_INDUCTOR="1", TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cce_inductor rewrote cross_entropy" in out.stderr and "done" in out.stdout


def test_import_torch_stays_light_without_the_variable():
    script = ("import sys, torch; print(sorted(m for m in sys.modules "
              "if m.startswith('cce_inductor.') and m != 'cce_inductor.autoload'))")
    env = {k: v for k, v in os.environ.items() if k != "CCE_INDUCTOR"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_failed_rewrite_leaves_graph_unchanged_with_one_warning(monkeypatch):
    def broken(graph, site):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(backend_module, "rewrite_site", broken)
    h, w, y = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(loss_fn, backend="cce")(h, w, y)
    messages = [str(c.message) for c in caught if "cce_inductor" in str(c.message)]
    assert len(messages) == 1 and "simulated failure" in messages[0]
    torch.testing.assert_close(loss, loss_fn(h, w, y))


def test_failure_after_the_graph_changed_restores_it(monkeypatch):
    """A rewrite that fails half way, with the graph already edited, is undone;
    the other site of the same graph is still rewritten."""
    from cce_inductor.graph import rewrite as rewrite_module

    real = rewrite_module.rewrite_site
    calls = []

    def fails_once_after_editing(graph, site):
        real(graph, site)
        calls.append(site.form)
        if len(calls) == 1:
            output = next(n for n in graph.nodes if n.op == "output")
            with graph.inserting_before(output):
                graph.call_function(torch.neg, (output,))  # a node that reads its user
            raise RuntimeError("simulated failure after editing")

    def two_losses(h, w, y):
        first = F.cross_entropy(F.linear(h, w).view(-1, V), y.view(-1))
        second = F.cross_entropy(F.linear(h * 2, w).view(-1, V), y.view(-1))
        return first + second

    monkeypatch.setattr(backend_module, "rewrite_site", fails_once_after_editing)
    h, w, y = inputs()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(two_losses, backend=cce_inductor.make_backend(inner))(h, w, y)
    messages = [str(c.message) for c in caught if "cce_inductor" in str(c.message)]
    assert len(messages) == 1 and "simulated failure after editing" in messages[0]
    torch.testing.assert_close(loss, two_losses(h, w, y))
    ops = [n for n in graphs[0].graph.nodes if n.target is fused_linear_cross_entropy]
    losses = [n for n in graphs[0].graph.nodes if n.target is F.cross_entropy]
    assert len(ops) == 1 and len(losses) == 1


def test_explain_reports_source_line_and_memory():
    h, w, y = inputs()
    report = cce_inductor.explain(loss_fn, h, w, y)
    (site,) = report.sites
    assert site.rewritten and "test_entry_points.py" in site.source
    assert site.logits_bytes == 3 * 5 * V * 4
    assert "rewritten" in str(report) and "1 rewritten" in str(report)


def test_rewrite_under_dynamic_shapes_does_not_recompile(caplog):
    caplog.set_level(logging.INFO, logger="cce_inductor")
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        cce_inductor.make_backend("aot_eager"))

    def shifted(h, w, y):
        logits = F.linear(h, w)[:, :-1].contiguous()
        return F.cross_entropy(logits.view(-1, V), y[:, 1:].contiguous().view(-1))

    compiled = torch.compile(shifted, backend=counter, dynamic=True)
    frames = None
    for batch, seq in ((2, 5), (3, 7), (4, 4)):
        gen = torch.Generator().manual_seed(batch)
        h = torch.randn(batch, seq, D, generator=gen, requires_grad=True)
        w = torch.randn(V, D, generator=gen, requires_grad=True)
        y = torch.randint(0, V, (batch, seq), generator=gen)
        loss = compiled(h, w, y)
        ref = shifted(h, w, y)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        frames = counter.frame_count if frames is None else frames
    assert counter.frame_count == frames, "recompiled when the batch shape changed"
    assert rewrites_logged(caplog) >= 1


def test_environment_variable_covers_transformers_imported_later():
    """CCE_INDUCTOR=1 enables at `import torch`, before transformers is imported:
    Dynamo's first compile after that still skips transformers' warning_once."""
    pytest.importorskip("transformers")
    script = textwrap.dedent("""
        import torch
        import transformers
        from transformers.utils import logging as hf_logging
        from torch._dynamo import config as dynamo_config
        assert hf_logging.warning_once not in dynamo_config.ignore_logging_functions
        config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2,
                                         n_positions=16, bos_token_id=1, eos_token_id=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)  # names no known loss_type
        ids = torch.randint(0, 64, (2, 8))
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(
            input_ids=ids, labels=ids)
        torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss,
                                   rtol=1e-5, atol=1e-6)
        assert hf_logging.warning_once in dynamo_config.ignore_logging_functions
        print("done")
    """)
    env = dict(os.environ, CCE_INDUCTOR="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "done" in out.stdout
