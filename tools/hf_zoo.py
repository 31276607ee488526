"""Both transformers zoos: every ``*ForCausalLM`` and ``*ForConditionalGeneration``
class in the installed transformers, trained one step with and without the rewrite.

Each class is built at random from its configuration class with tiny sizes
(2 layers, hidden size 64, 4 heads, vocabulary 512, nested text, vision and
audio configurations shrunk the same way; eager attention; float32; dropout
off; seed 0; nothing is downloaded) and run on a text-only batch
(``input_ids``, ``attention_mask``, ``labels``; the decoder inputs of
sequence-to-sequence models come from the labels, as the model derives them).
One training step (forward, loss, backward) runs three times:

1. eagerly: the reference;
2. ``torch.compile`` with plain ``aot_eager`` (no rewrite).  A class is
   *usable* when it builds, runs, compiles and matches the reference here;
   the rest are reported with the stage that failed;
3. ``torch.compile(model, backend=cce_inductor.make_backend(inner))``, where
   ``inner`` counts the fused-op calls in the graphs the rewrite hands it and
   then runs ``aot_eager``.  The pass's ``Site`` list (what
   ``cce_inductor.backend.rewrite_graph`` returns) gives the reason for each
   loss it left alone.

Tolerances (float32): the loss with ``rtol=1e-4, atol=1e-5``; every gradient
element with ``|a - b| <= 1e-5 * max(max|b|, 1e-3 * G) + 1e-4 * |b|``, where
``b`` is the eager gradient and ``G`` the model's largest gradient entry.  The
compiled step computes the same sums in another order (AOTAutograd
decompositions; the fused op's chunked log-sum-exp and blocked classifier
gradient), so results differ by float32 rounding: a few 1e-7 relative to a
tensor's scale, amplified somewhat through a few layers.  Near-zero entries of
a gradient carry the absolute error of its large ones, hence the absolute term
relative to the gradient's largest entry; a gradient that is zero in exact
arithmetic (an attention key bias's, which the softmax cancels) holds only
rounding noise, about 1e-11 of ``G``, hence the floor at ``1e-3 * G``.  Real
mistakes (a missing bias or softcap, a wrong shift, a lost ignore mask) move
the loss and gradients by 1e-3 to 1e-1 relative, 10 to 1000 times the bound.
The report gives the worst element's share of its bound.

Usage::

    python tools/hf_zoo.py --zoo both                # writes docs/hf_zoo.md
    python tools/hf_zoo.py --zoo causal --only Llama # a few classes, no page
    python tools/hf_zoo.py --zoo both --resume       # skip classes already done

Each class runs under a time limit (``--time-limit``, 300 s; ``SIGALRM``) and
in its own ``try``, with ``torch._dynamo.reset()`` before and after it.
Results are appended to a JSON-lines cache (``--cache``) as each class
finishes, so an interrupted run resumes with ``--resume``; a run with every
class cached only rewrites the page.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import cce_inductor
import cce_inductor.backend as cce_backend_module
from cce_inductor.functional import fused_linear_cross_entropy

# Tiny sizes.
LAYERS = 2
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 128
SMALL_FFN = 32  # experts' and shared experts' MLPs
EXPERTS = 4
TOP_K = 2
RANK = 16  # low-rank projections (MLA, LoRA-like adapters)
VOCAB = 512
SPECIAL_BASE = 448  # large special-token ids are moved to [SPECIAL_BASE, VOCAB)
BATCH, SEQ = 2, 16
SEED = 0
TIME_LIMIT_S = 300

# Tolerances; see the module docstring.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
# A gradient's scale is at least this share of the model's largest gradient
# entry: a gradient that is zero in exact arithmetic (an attention key bias,
# which the softmax cancels) holds only rounding noise of order 1e-12.
GRAD_FLOOR = 1e-3

ZOOS = {"causal": "ForCausalLM", "conditional": "ForConditionalGeneration"}

# Categories of a result.
BUILD_ERROR = "build error"
FORWARD_ERROR = "forward error (text-only inputs)"
AOT_FAILURE = "aot_eager failure"
AOT_PARITY = "aot_eager parity failure"
TIMEOUT = "time limit"
REWRITTEN = "rewritten with parity"
REWRITE_FAILURE = "rewritten with parity FAILURE"
REWRITE_ERROR = "run with the rewrite FAILED"
LEFT_ALONE = "left alone"
LEFT_ALONE_FAILURE = "left alone with parity FAILURE"
USABLE = (REWRITTEN, REWRITE_FAILURE, REWRITE_ERROR, LEFT_ALONE, LEFT_ALONE_FAILURE)
FAILURES = (REWRITE_FAILURE, REWRITE_ERROR, LEFT_ALONE_FAILURE)


@dataclass
class Result:
    """What happened to one class."""

    zoo: str
    name: str
    category: str
    reason: str = ""
    fused_calls: int = 0
    graphs: int = 0
    sites: list[dict[str, Any]] = field(default_factory=list)
    loss: float | None = None
    aot_worst: float | None = None  # worst share of the tolerance, plain aot_eager
    cce_worst: float | None = None  # the same with the rewrite
    seconds: float = 0.0
    stage: str = ""
    code: str = ""  # the cce_inductor source measured (see code_state)


def code_state() -> str:
    """The git commit of the checkout, and whether ``cce_inductor/`` differs from it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cce_inductor"],
                               cwd=root, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes to cce_inductor/" if dirty else "")


class _TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ``_TimeLimit`` in the block after ``seconds`` (main thread, POSIX)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _TimeLimit(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- configuration


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_count(d: dict[str, Any]) -> int | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
                "num_decoder_layers", "encoder_layers"):
        if _is_int(d.get(key)):
            return d[key]
    return None


def _is_token_key(key: str) -> bool:
    return bool(re.search(r"(token_ids?|token_index|_id|_ids)$", key)) and \
        "vocab" not in key and "layer" not in key and "type" not in key


def _size_for(key: str, value: int) -> int | None:
    """The tiny value of one integer attribute, or None to keep it."""
    k = key.lower()
    if "dropout" in k or "window" in k or "position" in k or "max_" in k or "chunk" in k:
        return None
    if re.search(r"(^|_)(n_)?layers?$|(^|_)n_layer$|num_.*layers$|_layers$", k):
        if "shared" in k:
            return 0
        return min(value, LAYERS)
    if k == "first_k_dense_replace":
        return min(value, 1)
    if k.startswith("unpadded_vocab"):
        return VOCAB - 16 if value > VOCAB else None
    if "vocab_size" in k or k in ("n_vocab", "num_embeddings"):
        return VOCAB if value > VOCAB else None
    if k.endswith("topk_group"):
        return 1
    if re.search(r"(per_tok(en)?|topk|top_k|^moe_k)$", k):
        return min(value, TOP_K)
    if "shared_experts" in k and "intermediate" not in k and "size" not in k:
        return min(value, 1)
    if re.search(r"(num_|n_)(routed_|local_)?experts$|^moe_num_experts$|^num_experts$", k):
        return min(value, EXPERTS)
    if k in ("n_group", "num_expert_group"):
        return 1
    if "lora_rank" in k or k.endswith("_rank"):
        return min(value, RANK)
    if re.search(r"(key_value|kv)_heads$|num_kv_heads$|num_query_groups$", k):
        return min(value, KV_HEADS)
    if re.search(r"heads$|(^|_)n_head$|attention_heads", k):
        return min(value, HEADS)
    if re.search(r"head_dim$|rotary_dim$|^d_kv$|^kv_channels$|^dim_head$|head_size$|"
                 r"attention_head_dim$", k):
        return min(value, HEAD_DIM)
    if "intermediate" in k or "ffn" in k or k in ("d_ff", "n_inner", "mlp_dim", "dim_ff"):
        if "moe" in k or "expert" in k or "shared" in k:
            return min(value, SMALL_FFN)
        return min(value, FFN)
    if re.search(r"hidden_size$|hidden_dim$|(^|_)d_model$|(^|_)n_embd$|embed_dim$|"
                 r"^dim$|^embedding_size$|^embedding_dim$|^emb_dim$|^model_dim$|"
                 r"^d_embed$|proj_dim$|^projection_dim$|^lru_width$|^hidden_size_global$", k):
        return min(value, HIDDEN)
    return None


class _TokenMap:
    """Moves special-token ids beyond the tiny vocabulary into its top end."""

    def __init__(self) -> None:
        self.mapping: dict[int, int] = {}

    def __call__(self, value: int) -> int:
        if value < SPECIAL_BASE:
            return value
        if value not in self.mapping:
            self.mapping[value] = SPECIAL_BASE + len(self.mapping) % (VOCAB - SPECIAL_BASE)
        return self.mapping[value]


def _looks_like_config(d: dict[str, Any]) -> bool:
    return "model_type" in d or any(key in d for key in (
        "hidden_size", "d_model", "num_hidden_layers", "vocab_size", "num_layers"))


def shrink(d: dict[str, Any], tokens: _TokenMap | None = None) -> dict[str, Any]:
    """A copy of the configuration dict ``d`` with tiny sizes, recursively.

    Sub-configurations (text, vision, audio, encoder, decoder, ...) are
    shrunk the same way; lists with one entry per layer are cut to the new
    layer count, lists of layer indices keep the indices that still exist;
    dropout, layer drop and router noise are set to zero; special-token ids
    beyond the vocabulary are moved into its top end.
    """
    tokens = _TokenMap() if tokens is None else tokens
    old_layers = _layer_count(d)
    out: dict[str, Any] = {}
    for key, value in d.items():
        k = str(key).lower()
        if isinstance(value, dict):
            out[key] = shrink(value, tokens) if _looks_like_config(value) else value
        elif isinstance(value, float) and ("drop" in k or "jitter" in k or "noise" in k):
            out[key] = 0.0
        elif _is_int(value):
            if _is_token_key(k):
                out[key] = tokens(value)
            else:
                small = _size_for(k, value)
                out[key] = value if small is None else small
        elif isinstance(value, list) and value:
            out[key] = _shrink_list(k, value, old_layers, tokens)
        elif value is None and k in _UNSET_SIZES:
            out[key] = _UNSET_SIZES[k]
        else:
            out[key] = value
    if out.get("use_cache") is True:
        out["use_cache"] = False
    _make_consistent(out)
    return out


# Sizes some configurations leave unset although their models read them.
_UNSET_SIZES = {"head_dim": HEAD_DIM, "num_key_value_heads": KV_HEADS}


def _make_consistent(d: dict[str, Any]) -> None:
    """Restore the relations between sizes that the rules above can break."""
    if _is_int(d.get("kv_lora_rank")) and _is_int(d.get("num_attention_heads")):
        d["num_key_value_heads"] = d["num_attention_heads"]  # latent attention: no GQA
    hidden = d.get("hidden_size")
    for prefix in ("mamba_", ""):  # SSM heads x head size = expand x hidden size
        expand = d.get(f"{prefix}expand")
        for heads, size in ((f"{prefix}n_heads", f"{prefix}d_head"),
                            (f"{prefix}num_heads", f"{prefix}head_dim")):
            if all(_is_int(x) for x in (hidden, expand, d.get(heads), d.get(size))):
                d[heads] = expand * hidden // d[size]
        if _is_int(d.get(f"{prefix}n_groups")):
            d[f"{prefix}n_groups"] = 1
    for value in d.values():  # multimodal rotary sections split head_dim / 2
        sections = value.get("mrope_section") if isinstance(value, dict) else None
        if isinstance(sections, list) and sections and all(_is_int(x) for x in sections):
            value["mrope_section"] = _split(HEAD_DIM // 2, sections)
    per_layer = d.get("per_layer_config")
    if isinstance(per_layer, dict):  # settings keyed by layer index
        d["per_layer_config"] = {k: v for k, v in per_layer.items()
                                 if str(k).isdigit() and int(k) < LAYERS}


def _shrink_list(key: str, value: list[Any], old_layers: int | None,
                 tokens: _TokenMap) -> list[Any]:
    k = key.lower()
    ints = all(_is_int(v) for v in value)
    if ints and _is_token_key(k):
        return [tokens(v) for v in value]
    if ints and "layer" in k and old_layers is not None and len(value) != old_layers:
        kept = [v for v in value if v < LAYERS]  # indices of layers
        return kept or [LAYERS - 1]
    if old_layers is not None and len(value) == old_layers and old_layers > LAYERS:
        value = _per_layer(value)
    if ints:
        return [v if (s := _size_for(key, v)) is None else s for v in value]
    return list(value)


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in proportion to ``parts`` (each at least 1), summing to it."""
    whole = sum(parts)
    out = [max(1, total * p // whole) for p in parts]
    for i in range(total - sum(out)):
        out[-1 - i % len(out)] += 1
    return out


def _per_layer(value: list[Any]) -> list[Any]:
    """A list with one entry per layer, cut to ``LAYERS`` entries.

    Keeps the first entries, but where the list holds several kinds (sliding
    and full attention, attention and convolution, ...) the last entry is the
    first one of a kind not kept yet, so that every layer kind is still built.
    """
    kept = list(value[:LAYERS])
    try:
        missing = [v for v in value[LAYERS:] if v not in kept]
    except Exception:
        return kept
    if missing:
        kept[-1] = missing[0]
    return kept


def build(cls: type, seed: int = SEED) -> Any:
    """``cls`` built at random from its configuration class with tiny sizes.

    float32, eager attention, training mode, every dropout at zero.
    """
    config_cls = cls.config_class
    config_dict = shrink(config_cls().to_dict())
    config = config_cls.from_dict(config_dict)
    if getattr(config, "is_encoder_decoder", False):
        # Checkpoints set these; the labels' shift into decoder inputs needs them.
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = config.pad_token_id
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
    model = model.float().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _special_ids(config: Any) -> set[int]:
    found: set[int] = set()

    def walk(d: dict[str, Any]) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif _is_token_key(str(key).lower()):
                if _is_int(value):
                    found.add(value)
                elif isinstance(value, list):
                    found.update(v for v in value if _is_int(v))

    walk(config.to_dict())
    return found


def make_batch(model: Any, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Text-only inputs: ``input_ids``, ``attention_mask`` and ``labels``.

    Tokens avoid every special-token id of the configuration; the labels are
    the inputs with a masked prompt (row 0) and padding (row 1) at -100.
    Arguments the model's ``forward`` does not take are left out.
    """
    config = model.config
    vocab = _vocab_size(config)
    allowed = torch.tensor(sorted(set(range(4, min(vocab, SPECIAL_BASE)))
                                  - _special_ids(config)))
    generator = torch.Generator().manual_seed(1000 + seed)
    input_ids = allowed[torch.randint(len(allowed), (BATCH, SEQ), generator=generator)]
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "labels": labels}
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params:
        inputs["use_cache"] = False
    return {k: v for k, v in inputs.items() if takes_any or k in params}


def _vocab_size(config: Any) -> int:
    for candidate in (config, getattr(config, "text_config", None),
                      getattr(config, "decoder", None)):
        size = getattr(candidate, "vocab_size", None)
        if _is_int(size):
            return size
    return VOCAB


# ---------------------------------------------------------------- one step


def _is_fused(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if target is fused_linear_cross_entropy:
        return True
    namespace = getattr(target, "namespace", None)
    if namespace is None:
        namespace = getattr(getattr(target, "_overloadpacket", None), "namespace", None)
    return namespace == "cce"


class CountingBackend:
    """Inner backend: counts graphs and fused-op calls, then runs ``aot_eager``."""

    def __init__(self) -> None:
        self.graphs = 0
        self.fused_calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 **kwargs: Any) -> Callable[..., Any]:
        self.graphs += 1
        self.fused_calls += sum(_is_fused(node) for node in gm.graph.nodes)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)


@contextlib.contextmanager
def recording_sites(sink: list[dict[str, Any]]) -> Iterator[None]:
    """Record every ``Site`` that ``cce_inductor.backend.rewrite_graph`` returns."""
    original = cce_backend_module.rewrite_graph

    def recording(graph: torch.fx.Graph) -> list[Any]:
        sites = original(graph)
        for site in sites:
            sink.append({"form": site.form, "rewritten": site.rewrite,
                         "reason": site.skip_reason, "source": site.source_line()})
        return sites

    cce_backend_module.rewrite_graph = recording
    try:
        yield
    finally:
        cce_backend_module.rewrite_graph = original


def train_step(model: Any, inputs: dict[str, torch.Tensor], call: Any = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Forward and backward once; the loss and each parameter's gradient.

    ``call`` (default ``model``) runs the forward, e.g. the compiled model.
    """
    out = (model if call is None else call)(**inputs)
    loss = out.get("loss") if hasattr(out, "get") else out[0]
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError("the model returned no loss")
    loss.backward()
    grads = {name: None if p.grad is None else p.grad.detach().clone()
             for name, p in model.named_parameters()}
    return loss.detach(), grads


def worst_share(loss: torch.Tensor, grads: dict[str, torch.Tensor | None],
                ref_loss: torch.Tensor, ref_grads: dict[str, torch.Tensor | None]
                ) -> tuple[float, str]:
    """The worst difference's share of its tolerance (<= 1 is parity), and where."""
    worst, where = 0.0, ""

    def update(share: float, what: str) -> None:
        nonlocal worst, where
        if not share <= worst:  # NaN wins too
            worst, where = share, what

    bound = LOSS_ATOL + LOSS_RTOL * ref_loss.abs()
    update(_share(loss, ref_loss, bound), "loss")
    largest = max((float(g.abs().max()) for g in ref_grads.values()
                   if g is not None and g.numel()), default=0.0)
    for name, ref in ref_grads.items():
        got = grads.get(name)
        if ref is None and got is None:
            continue
        if ref is None or got is None:
            other = got if ref is None else ref
            update(0.0 if not other.any() else float("inf"), f"gradient of {name} (missing)")
            continue
        if got.shape != ref.shape:
            update(float("inf"), f"gradient of {name} (shape)")
            continue
        scale = max(float(ref.abs().max()) if ref.numel() else 0.0, GRAD_FLOOR * largest)
        bound = GRAD_ATOL * scale + GRAD_RTOL * ref.abs()
        update(_share(got, ref, bound), f"gradient of {name}")
    return worst, where


def _share(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    both_nan = got.isnan() & ref.isnan()
    same = (got == ref) | both_nan
    diff = (got.double() - ref.double()).abs()
    share = torch.where(same, torch.zeros_like(diff), diff / bound.double().clamp_min(1e-30))
    return float(share.max())


def _compiled_step(model: Any, inputs: dict[str, torch.Tensor], rewrite: bool
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], CountingBackend,
                              list[dict[str, Any]]]:
    torch._dynamo.reset()
    counter = CountingBackend()
    sites: list[dict[str, Any]] = []
    backend = cce_inductor.make_backend(counter) if rewrite else counter
    compiled = torch.compile(model, backend=backend)
    with recording_sites(sites) if rewrite else contextlib.nullcontext():
        loss, grads = train_step(model, inputs, compiled)
    return loss, grads, counter, sites


def _error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().replace("\n", " ")
    return re.sub(r"\s+", " ", text)[:300]


def check_class(cls: type, zoo: str, time_limit_s: int = TIME_LIMIT_S) -> Result:
    """Build ``cls`` tiny, train one step eagerly, with ``aot_eager`` and with
    the rewrite, and classify the outcome (see the module docstring)."""
    result = Result(zoo=zoo, name=cls.__name__, category=BUILD_ERROR)
    start = time.perf_counter()
    torch._dynamo.reset()
    try:
        with time_limit(time_limit_s):
            _check(cls, result)
    except Exception as error:  # the stage that failed decides the category
        if _timed_out(error):  # raised directly, or wrapped by Dynamo
            result.category = TIMEOUT
            result.reason = f"over {time_limit_s} s (in {result.stage})"
            return _finish(result, start)
        result.reason = _error(error)
        result.category = {
            "build": BUILD_ERROR, "eager": FORWARD_ERROR, "aot_eager": AOT_FAILURE,
            "rewrite": REWRITE_ERROR,
        }.get(result.stage, BUILD_ERROR)
        logging.getLogger(__name__).debug("%s", traceback.format_exc())
    finally:
        torch._dynamo.reset()
    return _finish(result, start)


def _finish(result: Result, start: float) -> Result:
    result.seconds = round(time.perf_counter() - start, 1)
    return result


def _timed_out(error: BaseException | None) -> bool:
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, _TimeLimit) or "_TimeLimit" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _check(cls: type, result: Result) -> None:
    result.stage = "build"
    model = build(cls)
    inputs = make_batch(model)
    plain = copy.deepcopy(model)
    fused = copy.deepcopy(model)
    result.stage = "eager"
    ref_loss, ref_grads = train_step(model, inputs)
    result.loss = round(float(ref_loss), 6)
    del model
    result.stage = "aot_eager"
    loss, grads, _, _ = _compiled_step(plain, inputs, rewrite=False)
    share, where = worst_share(loss, grads, ref_loss, ref_grads)
    result.aot_worst = share
    del plain, grads
    if not share <= 1.0:
        result.category = AOT_PARITY
        result.reason = f"{where}: {share:.3g} x the tolerance"
        return
    result.stage = "rewrite"
    loss, grads, counter, sites = _compiled_step(fused, inputs, rewrite=True)
    share, where = worst_share(loss, grads, ref_loss, ref_grads)
    result.cce_worst = share
    result.fused_calls, result.graphs, result.sites = counter.fused_calls, counter.graphs, sites
    parity = share <= 1.0
    if counter.fused_calls:
        result.category = REWRITTEN if parity else REWRITE_FAILURE
    else:
        result.category = LEFT_ALONE if parity else LEFT_ALONE_FAILURE
    if not parity:
        result.reason = f"{where}: {share:.3g} x the tolerance"
    elif not counter.fused_calls:
        result.reason = skip_reason(sites)


def skip_reason(sites: list[dict[str, Any]]) -> str:
    """Why no loss was rewritten, from the pass's sites."""
    reasons = sorted({s["reason"] for s in sites if not s["rewritten"] and s["reason"]})
    if not reasons:
        return "no candidate loss found"
    return "; ".join(reasons)


# ---------------------------------------------------------------- the zoos


def classes(zoo: str, only: str | None = None) -> list[type]:
    """Every exported ``*ForCausalLM`` / ``*ForConditionalGeneration`` class."""
    import transformers

    suffix = ZOOS[zoo]
    names = sorted(n for n in dir(transformers)
                   if n.endswith(suffix) and not n.startswith(("Auto", "TF", "Flax")))
    if only:
        names = [n for n in names if re.search(only, n)]
    found = []
    for name in names:
        try:
            cls = getattr(transformers, name)
        except Exception:  # a class whose optional dependency is missing
            continue
        if isinstance(cls, type) and getattr(cls, "config_class", None) is not None:
            found.append(cls)
    return found


def _load_cache(path: str) -> list[Result]:
    results = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    results.append(Result(**json.loads(line)))
    return results


def run(zoos: list[str], only: str | None, cache: str, resume: bool,
        time_limit_s: int = TIME_LIMIT_S) -> list[Result]:
    """Check every class of ``zoos``, appending each result to ``cache``."""
    done = {(r.zoo, r.name): r for r in _load_cache(cache)} if resume else {}
    if not resume and os.path.exists(cache):
        os.remove(cache)
    results = []
    code = code_state()
    for zoo in zoos:
        todo = classes(zoo, only)
        for index, cls in enumerate(todo, 1):
            key = (zoo, cls.__name__)
            if key in done:
                results.append(done[key])
                continue
            print(f"[{zoo} {index}/{len(todo)}] {cls.__name__} ...", end=" ", flush=True)
            result = check_class(cls, zoo, time_limit_s)
            result.code = code
            print(f"{result.category} ({result.seconds} s) {result.reason[:160]}", flush=True)
            with open(cache, "a") as f:
                f.write(json.dumps(asdict(result)) + "\n")
            results.append(result)
    return results


# ---------------------------------------------------------------- reports


def summary(results: list[Result], zoo: str) -> dict[str, Any]:
    """Counts for one zoo: total, usable, rewritten with parity, failures, share."""
    mine = [r for r in results if r.zoo == zoo]
    usable = [r for r in mine if r.category in USABLE]
    rewritten = [r for r in usable if r.category == REWRITTEN]
    return {
        "classes": len(mine), "usable": len(usable), "rewritten": len(rewritten),
        "failures": sum(r.category in FAILURES for r in usable),
        "left_alone": sum(r.category == LEFT_ALONE for r in usable),
        "share": len(rewritten) / len(usable) if usable else float("nan"),
    }


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(results: list[Result], zoos: list[str], command: str) -> str:
    """The generated page: summary, misses by reason, failures, every class."""
    import transformers

    today = datetime.date.today().isoformat()
    lines = [
        "# The transformers zoos",
        "",
        f"Generated by `{command}` on {today} with transformers "
        f"{transformers.__version__} and torch {torch.__version__}; do not edit by hand.",
        "cce_inductor measured: " + _code_states(results) + ".",
        "",
        "Every `*ForCausalLM` and `*ForConditionalGeneration` class is built tiny from its "
        f"configuration class ({LAYERS} layers, hidden size {HIDDEN}, vocabulary {VOCAB}, "
        "eager attention, float32, seed 0), run on text-only inputs (`input_ids`, "
        "`attention_mask`, `labels`) and trained one step eagerly, with plain `aot_eager` and "
        "with `cce_inductor.make_backend(\"aot_eager\")`; the loss and every gradient are "
        f"compared (loss: rtol {LOSS_RTOL:g}, atol {LOSS_ATOL:g}; gradients: "
        f"`|a - b| <= {GRAD_ATOL:g} * max(max|b|, {GRAD_FLOOR:g} * G) + {GRAD_RTOL:g} * |b|` "
        "with G the model's largest gradient entry). *Usable* classes build, "
        "run and match with plain `aot_eager`; they are the denominator. See "
        "`tools/hf_zoo.py` for the details.",
        "",
        "| zoo | classes | usable | rewritten with parity | share | left alone | "
        "parity failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for zoo in zoos:
        s = summary(results, zoo)
        lines.append(f"| {ZOOS[zoo]} | {s['classes']} | {s['usable']} | {s['rewritten']} | "
                     f"{s['share']:.1%} | {s['left_alone']} | {s['failures']} |")
    worst = [x for r in results for x in (r.aot_worst, r.cce_worst)
             if x is not None and r.category in USABLE]
    if worst:
        lines += ["", f"Worst difference over the usable classes, as a share of its bound: "
                  f"{max(worst):.3g}."]
    for zoo in zoos:
        mine = [r for r in results if r.zoo == zoo]
        lines += ["", f"## {ZOOS[zoo]}", ""]
        failures = [r for r in mine if r.category in FAILURES]
        lines += ["### Parity failures", ""]
        lines += [f"- `{r.name}`: {r.category}: {_cell(r.reason)}" for r in failures] or \
            ["None."]
        lines += ["", "### Usable classes left alone, by reason", ""]
        groups: dict[str, list[str]] = {}
        for r in mine:
            if r.category == LEFT_ALONE:
                groups.setdefault(r.reason, []).append(r.name)
        for reason, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            lines.append(f"- {_cell(reason)}: " + ", ".join(f"`{n}`" for n in names))
        if not groups:
            lines.append("None.")
        lines += ["", "### Not usable, by stage", ""]
        for category in (BUILD_ERROR, FORWARD_ERROR, AOT_FAILURE, AOT_PARITY, TIMEOUT):
            names = [r.name for r in mine if r.category == category]
            if names:
                lines.append(f"- {category} ({len(names)}): " +
                             ", ".join(f"`{n}`" for n in names))
        lines += ["", "### Every class", "", "| class | result | fused calls | graphs | "
                  "worst share (aot_eager / rewrite) | seconds | detail |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(mine, key=lambda r: r.name):
            shares = " / ".join("-" if x is None else f"{x:.2g}"
                                for x in (r.aot_worst, r.cce_worst))
            lines.append(f"| `{r.name}` | {r.category} | {r.fused_calls} | {r.graphs} | "
                         f"{shares} | {r.seconds:g} | {_cell(r.reason)} |")
    return "\n".join(lines) + "\n"


def _code_states(results: list[Result]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.code or "unrecorded"] = counts.get(r.code or "unrecorded", 0) + 1
    if len(counts) == 1:
        return f"`{next(iter(counts))}`"
    return ", ".join(f"`{code}` ({n} classes: " + ", ".join(
        f"`{r.name}`" for r in results if (r.code or "unrecorded") == code) + ")"
        if n <= 10 else f"`{code}` ({n} classes)" for code, n in counts.items())


def print_table(results: list[Result], zoos: list[str]) -> None:
    """The per-class table and each zoo's share, on stdout."""
    for zoo in zoos:
        print(f"\n== {ZOOS[zoo]} ==")
        for r in sorted((r for r in results if r.zoo == zoo), key=lambda r: r.name):
            print(f"  {r.name:55s} {r.category:32s} {r.reason[:120]}")
        s = summary(results, zoo)
        print(f"  {ZOOS[zoo]}: {s['rewritten']} of {s['usable']} usable classes rewritten with "
              f"parity ({s['share']:.1%}); {s['left_alone']} left alone; {s['failures']} "
              f"parity failures; {s['classes'] - s['usable']} of {s['classes']} not usable")


def _shown_args(args: list[str]) -> list[str]:
    """The arguments that decide the results: without ``--resume`` and ``--cache``."""
    shown, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--cache":
            skip = True
        elif arg != "--resume" and not arg.startswith("--cache="):
            shown.append(arg)
    return shown


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", choices=["causal", "conditional", "both"], default="both")
    parser.add_argument("--only", help="check only the classes whose name matches this regex")
    parser.add_argument("--out", help="the markdown page to write (default docs/hf_zoo.md, "
                        "not written with --only unless given)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(),
                                                        "hf_zoo.jsonl"),
                        help="JSON-lines file the results are appended to")
    parser.add_argument("--resume", action="store_true",
                        help="skip the classes the cache already has")
    parser.add_argument("--time-limit", type=int, default=TIME_LIMIT_S,
                        help="seconds per class")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    logging.getLogger("cce_inductor").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    zoos = ["causal", "conditional"] if args.zoo == "both" else [args.zoo]
    results = run(zoos, args.only, args.cache, args.resume, args.time_limit)
    print_table(results, zoos)
    out = args.out or (None if args.only else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "hf_zoo.md"))
    if out:
        command = "python tools/hf_zoo.py " + " ".join(_shown_args(
            argv if argv is not None else sys.argv[1:]))
        with open(out, "w") as f:
            f.write(markdown(results, zoos, command.strip()))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
