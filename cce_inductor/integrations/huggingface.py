"""The rewrite under ``transformers.Trainer`` and the trainers built on it (TRL's).

::

    from transformers import Trainer, TrainingArguments
    from cce_inductor.integrations.huggingface import enable_for_trainer

    args = TrainingArguments(..., torch_compile=True)   # Inductor, the default backend
    trainer = Trainer(model=model, args=args, train_dataset=...)
    enable_for_trainer(trainer)                         # checks, warns, adds CCECallback
    trainer.train()

``TrainingArguments(torch_compile_backend="cce")`` cannot work: the Trainer
hands the backend name to accelerate, which compiles the model and accepts
only the names of its closed ``DynamoBackend`` enum.  The Trainer does compile
with Inductor, though, and the rewrite runs inside Inductor as a pre-grad
pass (``cce_inductor.enable()``).  ``CCECallback`` turns that pass on when
training begins and off again when it ends; the model is compiled lazily, at
its first training step, so its graphs are compiled with the pass on.
``enable_for_trainer`` first checks the settings the pass needs and warns
about each one that keeps the loss out of the compiled forward, with its fix
(``loss_hiders``).
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from .. import backend as _backend
from .. import config

__all__ = ["CCECallback", "enable_for_trainer", "loss_hiders"]


def _pass_is_on() -> bool:
    return any(p is _backend.GRAPH_PASS for p in _backend.get_pre_grad_passes())


class CCECallback(TrainerCallback):
    """A ``TrainerCallback`` that has the rewrite on while the Trainer trains.

    ``on_train_begin`` calls ``cce_inductor.enable()`` and ``on_train_end``
    ``cce_inductor.disable()``; if the pass was already on (``enable()`` or
    ``CCE_INDUCTOR=1``) it is left on.  Only graphs compiled while it is on are
    rewritten: Dynamo reuses code it compiled earlier for the same model class
    with the same backend settings (``torch._dynamo.reset()`` drops it).  The
    Trainer needs ``TrainingArguments(torch_compile=True)`` with the Inductor
    backend; ``enable_for_trainer`` checks that.  Should training raise, the
    pass stays on until ``cce_inductor.disable()``; it changes no result.
    """

    def __init__(self) -> None:
        self.turned_on = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Turn the pass on unless it is on already."""
        if not _pass_is_on():
            _backend.enable()
            self.turned_on = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Turn the pass off if ``on_train_begin`` turned it on."""
        if self.turned_on:
            _backend.disable()
            self.turned_on = False


def loss_hiders(trainer: Any) -> list[str]:
    """What in ``trainer``'s settings keeps the loss from the pass, each with its fix.

    The pass rewrites a loss that the compiled model computes in its forward
    (a Hugging Face causal LM given ``labels``).  It sees nothing when the
    Trainer computes the loss outside the model (label smoothing,
    ``compute_loss_func``), when the model's forward is replaced (TRL's
    ``loss_type="chunked_nll"``, Liger kernels), or when only parts of the
    model are compiled (regional compilation).  An empty list: none of these.
    """
    _check_trainer(trainer)
    args = trainer.args
    found = []
    smoothing = getattr(args, "label_smoothing_factor", 0.0) or 0.0
    if smoothing > 0:
        found.append(
            f"label_smoothing_factor={smoothing}: the Trainer then takes the labels out of "
            "the model's inputs and computes a smoothed loss itself, from the full "
            "logits, outside the compiled model. Set label_smoothing_factor=0, or compute "
            "the smoothed loss in the model's forward (F.cross_entropy(..., "
            "label_smoothing=...) there is rewritten).")
    loss_type = getattr(args, "loss_type", None)
    if loss_type == "chunked_nll":
        found.append(
            "loss_type='chunked_nll' (TRL's SFTTrainer default): TRL replaces the model's "
            "forward with a loop of checkpointed chunks of the head and the loss, which "
            "the pass cannot rewrite. Set loss_type='nll' in SFTConfig: the model then "
            "computes its own loss and the pass removes the logits, without chunking.")
    if getattr(trainer, "compute_loss_func", None) is not None:
        reason = " (TRL sets it for loss_type='dft')" if loss_type == "dft" else ""
        found.append(
            f"compute_loss_func is set{reason}: the Trainer computes the loss with it from "
            "the logits the compiled model returns, outside the compiled region. Leave "
            "it unset, so that the model computes its loss (model.loss_function).")
    if getattr(args, "use_liger_kernel", False):
        found.append(
            "use_liger_kernel=True: Liger patches the model with its own fused loss, so "
            "there is no linear + cross-entropy left to rewrite. Use one or the other.")
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None),
                     "dynamo_plugin", None)
    if getattr(plugin, "use_regional_compilation", False):
        found.append(
            "accelerate's regional compilation (use_regional_compilation=True) compiles "
            "only the repeated blocks; the head and the loss run eagerly. Turn it off to "
            "compile the whole model.")
    return found


def enable_for_trainer(trainer: Any, *, warn: bool = True) -> CCECallback:
    """Rewrite the loss in ``trainer``'s training steps; return the callback it adds.

    ``trainer`` is a ``transformers.Trainer`` (or a subclass, such as TRL's
    trainers) built with ``TrainingArguments(torch_compile=True)`` and the
    Inductor backend (``torch_compile_backend`` left unset or ``"inductor"``).
    Raises ``ValueError`` naming the argument when that is not so.  With
    ``warn``, each entry of ``loss_hiders(trainer)`` is a warning, and so is
    ``config.drop_escaping_logits`` under a TRL trainer (TRL reads the logits
    for its token-accuracy and entropy metrics).  Adding the callback twice
    is harmless: the one already there is returned.
    """
    _check_trainer(trainer)
    args = trainer.args
    if not getattr(args, "torch_compile", False):
        raise ValueError(
            "enable_for_trainer: trainer.args.torch_compile is False, and the rewrite runs "
            "inside torch.compile. Build the trainer with "
            "TrainingArguments(torch_compile=True).")
    backend = getattr(args, "torch_compile_backend", None)
    if backend not in (None, "inductor"):
        raise ValueError(
            f"enable_for_trainer: trainer.args.torch_compile_backend is {backend!r}, but the "
            "rewrite runs as an Inductor pass. Leave torch_compile_backend unset or set it "
            "to 'inductor'.")
    if getattr(args, "torch_compile_mode", None) == "lite":
        raise ValueError(
            "enable_for_trainer: trainer.args.torch_compile_mode is 'lite', which skips "
            "Inductor's pre-grad passes, the rewrite among them. Use another mode.")
    if warn:
        for reason in loss_hiders(trainer):
            warnings.warn(f"cce_inductor will not see this trainer's loss: {reason}",
                          stacklevel=2)
        if config.drop_escaping_logits and type(trainer).__module__.startswith("trl."):
            warnings.warn(
                "cce_inductor.config.drop_escaping_logits is on, but TRL's trainers read "
                "outputs.logits during training (token accuracy, entropy) and would get an "
                "empty tensor. Turn it off.", stacklevel=2)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CCECallback):
            return callback
    callback = CCECallback()
    trainer.add_callback(callback)
    return callback


def _check_trainer(trainer: Any) -> None:
    if not (hasattr(trainer, "args") and hasattr(trainer, "add_callback")
            and hasattr(trainer, "callback_handler")):
        raise TypeError(f"trainer must be a transformers.Trainer, got "
                        f"{type(trainer).__name__}")
