"""Differential fuzzing: random losses built from the catalogue's building blocks,
compiled with the rewrite, must match eager in the loss and every gradient, and
must be rewritten exactly when no blocker is present.

CI runs a quick, derandomized profile (the same examples every run);
``python tools/fuzz_rewrite.py`` runs a long, random one.
Tolerance: float32 throughout, rtol 1e-4 / atol 1e-5.  The only difference is
the order of float32 accumulation, which a logit scale of 3 and a weighted
sum of per-row losses amplify to a few 1e-5 relative on some examples.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cce_inductor import make_backend
from cce_inductor.functional import fused_linear_cross_entropy

EXAMPLES = int(os.environ.get("CCE_FUZZ_EXAMPLES", "12"))
LONG_PROFILE = "CCE_FUZZ_EXAMPLES" in os.environ
RTOL, ATOL = 1e-4, 1e-5


@st.composite
def programs(draw):
    return dict(
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(2, 6)),
        dim=draw(st.integers(1, 9)), vocab=draw(st.integers(2, 50)),
        form=draw(st.sampled_from(["cross_entropy", "nll_loss", "gather"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        smoothing=draw(st.sampled_from([0.0, 0.1])),
        bias=draw(st.booleans()), shift=draw(st.booleans()),
        upcast=draw(st.booleans()), flatten=draw(st.sampled_from(["view", "reshape"])),
        scale=draw(st.sampled_from([None, 0.5, 3.0])),
        softcap=draw(st.sampled_from([None, 4.0])),
        blocker=draw(st.sampled_from([None, None, None, "argmax", "class_dim"])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(p):
    """The loss function the program describes, written the way users write it."""
    V = p["vocab"]

    def loss_fn(h, w, b, y):
        logits = h @ w.T + b if p["bias"] else F.linear(h, w)
        if p["scale"] is not None:
            logits = logits * p["scale"]
        if p["softcap"] is not None:
            logits = p["softcap"] * torch.tanh(logits / p["softcap"])
        if p["upcast"]:
            logits = logits.float()
        labels = y
        if p["shift"]:
            logits, labels = logits[:, :-1], y[:, 1:]
            if p["flatten"] == "view":
                logits, labels = logits.contiguous(), labels.contiguous()
        extra = 0.0
        if p["blocker"] == "argmax":
            extra = (logits.argmax(-1) == labels).float().mean() * 0.0
        if p["blocker"] == "class_dim":
            return F.cross_entropy(logits.transpose(1, 2), labels) + extra
        flat = getattr(logits, p["flatten"])(-1, V)
        flat_labels = getattr(labels, p["flatten"])(-1)
        if p["form"] == "cross_entropy":
            loss = F.cross_entropy(flat, flat_labels, reduction=p["reduction"],
                                   label_smoothing=p["smoothing"])
        elif p["form"] == "nll_loss":
            loss = F.nll_loss(F.log_softmax(flat, -1), flat_labels, reduction=p["reduction"])
        else:
            nll = -F.log_softmax(flat, -1).gather(-1, flat_labels.unsqueeze(-1)).squeeze(-1)
            loss = {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[p["reduction"]]
        if p["reduction"] == "none":
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel())).sum()
        return loss + extra

    return loss_fn


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG_PROFILE,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=programs())
def test_random_loss_programs_match_eager(p):
    gen = torch.Generator().manual_seed(p["seed"])
    B, T, D, V = p["batch"], p["seq"], p["dim"], p["vocab"]
    h = torch.randn(B, T, D, generator=gen, requires_grad=True)
    w = torch.randn(V, D, generator=gen, requires_grad=True)
    b = torch.randn(V, generator=gen, requires_grad=True)
    y = torch.randint(0, V, (B, T), generator=gen)
    loss_fn = build(p)

    graphs = []

    def recording_inner(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(loss_fn, backend=make_backend(recording_inner))(h, w, b, y)
    ref = loss_fn(h, w, b, y)
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)
    inputs = (h, w, b) if p["bias"] else (h, w)
    for g, r in zip(torch.autograd.grad(out, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL)

    rewritten = sum(n.target is fused_linear_cross_entropy
                    for gm in graphs for n in gm.graph.nodes)
    assert rewritten == (0 if p["blocker"] else 1), p
