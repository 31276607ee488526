"""The rewrite on Hugging Face causal LMs: tiny models built from their configs.

Each architecture (Llama, Mistral, Qwen2, Gemma 2 with its final-logit softcap,
GPT-2 with tied embeddings, Phi-3) is built at random from its configuration
class (2 layers, hidden size 32, vocabulary 512, batch 2 x 12 tokens, float32,
eager attention; nothing is downloaded) and checked four ways:

* ``explain`` reports the model's loss (``ForCausalLMLoss``) as rewritten, with
  the logits escaping (they are returned next to the loss);
* compiled with the rewrite, the loss and every parameter gradient match the
  uncompiled model with the same weights, and the compiled graph really calls
  the fused op;
* five AdamW steps on the compiled model track five on the uncompiled one;
* with ``config.drop_escaping_logits`` the returned logits are empty while
  the loss and the gradients still match.

Tolerances (float32 throughout): ``rtol=1e-5, atol=1e-6`` for the loss, the
returned logits, every gradient and the per-step AdamW losses.  The fused op
computes what eager does (logits, log-sum-exp, softmax minus one-hot) in
float32, only in another order: the vocabulary goes in chunks through an online
log-sum-exp and the classifier gradient is summed over row blocks, so results
differ by a few float32 ulps of the partial sums.  Measured here, as the worst
element's share of its bound ``atol + rtol * |expected|``: the loss (about 7)
uses at most 2% (differences of one or two ulps, <= 1.4e-6), gradients at most
26% (<= 5.5e-7 absolute on entries up to 0.5), so the bounds leave a margin of
about 4x on gradients and 50x on the loss.  The AdamW losses stay within the
same bound for all five steps at lr=1e-3 (Adam's division by the root of the
second moment could amplify ulp differences in near-zero gradients; over five
steps it does not), but the weights then differ by the optimizer's rounding,
so the returned logits are compared on the first step only.  Under Inductor
(Llama) the returned logits differ by a few 1e-6, because Inductor also fuses
the model's own norms and attention; they are compared at ``rtol=1e-4,
atol=1e-5``.  Real mistakes are far outside these bounds: the weights are
initialized at ten times the default scale (logits of standard deviation ~1)
and Gemma 2's cap is 5, so that a missing softcap moves the loss by ~0.09, and
a wrong label shift or a lost ignore mask by more.

GPT-2 runs with its default ``loss_type``.  Its class name matches no loss
type, so ``PreTrainedModel.loss_function`` calls ``logger.warning_once``
between the head and the loss, which Dynamo cannot trace; the package's
backends, ``explain`` and ``enable()`` have Dynamo skip that call, so the graph
does not break there.  ``test_gpt2_default_loss_type`` checks that this holds
on every way in and that ``disable()`` takes the setting back out.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import cce_inductor
from cce_inductor.functional import fused_linear_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB = 512
BATCH, SEQ = 2, 12
RTOL, ATOL = 1e-5, 1e-6
# The returned logits under Inductor: it also fuses the model's own norms,
# attention and MLP, which the rewrite does not touch.
INDUCTOR_LOGITS_TOL = (1e-4, 1e-5)
STEPS = 5
# Weights ten times the default scale: logits with a standard deviation of
# about 1 rather than 0.1, so that the softcap, the bias-free tied head and
# the ignored rows all visibly change the loss.
INIT = 0.2
SOFTCAP = 5.0

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0,
               initializer_range=INIT)


def _llama() -> Any:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON))


def _mistral() -> Any:
    return transformers.MistralForCausalLM(transformers.MistralConfig(**_COMMON))


def _qwen2() -> Any:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_COMMON))


def _gemma2() -> Any:
    config = transformers.Gemma2Config(**_COMMON, head_dim=8, query_pre_attn_scalar=8,
                                       final_logit_softcapping=SOFTCAP)
    return transformers.Gemma2ForCausalLM(config)


def _gpt2() -> Any:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        initializer_range=INIT, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config)  # default loss_type: see the docstring


def _phi3() -> Any:
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**_COMMON))


MODELS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gemma2": _gemma2,
    "gpt2": _gpt2,
    "phi3": _phi3,
}
# Compiled with the Inductor backend (cce_backend) in the training test; all
# else uses aot_eager, which traces the same forward and backward graphs and
# compiles far faster.
INDUCTOR_MODELS = ("llama",)


def build(name: str, seed: int = 0) -> Any:
    """A tiny randomly initialized ``name`` model in training mode, float32."""
    torch.manual_seed(seed)
    model = MODELS[name]().float().train()
    if name == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied
    if name == "gemma2":
        assert model.config.final_logit_softcapping == SOFTCAP
    return model


def batch(seed: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` with a few ignored (-100) label positions."""
    generator = torch.Generator().manual_seed(1000 + seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a masked prompt
    labels[1, -2:] = -100  # padding
    return {"input_ids": input_ids, "labels": labels}


class RecordingBackend:
    """``make_backend`` inner backend that keeps the rewritten graphs it compiles.

    Delegates to Dynamo's ``aot_eager`` backend.
    """

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)

    def fused_calls(self) -> int:
        """How many fused-op calls the recorded graphs contain."""
        return sum(node.target is fused_linear_cross_entropy
                   for gm in self.graphs for node in gm.graph.nodes)


def compile_model(model: Any, inductor: bool = False) -> tuple[Any, RecordingBackend | None]:
    """``model`` compiled with the rewrite (whole graph, no breaks allowed).

    With ``inductor``, through ``cce_backend``; otherwise through
    ``make_backend`` and aot_eager, returning the backend that records the
    rewritten graphs.
    """
    torch._dynamo.reset()
    if inductor:
        return torch.compile(model, backend=cce_inductor.cce_backend, fullgraph=True), None
    recorder = RecordingBackend()
    backend = cce_inductor.make_backend(recorder)
    return torch.compile(model, backend=backend, fullgraph=True), recorder


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str,
                 rtol: float = RTOL, atol: float = ATOL) -> None:
    """``torch.testing.assert_close`` at the module's tolerances, naming ``what``."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def assert_grads_match(compiled: Any, eager: Any) -> None:
    """Every parameter of ``compiled`` has eager's gradient (tied ones once)."""
    eager_params = dict(eager.named_parameters())
    names = []
    for name, param in compiled.named_parameters():
        reference = eager_params[name].grad
        assert reference is not None, name
        assert param.grad is not None, f"{name} got no gradient under compile"
        assert_close(param.grad, reference, f"grad of {name}")
        names.append(name)
    assert names == list(eager_params)


@contextmanager
def dropping_logits() -> Iterator[None]:
    """``config.drop_escaping_logits = True`` for the block, restored afterwards."""
    saved = cce_inductor.config.drop_escaping_logits
    cce_inductor.config.drop_escaping_logits = True
    try:
        yield
    finally:
        cce_inductor.config.drop_escaping_logits = saved


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_reports_loss_rewritten(name: str) -> None:
    model = build(name)
    report = cce_inductor.explain(model, **batch(0))
    assert len(report.rewritten) >= 1, str(report)
    assert not report.skipped, str(report)
    site = report.rewritten[0]
    assert site.form == "cross_entropy", str(report)
    assert "loss_utils.py" in site.source, str(report)
    assert site.logits_escape, str(report)  # HF returns the logits next to the loss
    assert site.logits_read, str(report)  # float32: the op reads them, no recompute
    assert site.logits_bytes == BATCH * SEQ * VOCAB * 4, str(report)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_grads_and_adamw_match_eager(name: str) -> None:
    model = build(name)
    eager = copy.deepcopy(model)
    inductor = name in INDUCTOR_MODELS
    compiled, recorder = compile_model(model, inductor=inductor)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    for step in range(STEPS):
        inputs = batch(step)
        out = compiled(**inputs)
        expected = eager(**inputs)
        assert_close(out.loss, expected.loss, f"loss at step {step}")
        if step == 0:  # later, the weights differ by the optimizer's rounding
            tolerances = INDUCTOR_LOGITS_TOL if inductor else (RTOL, ATOL)
            assert_close(out.logits, expected.logits, "returned logits", *tolerances)
        out.loss.backward()
        expected.loss.backward()
        if step == 0:
            assert_grads_match(model, eager)
        opt.step()
        eager_opt.step()
        opt.zero_grad()
        eager_opt.zero_grad()
    if recorder is not None:
        assert recorder.fused_calls() == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_drop_escaping_logits(name: str) -> None:
    model = build(name)
    eager = copy.deepcopy(model)
    with dropping_logits():
        compiled, recorder = compile_model(model)
        inputs = batch(0)
        out = compiled(**inputs)
    expected = eager(**inputs)
    assert out.logits.numel() == 0
    assert_close(out.loss, expected.loss, "loss")
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(model, eager)
    if recorder is not None:
        assert recorder.fused_calls() == 1


def _ignored_logging() -> set:
    from torch._dynamo import config as dynamo_config

    return set(dynamo_config.ignore_logging_functions)


def test_gpt2_default_loss_type(caplog: pytest.LogCaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 names no known ``loss_type``: its ``warning_once`` breaks no graph.

    ``explain`` skips it for its run, ``enable()`` until ``disable()``, and
    handing out a backend object from then on (the parametrized tests above
    compile GPT-2 with ``fullgraph=True`` through ``make_backend``).
    """
    from torch._dynamo import config as dynamo_config

    from cce_inductor import backend as backend_module

    model = build("gpt2")
    loss_type = getattr(model, "loss_type", None)
    assert loss_type not in transformers.loss.loss_utils.LOSS_MAPPING, \
        "transformers now maps GPT-2's loss type: this test checks nothing"
    warning_once = transformers.utils.logging.warning_once
    # As in a process where no backend object was handed out yet.
    monkeypatch.setattr(backend_module, "_backends_handed_out", False)
    with dynamo_config.patch(ignore_logging_functions=set()):
        report = cce_inductor.explain(model, **batch(0))
        assert report.graphs == 1 and len(report.rewritten) == 1, str(report)
        assert _ignored_logging() == set()  # explain's setting is scoped to its run

        cce_inductor.enable()
        try:
            assert warning_once in _ignored_logging()
            torch._dynamo.reset()
            eager = copy.deepcopy(model)
            compiled = torch.compile(model, fullgraph=True)  # Inductor, pre-grad pass
            caplog.set_level(logging.INFO, logger="cce_inductor")
            with torch._inductor.config.patch(force_disable_caches=True):
                out = compiled(**batch(1))
            assert sum("rewrote cross_entropy" in r.getMessage()
                       for r in caplog.records) == 1
            assert_close(out.loss, eager(**batch(1)).loss, "loss under enable()")
        finally:
            cce_inductor.disable()
        assert _ignored_logging() == set()

        cce_inductor.make_backend("eager")
        assert warning_once in _ignored_logging()
        cce_inductor.disable()
        assert warning_once in _ignored_logging()  # backends keep it


def test_trainer_num_items_in_batch() -> None:
    """The Trainer's path: ``reduction="sum"`` divided by ``num_items_in_batch``."""
    model = build("llama")
    eager = copy.deepcopy(model)
    inputs = batch(0)
    num_items = (inputs["labels"][:, 1:] != -100).sum()
    report = cce_inductor.explain(model, **inputs, num_items_in_batch=num_items)
    assert len(report.rewritten) == 1, str(report)
    compiled, recorder = compile_model(model)
    out = compiled(**inputs, num_items_in_batch=num_items)
    expected = eager(**inputs, num_items_in_batch=num_items)
    assert_close(out.loss, expected.loss, "loss")
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(model, eager)
    assert recorder is not None and recorder.fused_calls() == 1
