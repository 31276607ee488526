"""The op on its own imports neither Dynamo nor Inductor.

Each check runs in a fresh interpreter, since this test process has long
imported both.  Numbers are compared with ``F.cross_entropy(e @ c.T, y)`` at
``rtol=1e-5, atol=1e-6`` (float32; the op sums the same terms in another
order, a few ulps apart, as in tests/test_op.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

COMPILER_MODULES = ("torch._dynamo", "torch._inductor")

_PRELUDE = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    import cce_inductor

    def loaded():
        return sorted(m for m in sys.modules
                      if m.split(".")[:2] in (["torch", "_dynamo"], ["torch", "_inductor"]))

    def check(**options):
        gen = torch.Generator().manual_seed(len(options))
        e = torch.randn(2, 7, 16, generator=gen, requires_grad=True)
        c = torch.randn(50, 16, generator=gen, requires_grad=True)
        y = torch.randint(0, 50, (2, 7), generator=gen)
        y[0, 0] = -100
        loss = cce_inductor.linear_cross_entropy(e, c, y, **options)
        ref = F.cross_entropy((e @ c.T).flatten(0, 1), y.flatten(), **options)
        ref = ref.view(y.shape) if options.get("reduction") == "none" else ref
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(loss.sum(), (e, c))
        ref_grads = torch.autograd.grad(ref.sum(), (e, c))
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
""")


def _run(body: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CCE_INDUCTOR"}
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_op_imports_no_compiler_modules() -> None:
    out = _run("""
        check()                                        # gradients from the forward
        check(reduction="sum", label_smoothing=0.1)
        check(reduction="none")                        # the separate backward op
        print("loaded:", loaded())
    """)
    assert "loaded: []" in out, out


def test_op_still_compiles_after_eager_calls() -> None:
    """Once Dynamo is imported, PyTorch's own kernel wrappers take over."""
    out = _run("""
        check()
        assert loaded() == []
        import torch._dynamo
        check(reduction="none")                        # eager, now with Dynamo imported
        compiled = torch.compile(cce_inductor.linear_cross_entropy, backend="aot_eager",
                                 fullgraph=True)
        gen = torch.Generator().manual_seed(3)
        e = torch.randn(9, 16, generator=gen, requires_grad=True)
        c = torch.randn(50, 16, generator=gen, requires_grad=True)
        y = torch.randint(0, 50, (9,), generator=gen)
        loss = compiled(e, c, y)
        ref = F.cross_entropy(e @ c.T, y)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for got, want in zip(torch.autograd.grad(loss, (e, c)),
                             torch.autograd.grad(ref, (e, c))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        print("compiled ok")
    """)
    assert "compiled ok" in out, out


def test_constant_marker_is_the_one_dynamo_sets() -> None:
    out = _run("""
        from cce_inductor._dynamo_free import assume_constant_result

        def ours(): return 1
        def theirs(): return 1

        assume_constant_result(ours)
        assert loaded() == []
        torch.compiler.assume_constant_result(theirs)
        assert vars(ours) == vars(theirs), (vars(ours), vars(theirs))
        from cce_inductor.op import prefers_forward_gradients
        assert vars(prefers_forward_gradients).items() >= vars(theirs).items()
        print("same marker")
    """)
    assert "same marker" in out, out
