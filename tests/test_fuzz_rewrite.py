"""Differential fuzzing: random losses built from the catalogue's building blocks,
compiled with the rewrite, must match eager in the loss and every gradient, and
must be rewritten into one op call exactly when no consumer needs the whole
matrix (top-k stands for those).

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
# Rows per piece of the chunked entropy (TRL uses 128; small here so a batch has several).
CHUNK = 3


@st.composite
def programs(draw):
    return dict(
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(2, 6)),
        dim=draw(st.integers(1, 9)), vocab=draw(st.integers(2, 50)),
        form=draw(st.sampled_from(["cross_entropy", "nll_loss", "gather", "selective",
                                   "class_dim"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        smoothing=draw(st.sampled_from([0.0, 0.1])),
        bias=draw(st.booleans()), shift=draw(st.sampled_from([None, "slice", "ellipsis",
                                                             "narrow"])),
        upcast=draw(st.booleans()), flatten=draw(st.sampled_from(["view", "reshape"])),
        scale=draw(st.sampled_from([None, 0.5, 3.0])),
        softcap=draw(st.sampled_from([None, 4.0])),
        inplace_temperature=draw(st.booleans()),
        temperature_after_softcap=draw(st.booleans()),
        extra=draw(st.sampled_from([None, None, "argmax", "lse", "entropy", "topk",
                                    "chunked_entropy", "categorical_entropy"])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(p):
    """The loss function the program describes, written the way users write it."""
    V, T = p["vocab"], p["seq"]

    def loss_fn(h, w, b, y):
        logits = h @ w.T + b if p["bias"] else F.linear(h, w)
        if p["scale"] is not None:
            logits = logits * p["scale"]
        if p["softcap"] is not None:
            logits = p["softcap"] * torch.tanh(logits / p["softcap"])
            if p["temperature_after_softcap"]:
                logits = logits / 0.7
        if p["upcast"]:
            logits = logits.float()
        labels = y
        if p["shift"] == "slice":
            logits, labels = logits[:, :-1].contiguous(), y[:, 1:].contiguous()
        elif p["shift"] == "ellipsis":
            logits, labels = logits[..., :-1, :], y[..., 1:]
        elif p["shift"] == "narrow":
            logits, labels = logits.narrow(1, 0, T - 1), y.narrow(1, 1, T - 1)
        if p["inplace_temperature"] and p["softcap"] is None:
            logits = logits.clone()
            logits.div_(0.8)
        if p["form"] == "class_dim":
            loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction=p["reduction"],
                                   label_smoothing=p["smoothing"])
            flat = logits.reshape(-1, V)
        else:
            flat = getattr(logits.contiguous(), p["flatten"])(-1, V)
            flat_labels = getattr(labels.contiguous(), p["flatten"])(-1)
            loss = _loss(p, flat, flat_labels)
        if p["reduction"] == "none":
            loss = (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum()
        return loss + _extra(p["extra"], flat, labels)

    return loss_fn


def _loss(p, flat, labels):
    if p["form"] == "cross_entropy":
        return F.cross_entropy(flat, labels, reduction=p["reduction"],
                               label_smoothing=p["smoothing"])
    if p["form"] == "nll_loss":
        return F.nll_loss(F.log_softmax(flat, -1), labels, reduction=p["reduction"])
    if p["form"] == "gather":
        nll = -F.log_softmax(flat, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    else:
        nll = flat.logsumexp(-1) - flat.gather(-1, labels[:, None]).squeeze(-1)
    return {"mean": nll.mean(), "sum": nll.sum(), "none": nll}[p["reduction"]]


def _extra(extra, flat, labels):
    """A second consumer of the same logits; top-k needs the whole matrix."""
    if extra == "argmax":
        return (flat.argmax(-1) == labels.reshape(-1)).float().mean() * 0.0
    if extra == "lse":
        return 1e-2 * flat.logsumexp(-1).pow(2).mean()
    if extra == "entropy":
        return 0.1 * (F.softmax(flat, -1) * F.log_softmax(flat, -1)).sum(-1).mean()
    if extra == "topk":
        return flat.topk(1, -1).values.sum() * 0.0
    if extra == "chunked_entropy":  # TRL's entropy_from_logits, CHUNK rows at a time
        pieces = [(F.softmax(c, -1) * F.log_softmax(c, -1)).sum(-1) for c in flat.split(CHUNK)]
        return 0.1 * torch.cat(pieces).mean()
    if extra == "categorical_entropy":
        return 0.1 * torch.distributions.Categorical(logits=flat).entropy().mean()
    return 0.0


def expected_calls(p) -> int:
    """One op call serves every consumer (the chunked entropy's pieces too);
    top-k leaves the logits alone."""
    return 0 if p["extra"] == "topk" else 1


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
    assert rewritten == expected_calls(p), p
