"""The Hugging Face model families a backbone can be (``model_type`` of a checkpoint's
config.json): whether each is an encoder-decoder, its LoRA target modules and its input-embedding
attribute. A module of its own so that checking an ``llm_path`` (config.py) does not reach the
backbone code, which RecBole's own models never run."""

FAMILIES = {
    "t5": {"encoder_decoder": True, "lora_targets": ["q", "k", "v", "o"], "embedding": "shared"},
    "qwen2": {
        "encoder_decoder": False,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "embedding": "embed_tokens",
    },
    "llama": {
        "encoder_decoder": False,
        "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "embedding": "embed_tokens",
    },
}


def _family_of(model_type: str, path: str) -> str:
    for family in FAMILIES:
        if model_type == family or model_type.startswith(family):
            return family
    raise ValueError(
        f"llm_path {path!r} holds a '{model_type}' model; supported families are {sorted(FAMILIES)}"
    )
