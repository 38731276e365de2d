"""Backbone factory: local Hugging Face checkpoints or small built-in presets."""

from recbole_genrec.llm.backbone import (
    PRESETS,
    Backbone,
    add_new_tokens,
    apply_lora,
    build_backbone,
    load_backbone,
)

__all__ = ["PRESETS", "Backbone", "add_new_tokens", "apply_lora", "build_backbone", "load_backbone"]
