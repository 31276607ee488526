"""Per-row statistics of the op: log-probs, entropy, argmax, against float64.

Tolerance: float32 inputs against a float64 reference at rtol 1e-5 / atol
1e-5 for values and gradients (float32 accumulation over D and V, as in
test_op.py).  Shapes are not multiples of any block size; the logits blocks
are made small (``config.logits_chunk_bytes``) so that several blocks and
vocabulary pieces are crossed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cce_inductor import config, linear_argmax, linear_entropy, linear_log_probs
from cce_inductor.functional import NO_IGNORE_INDEX, fused_linear_cross_entropy

RTOL, ATOL = 1e-5, 1e-5
CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 3.0},
    "temperature": {"logit_scale": 1 / 0.7},
    "all": {"bias": True, "softcap": 2.0, "logit_scale": 1.3},
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(config, "logits_chunk_bytes", 4 * 37 * 5)  # 5 rows of V=37
    from cce_inductor.kernels import chunked

    monkeypatch.setattr(chunked, "VOCAB_PIECE", 16)


def operands(n=23, d=13, v=37, bias=False, seed=0, peaked=False):
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=gen).requires_grad_()
    c = (torch.randn(v, d, generator=gen) * (3.0 if peaked else d**-0.5)).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    return e, c, b, y


def reference_logits(e, c, b, softcap=None, logit_scale=1.0):
    z = e.double() @ c.double().T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def leaves(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_log_probs_and_entropy_values_and_gradients(case):
    options = dict(CASES[case])
    e, c, b, y = operands(bias=options.pop("bias", False))
    logp, entropy = linear_log_probs(e, c, y, bias=b, return_entropy=True, **options)

    e64, c64, b64 = leaves(e, c, b)
    z = reference_logits(e64, c64, b64, **options)
    ref_lp = F.log_softmax(z, -1)
    ref_logp = ref_lp.gather(-1, y[:, None]).squeeze(-1)
    ref_entropy = -(ref_lp.exp() * ref_lp).sum(-1)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=RTOL, atol=ATOL)

    # Random upstream gradients on both outputs exercise both backward terms.
    gen = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(2, y.shape[0], generator=gen)
    inputs = [t for t in (e, c, b) if t is not None]
    ref_inputs = [t for t in (e64, c64, b64) if t is not None]
    grads = torch.autograd.grad((logp * g_lp).sum() + (entropy * g_h).sum(), inputs)
    ref = torch.autograd.grad((ref_logp * g_lp).sum() + (ref_entropy * g_h).sum(),
                              ref_inputs)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got.double(), want, rtol=RTOL, atol=ATOL)


def test_entropy_alone_and_peaked_rows():
    """Peaked rows (probabilities far below float32's range) keep the exact lse route."""
    e, c, _, _ = operands(peaked=True, seed=3)
    entropy = linear_entropy(e, c)
    e64, c64 = leaves(e, c)
    lp = F.log_softmax(reference_logits(e64, c64, None), -1)
    ref = -(lp.exp() * lp).sum(-1)
    torch.testing.assert_close(entropy.double(), ref, rtol=RTOL, atol=ATOL)
    (grad,) = torch.autograd.grad(entropy.sum(), e)
    (ref_grad,) = torch.autograd.grad(ref.sum(), e64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_argmax_matches_torch(case):
    options = dict(CASES[case])
    e, c, b, _ = operands(bias=options.pop("bias", False), seed=5)
    predicted = linear_argmax(e, c, bias=b, **options)
    assert predicted.dtype == torch.int64
    ref = reference_logits(e, c, b, **options).argmax(-1)
    assert torch.equal(predicted, ref)


def test_argmax_ties_go_to_the_first_index_after_rounding():
    """bf16 logits tie where float32 ones differ: the rounding is reproduced."""
    e = torch.tensor([[1.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5039]])  # z = 1, 1, 1.0039
    _, rounded = fused_linear_cross_entropy(
        e, c, None, None, None, NO_IGNORE_INDEX, "none", 0.0, None, 1.0, False,
        loss_dtype=torch.float32, argmax_dtype=torch.bfloat16)
    _, exact = fused_linear_cross_entropy(
        e, c, None, None, None, NO_IGNORE_INDEX, "none", 0.0, None, 1.0, False,
        loss_dtype=torch.float32, argmax_dtype=torch.float32)
    assert rounded.tolist() == [(e @ c.T).bfloat16().argmax(-1).item()] == [0]
    assert exact.tolist() == [2]


def test_one_row_and_loss_with_every_statistic():
    e, c, b, y = operands(n=1, bias=True, seed=7)
    loss, lse, entropy, argmax = fused_linear_cross_entropy(
        e, c, y, b, None, -100, "mean", 0.0, None, 1.0, True, loss_dtype=torch.float32,
        return_entropy=True, argmax_dtype=torch.float32)
    z = reference_logits(e, c, b)
    lp = F.log_softmax(z, -1)
    torch.testing.assert_close(loss.double(), F.cross_entropy(z, y), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lse.double(), z.logsumexp(-1), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(entropy.double(), -(lp.exp() * lp).sum(-1), rtol=RTOL,
                               atol=ATOL)
    assert torch.equal(argmax, z.argmax(-1))


def test_inference_saves_nothing_for_backward():
    e, c, _, y = operands()
    with torch.no_grad():
        logp, entropy = linear_log_probs(e, c, y, return_entropy=True)
    assert logp.grad_fn is None and entropy.grad_fn is None
    with torch.inference_mode():
        logp_inference = linear_log_probs(e, c, y)
    torch.testing.assert_close(logp_inference, logp, rtol=0, atol=0)


def test_log_probs_refuses_bad_arguments():
    e, c, _, y = operands()
    with pytest.raises(ValueError, match="targets must"):
        linear_log_probs(e, c, y[:-1])
    with pytest.raises(ValueError, match="softcap"):
        linear_entropy(e, c, softcap=-1.0)
    with pytest.raises(ValueError, match="targets must be in"):
        linear_log_probs(e, c, torch.full_like(y, 37))
