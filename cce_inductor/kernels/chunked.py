"""Portable linear-cross-entropy in plain PyTorch, a block of rows at a time.

This is the implementation behind the op on every device without a faster
kernel (the CPU, and CUDA without Triton).  At most ``rows_per_chunk x V``
float32 logits exist at any moment (twice that under softcap), in buffers
allocated once and reused for every block.

Notation: for a row ``i`` with target ``y``, ``x = e @ c.T``,
``u = (x + bias) * logit_scale``, ``z = softcap * tanh(u / softcap)`` (or
``z = u``), ``p = softmax(z)``, ``w`` the class weights (all ones when absent),
``W = sum(w)`` and ``s`` the label smoothing.  The per-row loss of
``F.cross_entropy`` is then

    loss_i = a_i * lse_i - (1 - s) * w_y * z_iy - (s / V) * sum_j w_j z_ij,
    a_i    = (1 - s) * w_y + s * W / V,

and its derivative with respect to ``z_ij`` is

    a_i * p_ij - (1 - s) * w_y * [j == y] - (s / V) * w_j.

Ignored rows contribute nothing; the mean divides by the sum of ``w_y`` over
the rows that are not ignored.

The same sweep gives per-row statistics on request: the entropy
``H_i = -sum_j p_ij log p_ij``, whose derivative with respect to ``z_ij`` is
``-p_ij (log p_ij + H_i)``, and the argmax.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import config


@dataclass(frozen=True)
class LossSpec:
    """The options of the loss that are the same for every row."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    logit_scale: float


@dataclass
class RowTerms:
    """Per-row constants of the loss (shared by every implementation)."""

    valid: Tensor          # bool (N,): target != ignore_index
    targets: Tensor        # int64 (N,): the target, 0 where ignored
    target_weight: Tensor  # float32 (N,): w_y, 0 where ignored
    weight_total: Tensor | float  # W = sum(w)

    def mean_denominator(self) -> Tensor:
        """The mean's divisor: the sum of w_y over the rows that are not ignored."""
        return self.target_weight.sum()

    def upstream(self, grad_loss: Tensor | None, reduction: str) -> Tensor | None:
        """The upstream gradient of every row's loss, zero at ignored rows."""
        if grad_loss is None:
            return None
        g = grad_loss.float()
        if reduction == "mean":
            g = g / self.mean_denominator()
        return torch.where(self.valid, g.expand(self.valid.shape), 0.0)


def row_terms(targets: Tensor, weight: Tensor | None, spec: LossSpec, vocab: int) -> RowTerms:
    """Validity, safe targets and target weights of every row."""
    valid = targets != spec.ignore_index
    safe = torch.where(valid, targets, 0).long()
    if weight is None:
        return RowTerms(valid, safe, valid.float(), float(vocab))
    w = weight.float()
    return RowTerms(valid, safe, torch.where(valid, w[safe], 0.0), w.sum())


def row_loss(terms: RowTerms, spec: LossSpec, vocab: int, lse: Tensor,
             target_logit: Tensor, weighted_sum: Tensor | None) -> Tensor:
    """Unreduced float32 loss of the rows ``terms`` describe, zero where ignored.

    ``weighted_sum`` is ``sum_j w_j z_ij``, needed under label smoothing only.
    """
    s = spec.label_smoothing
    loss = (1 - s) * terms.target_weight * (lse - target_logit)
    if weighted_sum is not None:
        smooth = (s / vocab) * (terms.weight_total * lse - weighted_sum)
        loss = torch.where(terms.valid, loss + smooth, 0.0)
    return loss


def reduce_rows(loss: Tensor, terms: RowTerms, reduction: str) -> Tensor:
    """``F.cross_entropy``'s reduction of per-row losses (NaN mean if all ignored)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / terms.mean_denominator()


# On the CPU the logits of a block are computed ``VOCAB_PIECE`` columns at a
# time, each piece as ``c[piece] @ e_block.T`` written straight into its
# columns of the row-major block.  ``tools/bench_cpu_matmul.py`` times the
# choice: on a 2-core AVX-512 machine with MKL (196 rows), pieces ran at
# 121-161 GFLOP/s against 95 (D=512) and 129 (D=256) for the whole vocabulary.
VOCAB_PIECE = 2048

# A row's lse is recovered from its softmax at the target as
# ``z_y - log(p_y)`` when ``p_y`` is at least this (full float32 precision);
# rows below it take the slower, exact route through their largest ``p``.
_SMALLEST_TRUSTED_P = 1e-30


def on_cpu(t: Tensor) -> bool:
    """Whether ``t`` takes the CPU's route: vocabulary pieces, the in-place
    softmax kernel, and flags read on the host (no device synchronization)."""
    return t.device.type == "cpu"


def softmax_(z: Tensor) -> Tensor:
    """Softmax of each row of ``z``, computed in place."""
    if on_cpu(z):
        # The CPU kernel reads each element before writing it (checked by
        # tests/test_op.py), and makes one pass less than the three ops below.
        return torch.softmax(z, 1, out=z)
    z.sub_(z.amax(1, keepdim=True)).exp_()
    return z.div_(z.sum(1, keepdim=True))


def rows_per_chunk(num_rows: int, vocab: int) -> int:
    """How many rows of float32 logits fit in ``config.logits_chunk_bytes`` (at least 1)."""
    return max(1, min(num_rows, config.logits_chunk_bytes // (4 * max(vocab, 1))))


class LogitBlocks:
    """Float32 operands and the reusable logits buffers, a block of rows at a time.

    Shared by this module's loss and the vocabulary-parallel one (which holds
    a slice of the classifier's rows).
    """

    def __init__(self, e: Tensor, c: Tensor, bias: Tensor | None, spec: LossSpec,
                 given_logits: Tensor | None = None) -> None:
        self.spec = spec
        self.given_logits = given_logits  # the final logits, already computed
        self.e = e.float()
        self.c = c.float()
        self.bias = None if bias is None else bias.float()
        self.vocab = c.shape[0]
        self.step = rows_per_chunk(e.shape[0], self.vocab)
        self._logits = e.new_empty(self.step, self.vocab, dtype=torch.float32)
        self._tanh = None if spec.softcap is None else torch.empty_like(self._logits)
        self._piece = VOCAB_PIECE if on_cpu(e) else max(self.vocab, 1)

    def blocks(self) -> Iterator[slice]:
        num_rows = self.e.shape[0]
        for start in range(0, num_rows, self.step):
            yield slice(start, min(start + self.step, num_rows))

    def logits(self, rows: slice) -> tuple[Tensor, Tensor | None]:
        """Float32 logits z of ``rows`` and, under softcap, ``tanh(u / softcap)``.

        Both live in the reused buffers: they are overwritten by the next call.
        """
        z = self._logits[: rows.stop - rows.start]
        softcap = self.spec.softcap
        if self.given_logits is not None:
            z.copy_(self.given_logits[rows])
            if softcap is None:
                return z, None
            return z, torch.div(z, softcap, out=self._tanh[: z.shape[0]])
        z_t, e_t = z.T, self.e[rows].T
        for start in range(0, self.vocab, self._piece):
            piece = slice(start, start + self._piece)
            torch.mm(self.c[piece], e_t, out=z_t[piece])
        u = self._bias_and_scale(z, self.bias)
        if softcap is None:
            return u, None
        tanh_u = self._tanh[: z.shape[0]]
        torch.tanh(u.div_(softcap), out=tanh_u)
        return torch.mul(tanh_u, softcap, out=z), tanh_u

    def logits_at(self, rows: Tensor, columns: Tensor) -> Tensor:
        """Float32 logits ``z[rows[i], columns[i]]``, each by its own dot product."""
        x = (self.e[rows] * self.c[columns]).sum(1)
        u = self._bias_and_scale(x, None if self.bias is None else self.bias[columns])
        softcap = self.spec.softcap
        return u if softcap is None else u.div_(softcap).tanh_().mul_(softcap)

    def _bias_and_scale(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if bias is not None:
            x += bias
        if self.spec.logit_scale != 1.0:
            x *= self.spec.logit_scale
        return x

    def through_softcap_and_scale(self, g: Tensor, tanh_u: Tensor | None) -> Tensor:
        """Turn a gradient with respect to z into one with respect to ``x + bias``,
        in place (``tanh_u`` is consumed)."""
        if tanh_u is not None:
            g.mul_(tanh_u.square_().neg_().add_(1.0))
        if self.spec.logit_scale != 1.0:
            g.mul_(self.spec.logit_scale)
        return g


class _Problem(LogitBlocks):
    """The operands of one loss, with its per-row constants (None without targets)."""

    def __init__(self, e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
                 weight: Tensor | None, spec: LossSpec,
                 given_logits: Tensor | None = None) -> None:
        super().__init__(e, c, bias, spec, given_logits)
        self.weight = None if weight is None else weight.float()
        self.terms = None if targets is None else \
            row_terms(targets, weight, spec, self.vocab)

    def row_slice(self, rows: slice) -> RowTerms:
        """The per-row terms of ``rows``."""
        t = self.terms
        return RowTerms(t.valid[rows], t.targets[rows], t.target_weight[rows],
                        t.weight_total)

    def loss_terms(self, rows: slice, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """The target logit of each row and, under label smoothing, sum_j w_j z_ij."""
        target_logit = z.gather(1, self.terms.targets[rows, None]).squeeze(1)
        if self.spec.label_smoothing == 0:
            return target_logit, None
        return target_logit, z.sum(1) if self.weight is None else z @ self.weight

    def lse_from_softmax(self, rows: slice, p: Tensor, column: Tensor,
                         logit: Tensor) -> Tensor:
        """Each row's lse, from its softmax ``p`` and the logit at ``column``
        (the target, or the argmax).

        ``log p_y = z_y - lse`` gives it without another pass over the block
        while ``p_y`` keeps full precision; other rows use their largest ``p``
        (at least 1/V) and that class's logit, recomputed by a dot product.
        """
        p_target = p.gather(1, column[:, None]).squeeze(1)
        lse = logit - p_target.log()
        trusted = p_target >= _SMALLEST_TRUSTED_P
        if on_cpu(p) and bool(trusted.all()):
            return lse  # the common case, decided without a device sync
        p_max, column = p.max(1)
        row_ids = torch.arange(rows.start, rows.stop, device=p.device)
        return torch.where(trusted, lse, self.logits_at(row_ids, column) - p_max.log())

    def grad_logits(self, rows: slice, p: Tensor, tanh_u: Tensor | None,
                    grad_row: Tensor | None, grad_lse: Tensor | None,
                    entropy_term: Tensor | None = None) -> Tensor:
        """Gradient with respect to ``x + bias``, computed in place of the softmax ``p``.

        ``grad_row`` is the upstream gradient of each row's loss, ``grad_lse``
        that of its lse; ``entropy_term`` is the entropy's part, already formed.
        """
        s = self.spec.label_smoothing
        coeff = p.new_zeros(p.shape[0])
        if grad_row is not None:
            terms = self.terms
            a = (1 - s) * terms.target_weight[rows] + s * terms.weight_total / self.vocab
            coeff += grad_row * a
        if grad_lse is not None:
            coeff += grad_lse.float()
        g = p.mul_(coeff[:, None])
        if entropy_term is not None:
            g += entropy_term
        if grad_row is not None:
            onehot = grad_row * (1 - s) * self.terms.target_weight[rows]
            g.scatter_add_(1, self.terms.targets[rows, None], -onehot[:, None])
            if s > 0:
                w = 1.0 if self.weight is None else self.weight[None, :]
                g -= (grad_row * (s / self.vocab))[:, None] * w
        return self.through_softcap_and_scale(g, tanh_u)


class _Gradients:
    """dE, dC and d(bias), filled block by block; dC and dbias sum in float32."""

    def __init__(self, problem: _Problem, e: Tensor, c: Tensor, bias: Tensor | None,
                 needs: tuple[bool, bool, bool]) -> None:
        self.problem = problem
        self._e, self._c, self._bias = e, c, bias
        self.grad_e = torch.empty_like(e) if needs[0] else None
        self.grad_c = torch.zeros_like(c, dtype=torch.float32) if needs[1] else None
        self.grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32)
            if needs[2] and bias is not None else None
        )

    def add(self, rows: slice, g: Tensor) -> None:
        if self.grad_e is not None:
            if self.grad_e.dtype == torch.float32:
                torch.mm(g, self.problem.c, out=self.grad_e[rows])
            else:
                self.grad_e[rows] = g @ self.problem.c
        if self.grad_c is not None:
            self.grad_c.addmm_(g.T, self.problem.e[rows])
        if self.grad_bias is not None:
            self.grad_bias += g.sum(0)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients in their tensors' dtypes; empty where not asked for."""
        def final(grad: Tensor | None, like: Tensor | None) -> Tensor:
            return self._e.new_empty(0) if grad is None else grad.to(like.dtype)
        return (final(self.grad_e, self._e), final(self.grad_c, self._c),
                final(self.grad_bias, self._bias))


def _argmax(z: Tensor, dtype: torch.dtype) -> Tensor:
    """The first largest entry of each row, after rounding to ``dtype``."""
    return z.argmax(1) if dtype == torch.float32 else z.to(dtype).argmax(1)


def _entropy(p: Tensor) -> Tensor:
    """``-sum p log p`` of each row, a vocabulary piece at a time (small temporaries)."""
    total = p.new_zeros(p.shape[0])
    for piece in _pieces(p.shape[1]):
        total += torch.special.entr(p[:, piece]).sum(1)
    return total


def _pieces(vocab: int) -> Iterator[slice]:
    for start in range(0, vocab, VOCAB_PIECE):
        yield slice(start, min(start + VOCAB_PIECE, vocab))


def forward(e: Tensor, c: Tensor, targets: Tensor | None, bias: Tensor | None,
            weight: Tensor | None, spec: LossSpec,
            precompute: tuple[bool, bool, bool], with_entropy: bool = False,
            argmax_dtype: torch.dtype | None = None, logits: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Float32 loss, float32 per-row lse, entropy and argmax where asked, and,
    where ``precompute`` asks, the gradients for a unit upstream gradient of
    the loss (meaningful for the scalar reductions only).

    ``logits``, when given, are the final (N, V) logits the caller already
    has: they are read instead of recomputed."""
    problem = _Problem(e, c, targets, bias, weight, spec, logits)
    num_rows = e.shape[0]
    lse = e.new_empty(num_rows, dtype=torch.float32)
    row_losses = e.new_empty(num_rows if targets is not None else 0, dtype=torch.float32)
    entropy = e.new_empty(num_rows if with_entropy else 0, dtype=torch.float32)
    argmax = e.new_empty(num_rows if argmax_dtype is not None else 0, dtype=torch.long)
    grads = _Gradients(problem, e, c, bias, precompute) if any(precompute) else None
    unit = e.new_ones((), dtype=torch.float32)
    grad_row = problem.terms.upstream(unit, spec.reduction) if grads else None

    for rows in problem.blocks():
        z, tanh_u = problem.logits(rows)
        if argmax_dtype is not None:
            argmax[rows] = _argmax(z, argmax_dtype)
        if targets is not None:
            column = problem.terms.targets[rows]
            logit, weighted_sum = problem.loss_terms(rows, z)
        else:  # the largest logit anchors the lse: its probability is at least 1/V
            column = argmax[rows] if argmax_dtype == torch.float32 else z.argmax(1)
            logit = z.gather(1, column[:, None]).squeeze(1)
        p = softmax_(z)
        row_lse = lse[rows] = problem.lse_from_softmax(rows, p, column, logit)
        if with_entropy:
            entropy[rows] = _entropy(p)
        if targets is not None:
            row_losses[rows] = row_loss(problem.row_slice(rows), spec, problem.vocab,
                                        row_lse, logit, weighted_sum)
        if grads is not None:
            grads.add(rows, problem.grad_logits(rows, p, tanh_u, grad_row[rows], None))

    loss = row_losses if targets is None else \
        reduce_rows(row_losses, problem.terms, spec.reduction)
    if grads is None:
        grad_e, grad_c, grad_bias = (e.new_empty(0) for _ in range(3))
    else:
        grad_e, grad_c, grad_bias = grads.result()
    return loss, lse, entropy, argmax, grad_e, grad_c, grad_bias


def backward(grad_loss: Tensor | None, grad_lse: Tensor | None, e: Tensor, c: Tensor,
             targets: Tensor | None, bias: Tensor | None, weight: Tensor | None,
             lse: Tensor, spec: LossSpec, needs: tuple[bool, bool, bool],
             grad_entropy: Tensor | None = None, entropy: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the loss (upstream ``grad_loss``), of the returned lse
    (``grad_lse``) and of the entropy (``grad_entropy``) with respect to e, c
    and bias, recomputing logits."""
    problem = _Problem(e, c, targets, bias, weight, spec)
    grads = _Gradients(problem, e, c, bias, needs)
    grad_row = None if targets is None else problem.terms.upstream(grad_loss, spec.reduction)
    for rows in problem.blocks():
        z, tanh_u = problem.logits(rows)
        log_p = z.sub_(lse[rows, None])
        entropy_term = None
        if grad_entropy is not None:  # -p (log p + H) times the upstream gradient
            entropy_term = torch.add(log_p, entropy[rows, None])
            entropy_term.mul_(grad_entropy[rows, None].float().neg())
        p = log_p.exp_()
        if entropy_term is not None:
            entropy_term.mul_(p)
        g = problem.grad_logits(
            rows, p, tanh_u, None if grad_row is None else grad_row[rows],
            None if grad_lse is None else grad_lse[rows], entropy_term,
        )
        grads.add(rows, g)
    return grads.result()
