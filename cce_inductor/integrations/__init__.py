"""Integrations with training frameworks.

``cce_inductor.integrations.huggingface``: ``transformers.Trainer`` and the
trainers built on it (TRL's ``SFTTrainer``, ...).
"""
