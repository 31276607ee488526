"""``enable_for_trainer``: the rewrite under a real ``transformers.Trainer``.

A tiny Llama (1 layer, hidden size 32, vocabulary 512, random init, float32,
eager attention) trains for three AdamW steps on the CPU with
``TrainingArguments(torch_compile=True)`` (Inductor), once with
``enable_for_trainer`` and once without; both runs start from the same
weights and see the same batches.  Checked: the compiled code calls the fused
op only in the first run, the pass is off again after ``train()``, and the
per-step losses agree at ``rtol=1e-5, atol=1e-6``: the two runs compile the
same model with the same Inductor, so they differ only where the fused loss
sums the same float32 terms in another order (see tests/test_hf_models.py).
Measured here: at most 9.5e-7 on losses near 7 (one or two ulps), 1.4% of
the bound, over all three steps.  The checks of the settings need no training.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch._inductor.utils import run_and_get_code  # noqa: E402

import cce_inductor  # noqa: E402
from cce_inductor import backend as backend_module  # noqa: E402
from cce_inductor.integrations.huggingface import (  # noqa: E402
    CCECallback,
    enable_for_trainer,
    loss_hiders,
)

VOCAB, BATCH, SEQ, STEPS = 512, 2, 16, 3
RTOL, ATOL = 1e-5, 1e-6
FUSED_OP = "cce.linear_cross_entropy"


def tiny_llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager", bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).float()


def dataset(n: int = BATCH * STEPS) -> list[dict[str, torch.Tensor]]:
    """Random token rows; every third row has a masked prompt."""
    generator = torch.Generator().manual_seed(7)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=generator)
        labels = ids.clone()
        if i % 3 == 0:
            labels[:4] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def training_args(tmp_path: Path, **overrides: Any) -> Any:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=STEPS,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0, torch_compile=True)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def trainer_for(model: Any, args: Any, **kwargs: Any) -> Any:
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(), **kwargs)


def train_recording_losses(trainer: Any) -> tuple[list[float], list[str]]:
    """Train; return each step's loss (full precision) and the compiled code."""
    losses: list[float] = []
    step = trainer.training_step

    def recording_step(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = step(*args, **kwargs)
        losses.append(float(loss))
        return loss

    trainer.training_step = recording_step
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        _, code = run_and_get_code(trainer.train)
    return losses, code


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_trainer_rewrites_and_matches(tmp_path: Path) -> None:
    model = tiny_llama()
    reference_model = copy.deepcopy(model)

    trainer = trainer_for(model, training_args(tmp_path / "cce"))
    with_pass = enable_for_trainer(trainer)
    assert isinstance(with_pass, CCECallback)
    assert enable_for_trainer(trainer) is with_pass  # added once
    assert backend_module.GRAPH_PASS not in backend_module.get_pre_grad_passes()
    losses, code = train_recording_losses(trainer)
    assert any(FUSED_OP in c for c in code), "the fused op is not in the compiled code"
    assert backend_module.GRAPH_PASS not in backend_module.get_pre_grad_passes()

    reference = trainer_for(reference_model, training_args(tmp_path / "plain"))
    reference_losses, reference_code = train_recording_losses(reference)
    assert not any(FUSED_OP in c for c in reference_code)

    assert len(losses) == len(reference_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(reference_losses, dtype=torch.float64),
                               rtol=RTOL, atol=ATOL)


def test_settings_the_pass_needs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch_compile is False"):
        enable_for_trainer(trainer_for(tiny_llama(), training_args(tmp_path,
                                                                   torch_compile=False)))
    with pytest.raises(ValueError, match="torch_compile_backend is 'aot_eager'"):
        enable_for_trainer(trainer_for(tiny_llama(), training_args(
            tmp_path, torch_compile_backend="aot_eager")))
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        enable_for_trainer(object())


def test_warns_about_what_hides_the_loss(tmp_path: Path) -> None:
    plain = trainer_for(tiny_llama(), training_args(tmp_path))
    assert loss_hiders(plain) == []

    smoothed = trainer_for(tiny_llama(), training_args(tmp_path, label_smoothing_factor=0.1))
    with pytest.warns(UserWarning, match="label_smoothing_factor=0.1"):
        enable_for_trainer(smoothed)

    custom = trainer_for(tiny_llama(), training_args(tmp_path),
                         compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0)
    with pytest.warns(UserWarning, match="compute_loss_func is set"):
        enable_for_trainer(custom)


@dataclasses.dataclass
class ChunkedArguments(transformers.TrainingArguments):
    """Stands in for TRL's ``SFTConfig``, whose ``loss_type`` defaults to chunked_nll."""

    loss_type: str = "chunked_nll"


def test_trl_chunked_loss_is_named_with_its_fix(tmp_path: Path) -> None:
    args = ChunkedArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                            torch_compile=True)
    trainer = trainer_for(tiny_llama(), args)
    with pytest.warns(UserWarning, match="loss_type='chunked_nll'.*loss_type='nll'"):
        enable_for_trainer(trainer)


def test_sft_config_default_is_reported(tmp_path: Path) -> None:
    """With TRL installed: its SFT configuration's default loss is named."""
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                         bf16=False)
    assert args.loss_type == "chunked_nll"
    trainer = trainer_for(tiny_llama(), training_args(tmp_path))
    trainer.args = args  # what an SFTTrainer built from these settings carries
    assert any("loss_type='chunked_nll'" in reason for reason in loss_hiders(trainer))


def test_pass_left_on_when_already_enabled(tmp_path: Path) -> None:
    callback = CCECallback()
    cce_inductor.enable()
    try:
        callback.on_train_begin(None, None, None)
        callback.on_train_end(None, None, None)
        assert backend_module.GRAPH_PASS in backend_module.get_pre_grad_passes()
    finally:
        cce_inductor.disable()
