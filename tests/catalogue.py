"""The catalogue of loss forms: what the rewrite serves and what it leaves alone.

Each ``Form`` is a small model written the way users write it.  The snapshot
tests, the numeric tests, the differential fuzz test and the table in
docs/catalogue.md (``tools/catalogue_table.py``) are all generated from this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

B, T, D, V = 2, 7, 12, 37  # none of them a multiple of any block size
IGNORE = -100


class Head(nn.Module):
    """A classifier (and an embedding to tie it to) around a loss function."""

    def __init__(self, loss_fn: Callable, bias: bool = False, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter((torch.randn(V, D, generator=gen) * D**-0.5).to(dtype))
        self.bias = nn.Parameter(torch.randn(V, generator=gen).to(dtype)) if bias else None
        self.lm_head = nn.Linear(D, V, bias=bias, dtype=dtype)
        self.embed = nn.Embedding(V, D, dtype=dtype)
        self.ce = nn.CrossEntropyLoss(ignore_index=5)
        self.loss_fn = loss_fn

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self, h, y)


@dataclass(frozen=True)
class Form:
    """One way of writing a loss; ``reason`` is set for forms left alone."""

    name: str
    code: str  # the user's code, for the docs table
    loss_fn: Callable
    reason: str | None = None
    bias: bool = False
    dtype: torch.dtype = torch.float32
    ignored_rows: bool = True  # targets include IGNORE
    autocast: bool = False
    available: bool = True  # False where this torch lacks what the form calls
    calls: int = 1  # op calls in the rewritten graph (one per linear)

    @property
    def rewritten(self) -> bool:
        return self.reason is None

    def model(self) -> Head:
        return Head(self.loss_fn, bias=self.bias, dtype=self.dtype)

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        h = torch.randn(B, T, D, generator=gen).to(self.dtype).requires_grad_()
        y = torch.randint(0, V, (B, T), generator=gen)
        if self.ignored_rows:
            y[0, 2] = y[1, 5] = IGNORE
        return h, y


def _masked_mean(m, h, y):
    logp = F.log_softmax(h @ m.weight.T, dim=-1)
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    mask = (y % 3 != 0).float()
    return (nll * mask).sum() / mask.sum()


def _hf_shift(m, h, y):
    logits = m.lm_head(h).float()
    labels = F.pad(y, (0, 1), value=IGNORE)
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), shift_labels.view(-1),
                           ignore_index=IGNORE)


def _z_loss(m, h, y):
    logits = F.linear(h, m.weight).view(-1, V)
    ce = F.cross_entropy(logits, y.view(-1))
    return ce + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()


def _with_accuracy(m, h, y):
    logits = F.linear(h, m.weight).view(-1, V)
    accuracy = (logits.argmax(-1) == y.view(-1)).float().mean()
    return F.cross_entropy(logits, y.view(-1)) + 0.0 * accuracy


def _two_losses(m, h, y):
    logits = F.linear(h, m.weight).view(-1, V)
    return F.cross_entropy(logits, y.view(-1)) + \
        F.nll_loss(F.log_softmax(logits, -1), y.view(-1).clamp(min=0))


def _ellipsis_shift(m, h, y):
    logits = m.lm_head(h)
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = y[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)),
                           shift_labels.view(-1))


def _final_logits_bias(m, h, y):
    bias = m.bias.detach().view(1, V)  # a (1, V) buffer, as BART's final_logits_bias
    logits = F.linear(h, m.weight) + bias
    return F.cross_entropy(logits.view(-1, V), y.view(-1))


def _padded_vocabulary(m, h, y):
    logits = F.linear(h, m.weight)[..., : V - 5]  # classes past V - 5 are padding
    return F.cross_entropy(logits.reshape(-1, V - 5), (y % (V - 5)).reshape(-1))


def _selective_log_softmax(m, h, y):
    logits = F.linear(h, m.weight)
    token_logits = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    logprobs = token_logits - logits.logsumexp(-1)
    return -logprobs.mean()


def _grpo_inplace_temperature(m, h, y):
    logits = F.linear(h, m.weight)[:, :-1, :]
    logits = logits[:, -4:]
    logits.div_(0.7)
    logprobs = torch.log_softmax(logits, -1).gather(-1, y[:, -4:, None]).squeeze(-1)
    return -logprobs.sum()


def _logprob_and_entropy(m, h, y):
    logp = F.log_softmax(F.linear(h, m.weight) / 0.9, -1)
    token_logp = logp.gather(-1, y[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return -(token_logp + 0.01 * entropy).mean()


def _entropy_softmax(m, h, y):
    logits = F.linear(h, m.weight)
    entropy = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    return F.cross_entropy(logits.view(-1, V), y.view(-1)) - 0.1 * entropy.mean()


def _entropy_lse(m, h, y):
    logits = F.linear(h, m.weight)
    entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    return entropy.pow(2).mean()


def _reference_logprobs(m, h, y):
    with torch.no_grad():
        reference = torch.log_softmax(F.linear(h, m.embed.weight), -1).gather(
            -1, y[..., None]).squeeze(-1)
    policy = -F.cross_entropy(m.lm_head(h).view(-1, V), y.view(-1), reduction="none")
    return ((policy.view_as(reference) - reference) ** 2).mean()


def _loss_and_accuracy_no_grad(m, h, y):
    logits = m.lm_head(h)
    loss = F.cross_entropy(logits.view(-1, V), y.view(-1), ignore_index=IGNORE)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == y).float().mean()
    return loss + 0.0 * accuracy


def _sampling(m, h, y):
    logits = F.linear(h, m.weight)
    sample = torch.multinomial(F.softmax(logits.view(-1, V), -1), 1)
    return F.cross_entropy(logits.view(-1, V), y.view(-1)) + 0.0 * sample.sum()


def _full_kl(m, h, y):
    logp = F.log_softmax(F.linear(h, m.weight), -1)
    reference = F.log_softmax(F.linear(h, m.embed.weight), -1).detach()
    kl = F.kl_div(logp, reference, log_target=True, reduction="batchmean")
    return -logp.gather(-1, y[..., None]).mean() + kl


def _chunked_entropy(m, h, y):
    logits = F.linear(h, m.weight)
    logprobs = logits.gather(-1, y[..., None]).squeeze(-1) - logits.logsumexp(-1)
    entropies = []
    for chunk in logits.reshape(-1, V).split(4):  # TRL's entropy_from_logits
        lp = F.log_softmax(chunk, -1)
        entropies.append(-(lp.exp() * lp).sum(-1))
    return -logprobs.mean() - 0.01 * torch.cat(entropies).mean()


def _softcap_then_temperature(m, h, y):
    logits = 3.0 * torch.tanh(F.linear(h, m.weight) / 3.0) / 0.7  # Gemma's cap, then T
    logp = F.log_softmax(logits, -1)
    return -logp.gather(-1, y[..., None]).mean()


def _trl_selective_log_softmax(m, h, y):
    logits = F.linear(h, m.weight)[:, :-1] / 0.9
    index = y[:, 1:]
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # TRL, float32
    return -(selected - lse).mean()


def _argmax_of_other_rows(m, h, y):
    logits = F.linear(h, m.weight)
    first = F.cross_entropy(logits[:, 0], y[:, 0])
    return first + 0.0 * (logits[:, -1].argmax(-1) == y[:, -1]).float().mean()


def _categorical(m, h, y):
    dist = torch.distributions.Categorical(logits=F.linear(h, m.weight))
    return -(dist.log_prob(y) + 0.01 * dist.entropy()).mean()


def _autocast_bf16(m, h, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m.lm_head(h)
    return F.cross_entropy(logits.float().view(-1, V), y.view(-1))


FORMS: list[Form] = [
    Form("linear_2d", "F.cross_entropy(F.linear(h2, W), y2)",
         lambda m, h, y: F.cross_entropy(F.linear(h.view(-1, D), m.weight), y.view(-1))),
    Form("view_3d", "F.cross_entropy(F.linear(h, W).view(-1, V), y.view(-1))",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1))),
    Form("reshape_3d", "F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).reshape(-1, V),
                                         y.reshape(-1))),
    Form("flatten_3d", "F.cross_entropy(logits.flatten(0, 1), y.flatten())",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).flatten(0, 1), y.flatten())),
    Form("matmul_t", "h @ W.t()",
         lambda m, h, y: F.cross_entropy((h @ m.weight.t()).view(-1, V), y.view(-1))),
    Form("matmul_T", "h @ W.T",
         lambda m, h, y: F.cross_entropy((h @ m.weight.T).view(-1, V), y.view(-1))),
    Form("torch_matmul", "torch.matmul(h, W.t())",
         lambda m, h, y: F.cross_entropy(torch.matmul(h, m.weight.t()).view(-1, V),
                                         y.view(-1))),
    Form("nn_linear", "nn.Linear(D, V, bias=False)",
         lambda m, h, y: F.cross_entropy(m.lm_head(h).view(-1, V), y.view(-1))),
    Form("nn_linear_bias", "nn.Linear(D, V, bias=True)",
         lambda m, h, y: F.cross_entropy(m.lm_head(h).view(-1, V), y.view(-1)), bias=True),
    Form("bias_add", "h @ W.T + b",
         lambda m, h, y: F.cross_entropy((h @ m.weight.T + m.bias).view(-1, V), y.view(-1)),
         bias=True),
    Form("tied_embedding", "F.linear(h, embedding.weight)",
         lambda m, h, y: F.cross_entropy(F.linear(h + m.embed(y.clamp(min=0)),
                                                  m.embed.weight).view(-1, V),
                                         y.view(-1))),
    Form("upcast_float", "bf16 logits .float()",
         lambda m, h, y: F.cross_entropy(m.lm_head(h).float().view(-1, V), y.view(-1)),
         dtype=torch.bfloat16),
    Form("upcast_to", "bf16 logits .to(torch.float32)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).to(torch.float32)
                                         .view(-1, V), y.view(-1)),
         dtype=torch.bfloat16),
    Form("autocast_bf16", "nn.Linear under torch.autocast(bfloat16)", _autocast_bf16,
         autocast=True),
    Form("shift_contiguous", "logits[:, :-1].contiguous(), y[:, 1:].contiguous()",
         lambda m, h, y: F.cross_entropy(
             F.linear(h, m.weight)[:, :-1].contiguous().view(-1, V),
             y[:, 1:].contiguous().view(-1))),
    Form("shift_reshape", "logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight)[:, :-1].reshape(-1, V),
                                         y[:, 1:].reshape(-1))),
    Form("hf_pad_shift", "Hugging Face: pad labels, shift, .float(), view", _hf_shift),
    Form("log_softmax_nll", "F.nll_loss(F.log_softmax(logits, -1), y)",
         lambda m, h, y: F.nll_loss(F.log_softmax(F.linear(h, m.weight).view(-1, V), -1),
                                    y.view(-1))),
    Form("gather_mean", "-log_softmax(logits).gather(-1, y[..., None]).mean()",
         lambda m, h, y: -F.log_softmax(h @ m.weight.T, -1).gather(
             -1, y.unsqueeze(-1)).squeeze(-1).mean(), ignored_rows=False),
    Form("gather_sum", "-(logp.gather(-1, y.unsqueeze(-1))).sum()",
         lambda m, h, y: -(torch.log_softmax(h @ m.weight.T, dim=-1).gather(
             -1, y.unsqueeze(-1))).sum(), ignored_rows=False),
    Form("gather_masked_mean", "(nll * mask).sum() / mask.sum()", _masked_mean,
         ignored_rows=False),
    Form("cross_entropy_module", "nn.CrossEntropyLoss(ignore_index=5)",
         lambda m, h, y: m.ce(m.lm_head(h).view(-1, V), y.view(-1).clamp(min=0))),
    Form("ignore_index", "ignore_index=3",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V),
                                         y.view(-1).clamp(min=0), ignore_index=3)),
    Form("reduction_none", "reduction='none'",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1),
                                         reduction="none").pow(2).sum()),
    Form("reduction_sum", "reduction='sum'",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1),
                                         reduction="sum")),
    Form("sum_over_count", "reduction='sum' / num_items (gradient accumulation)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1),
                                         reduction="sum") / (y != IGNORE).sum()),
    Form("label_smoothing", "label_smoothing=0.1",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1),
                                         label_smoothing=0.1)),
    Form("class_weight", "weight=w",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V), y.view(-1),
                                         weight=m.embed.weight[:, 0].detach().abs() + 0.5)),
    Form("softcap", "cap * tanh(logits / cap)",
         lambda m, h, y: F.cross_entropy(
             (30.0 * torch.tanh(F.linear(h, m.weight) / 30.0)).view(-1, V), y.view(-1))),
    Form("softcap_gemma", "logits / cap; tanh; * cap (Gemma 2)",
         lambda m, h, y: F.cross_entropy(
             (torch.tanh(F.linear(h, m.weight) / 5.0) * 5.0).view(-1, V), y.view(-1))),
    Form("scale_mul", "logits * 0.5",
         lambda m, h, y: F.cross_entropy((F.linear(h, m.weight) * 0.5).view(-1, V),
                                         y.view(-1))),
    Form("scale_div", "logits / temperature",
         lambda m, h, y: F.cross_entropy((F.linear(h, m.weight) / 0.7).view(-1, V),
                                         y.view(-1))),
    Form("z_loss", "cross_entropy + 1e-2 * logsumexp(logits, -1).pow(2).mean()", _z_loss),
    Form("ellipsis_shift", "logits[..., :-1, :].contiguous(); view(-1, logits.size(-1))",
         _ellipsis_shift),
    Form("log_softmax_view_nll", "F.nll_loss(F.log_softmax(z, -1).view(-1, V), y.view(-1))",
         lambda m, h, y: F.nll_loss(F.log_softmax(F.linear(h, m.weight), -1).view(-1, V),
                                    y.view(-1))),
    Form("permute_class_dim", "F.cross_entropy(logits.permute(0, 2, 1), y)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).permute(0, 2, 1), y)),
    Form("class_dim_1", "F.cross_entropy(logits.transpose(1, 2), y)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).transpose(1, 2), y)),
    Form("einsum", "torch.einsum('btd,vd->btv', h, W)",
         lambda m, h, y: F.cross_entropy(torch.einsum("btd,vd->btv", h, m.weight)
                                         .reshape(-1, V), y.reshape(-1))),
    Form("addmm", "torch.addmm(b, h2, W.t())",
         lambda m, h, y: F.cross_entropy(torch.addmm(m.bias, h.view(-1, D), m.weight.t()),
                                         y.view(-1)), bias=True),
    Form("bmm_expand", "torch.bmm(h, W.t().expand(B, D, V))",
         lambda m, h, y: F.cross_entropy(torch.bmm(h, m.weight.t().expand(B, D, V))
                                         .reshape(-1, V), y.reshape(-1))),
    Form("index_tensor_rows", "logits[:, positions] with a tensor of positions",
         lambda m, h, y: F.cross_entropy(
             F.linear(h, m.weight)[:, torch.arange(1, T, 2)].reshape(-1, V),
             y[:, torch.arange(1, T, 2)].reshape(-1))),
    Form("last_position", "F.cross_entropy(logits[:, -1, :], y[:, -1])",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight)[:, -1, :], y[:, -1]),
         ignored_rows=False),
    Form("narrow_shift", "logits.narrow(1, 0, T - 1)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).narrow(1, 0, T - 1)
                                         .reshape(-1, V), y[:, 1:].reshape(-1))),
    Form("final_logits_bias", "logits + bias of shape (1, V) (BART)", _final_logits_bias,
         bias=True),
    Form("padded_vocabulary", "logits[..., :V - 5] (padded vocabulary)", _padded_vocabulary,
         ignored_rows=False),
    Form("take_along_dim", "torch.take_along_dim(log_softmax(z), y[..., None], dim=-1)",
         lambda m, h, y: -torch.take_along_dim(F.log_softmax(h @ m.weight.T, -1),
                                               y[..., None], dim=-1).mean(),
         ignored_rows=False),
    Form("handwritten_log_softmax", "lp = z - z.logsumexp(-1, keepdim=True); lp.gather",
         lambda m, h, y: -(lambda z: z - z.logsumexp(-1, keepdim=True))(
             F.linear(h, m.weight)).gather(-1, y[..., None]).mean(), ignored_rows=False),
    Form("selective_log_softmax", "z.gather(-1, y[..., None]).squeeze(-1) - z.logsumexp(-1)",
         _selective_log_softmax, ignored_rows=False),
    Form("grpo_inplace_temperature", "z[:, :-1][:, -k:]; z.div_(T); log_softmax.gather",
         _grpo_inplace_temperature, ignored_rows=False),
    Form("logprob_and_entropy", "log-probs and -(lp.exp() * lp).sum(-1) at temperature",
         _logprob_and_entropy, ignored_rows=False),
    Form("entropy_softmax", "loss - 0.1 * -(softmax(z) * log_softmax(z)).sum(-1)",
         _entropy_softmax),
    Form("entropy_lse", "logsumexp(z) - (softmax(z) * z).sum(-1)", _entropy_lse,
         ignored_rows=False),
    Form("reference_logprobs", "policy -CE(reduction='none'), reference under no_grad",
         _reference_logprobs, ignored_rows=False, calls=2),
    Form("accuracy_no_grad", "loss, and accuracy from logits.argmax(-1) under no_grad",
         _loss_and_accuracy_no_grad),
    Form("chunked_entropy", "log-probs, and entropy over row chunks of logits.split(n)",
         _chunked_entropy, ignored_rows=False),
    Form("softcap_then_temperature", "cap * tanh(z / cap) / T, then log_softmax.gather",
         _softcap_then_temperature, ignored_rows=False),
    Form("trl_selective_log_softmax", "gather - torch.stack([lg.logsumexp(-1) for lg in z])",
         _trl_selective_log_softmax, ignored_rows=False),
    Form("argmax_of_other_rows", "CE of z[:, 0], and z[:, -1].argmax(-1): two calls",
         _argmax_of_other_rows, ignored_rows=False, calls=2),
    Form("categorical", "Categorical(logits=z): log_prob(y) and entropy()", _categorical,
         ignored_rows=False),
    Form("torch_linear_cross_entropy", "F.linear_cross_entropy(h2, W, y2) (torch 2.13+)",
         lambda m, h, y: F.linear_cross_entropy(h.view(-1, D), m.weight, y.view(-1)),
         available=hasattr(F, "linear_cross_entropy")),
    # Left alone.
    Form("soft_targets", "F.cross_entropy(logits, probabilities)",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight).view(-1, V),
                                         F.one_hot(y.view(-1).clamp(min=0), V).float()),
         reason="probabilities"),
    Form("log_softmax_other_dim", "log_softmax(logits, dim=0).gather(-1, ...)",
         lambda m, h, y: -F.log_softmax(F.linear(h.view(-1, D), m.weight), 0).gather(
             -1, y.view(-1, 1)).mean(), reason="not the vocabulary", ignored_rows=False),
    Form("argmax_consumer", "loss + accuracy from logits.argmax(-1)", _with_accuracy),
    Form("two_losses", "two losses from the same logits", _two_losses,
         reason="second loss"),
    Form("sampling", "loss, and torch.multinomial(softmax(logits))", _sampling,
         reason="needs the full matrix"),
    Form("full_kl", "KL divergence to a full reference distribution", _full_kl,
         reason="needs the full matrix", ignored_rows=False),
    Form("class_dim_1_unpermuted", "F.cross_entropy(logits (B, T, V), y (B, V)): class dim T",
         lambda m, h, y: F.cross_entropy(F.linear(h, m.weight)[:, :, :T],
                                         y.clamp(min=0) % T),
         reason="not the logits' vocabulary", ignored_rows=False),
]

FORMS_BY_NAME = {form.name: form for form in FORMS}
