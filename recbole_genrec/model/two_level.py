"""TwoLevelLLMRec: Efficient Item ID Generation for Large-Scale LLM-based Recommendation (2025).

Items are first-class tokens of a decoder-only LLM (Sec. 3.2): every item ID has one row in its own
embedding table ``E_I`` (``item_embedding_size`` wide, Sec. 5.2, trained from scratch with the LLM),
and a small feed-forward projection head maps it to the LLM width. The history is the sequence of
its items' projected embeddings followed by a learnable placeholder for the label (Sec. 6.1.2); the
last layer's output at the placeholder is ``h`` (Sec. 3.3), from which the next item is decoded in a
single step (no multi-token identifiers, no beam search).

Output layer, ``twolevel_softmax``:
- ``two_level`` (Sec. 4.2): items are partitioned into clusters, each with a learnable centroid
  ``c``. ``P(cluster | h)`` is a softmax over ``h . c`` (Eq. 2), ``P(item | cluster, h)`` a softmax
  over ``h . e`` for the items of that cluster only (Eq. 3), and ``P(item | h)`` their product
  (Eq. 4). Training computes the target's cluster softmax and the softmax inside the target's cluster
  (Sec. 4.3.1): ``O(K + |cluster|)`` item vectors per example instead of the whole catalogue.
- ``full`` (Sec. 4.1): one softmax over every item.

Inference, ``twolevel_inference`` (Sec. 4.3.2):
- ``exact``: ``log P(item | h)`` of Eq. 4 for every item;
- ``structure``: the exact top-k by hierarchical pruning: clusters are expanded in order of
  ``P(cluster | h)``, which bounds the probability of each of their items (Eq. 6); the search stops
  when the next cluster's bound cannot beat the k-th best item found. Same top-k as ``exact``.
- ``ann``: faiss maximum inner product search over ``e + c(item)``, dropping the per-cluster
  partition function (the paper's approximation); ``ann_index`` flat (exact MIPS) or hnsw.
``full_sort_predict`` returns ``[B, n_items]``: every score for ``exact``, otherwise ``-inf`` except
the retrieved top ``max(topk)`` items.

Clusters (pre-processing, Sec. 4.2 and Table 5): ``clustering`` = ``kmeans`` on pretrained item
embeddings (``cluster_source: cf``: a RecBole BPR matrix factorisation trained as stage ``cf`` or
loaded from ``cf_model_path``; ``text``: the item text embeddings), ``frequency`` (items with similar
training counts together) or ``random``; about ``sqrt(#items)`` clusters unless ``n_clusters``.

Training paradigm (Sec. 3.4), ``metadata_sampling``: while training, each history item is shown as a
random non-empty subset of {ID, text} and ``id_only_ratio`` of the examples use IDs only; inference
uses IDs only. An item's text (the ``item_text_fields``) enters as the backbone's own tokens (its
first ``twolevel_text_tokens``) when the backbone has a tokenizer (``llm_path``), as in the paper;
the built-in presets have no text vocabulary, so there it enters as one token, the item's sentence
embedding through a linear projection (``twolevel_text_input``: auto | tokens | embedding). Our
choices: the instruction words of the prompt are left out and the label placeholder plays the role
of "id:"; labels are item IDs only (the next item is what RecBole evaluates), so text tokens never
appear in the output softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.data import load_item_texts
from recbole_genrec.decoding.two_level_softmax import TwoLevelSoftmax, faiss_mips_index, faiss_search
from recbole_genrec.llm.backbone import apply_lora, backbone_from_config, transformer_body
from recbole_genrec.model.base import GenerativeRecommender, load_cf_item_embeddings, train_general_cf_model
from recbole_genrec.quantize.kmeans import kmeans
from recbole_genrec.trainer import StagedTrainer

CLUSTERINGS = ("kmeans", "frequency", "random")


class TwoLevelLLMRec(GenerativeRecommender):
    trainer_class = StagedTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.softmax_type = self._option(config, "twolevel_softmax", ("two_level", "full"))
        self.inference = self._option(config, "twolevel_inference", ("exact", "structure", "ann"))
        self.ann_index_type = self._option(config, "ann_index", ("flat", "hnsw"))
        self.clustering = self._option(config, "clustering", CLUSTERINGS)
        self.cluster_source = self._option(config, "cluster_source", ("cf", "text"))
        if self.softmax_type == "full" and self.inference == "structure":
            raise ValueError("twolevel_inference 'structure' needs twolevel_softmax 'two_level' (there is no hierarchy)")
        self.topk = max(config["topk"]) if isinstance(config["topk"], list) else int(config["topk"])
        self.metadata_sampling = bool(config["metadata_sampling"])
        self.id_only_ratio = float(config["id_only_ratio"])
        if not 0.0 <= self.id_only_ratio <= 1.0:
            raise ValueError(f"id_only_ratio must be in [0, 1], got {self.id_only_ratio}")

        backbone = backbone_from_config(config, vocab_size=config["twolevel_vocab_size"] or 8)
        if backbone.is_encoder_decoder:
            raise ValueError("TwoLevelLLMRec decodes from the last position of a decoder-only LLM (Sec. 3.3): "
                             "set llm_preset to qwen2-tiny / llama-tiny or llm_path to a Qwen2 / Llama checkpoint")
        if config["use_lora"]:
            backbone = apply_lora(backbone, config["lora_r"], config["lora_alpha"], config["lora_dropout"])
        self.llm = backbone.model
        d = backbone.hidden_size
        self.item_embedding = nn.Embedding(self.n_items, config["item_embedding_size"], padding_idx=0)  # E_I
        self.item_proj = nn.Sequential(nn.Linear(config["item_embedding_size"], config["item_proj_hidden"]), nn.GELU(),
                                       nn.Linear(config["item_proj_hidden"], d))  # projection head (Sec. 3.2)
        self.placeholder = nn.Parameter(torch.randn(d) * 0.02)  # the label's placeholder (Sec. 6.1.2)

        needs_text = self.metadata_sampling or (self.clustering == "kmeans" and self.cluster_source == "text")
        if needs_text and not config["item_text_fields"]:
            raise ValueError("TwoLevelLLMRec: metadata_sampling (or cluster_source 'text') needs item_text_fields; "
                             "set item_text_fields or metadata_sampling: False")
        self.text_input = self._option(config, "twolevel_text_input", ("auto", "tokens", "embedding"))
        if self.text_input == "auto":
            self.text_input = "tokens" if backbone.tokenizer is not None else "embedding"
        if self.metadata_sampling and self.text_input == "tokens":
            self._register_text_tokens(config, dataset, backbone.tokenizer)
        use_proj = self.metadata_sampling and self.text_input == "embedding"
        needs_emb = use_proj or (self.clustering == "kmeans" and self.cluster_source == "text")
        text_emb = self.item_text_embeddings(config, dataset) if needs_emb else torch.zeros(self.n_items, 1)
        self.register_buffer("item_text_emb", text_emb, persistent=False)
        self.text_proj = nn.Linear(text_emb.shape[1], d) if use_proj else None

        n_real = self.n_items - 1
        n_clusters = int(config["n_clusters"] or max(1, round(math.sqrt(n_real))))
        if not 1 <= n_clusters <= n_real:
            raise ValueError(f"n_clusters must be between 1 and the number of items ({n_real}), got {n_clusters}")
        self.output = TwoLevelSoftmax(self.n_items, n_clusters, d)
        self.stages = ("cf",) if self.clustering == "kmeans" and self.cluster_source == "cf" else ()
        if not self.stages:  # clusters that need nothing trained: computed now, saved with the model
            self.output.set_clusters(self.compute_clusters(self._cluster_input(dataset)))
        self.id_tokens = {f: dataset.field2id_token[f] for f in (config["USER_ID_FIELD"], self.ITEM_ID)}
        self._cache = {}

    def _register_text_tokens(self, config, dataset, tokenizer):
        """The backbone's own tokens of every item text, ``[n_items, twolevel_text_tokens]`` + mask."""
        if tokenizer is None:
            raise ValueError("twolevel_text_input 'tokens' needs a backbone with a tokenizer (llm_path with "
                             "tokenizer files); the built-in presets have none: use 'embedding'")
        texts = load_item_texts(config, dataset)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        enc = tokenizer(texts, max_length=int(config["twolevel_text_tokens"]), truncation=True,
                        padding="max_length", add_special_tokens=False, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        mask[0] = False  # the padding item has no text
        self.register_buffer("item_text_ids", enc["input_ids"], persistent=False)
        self.register_buffer("item_text_mask", mask, persistent=False)

    @staticmethod
    def _option(config, key, choices):
        value = config[key]
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value

    # ----- clusters (pre-processing) --------------------------------------------------------
    def _cluster_input(self, dataset):
        if self.clustering == "frequency":
            return torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items)[1:].float()
        if self.clustering == "kmeans":
            return self.item_text_emb[1:]
        return None

    def compute_clusters(self, x: torch.Tensor | None) -> torch.Tensor:
        """Cluster of every real item ``[n_items - 1]`` from ``x``: item vectors (kmeans), training
        counts (frequency) or nothing (random). Seeded by ``seed``."""
        n, K = self.n_items - 1, self.output.n_clusters
        generator = torch.Generator().manual_seed(int(self.config["seed"]))
        if self.clustering == "kmeans":
            x = x.float().cpu()
            return torch.cdist(x, kmeans(x, K, generator=generator)).argmin(1)
        # equal-size groups along an order: by training count (frequency) or a random permutation
        order = torch.argsort(-x, stable=True) if self.clustering == "frequency" else torch.randperm(n, generator=generator)
        labels = torch.empty(n, dtype=torch.long)
        labels[order] = torch.arange(n) * K // n
        return labels

    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        """Stage ``cf``: item embeddings of a BPR matrix factorisation (or ``cf_model_path``) -> k-means."""
        if self.config["cf_model_path"]:
            emb, source = load_cf_item_embeddings(self.config["cf_model_path"], self.n_items), "cf_model_path"
        else:
            cf, _, _ = train_general_cf_model(
                self.config, self.id_tokens, "BPR", epochs=stage_config["epochs"],
                learning_rate=stage_config["learning_rate"], batch_size=stage_config["batch_size"],
                overrides={"embedding_size": self.config["cf_hidden_size"]}, show_progress=show_progress)
            emb, source = cf.item_embedding.weight.detach(), "BPR trained as stage 'cf'"
        self.output.set_clusters(self.compute_clusters(emb[1:]))
        return {"source": source, **self.output.stats()}

    def stage_state_dict(self, stage):
        return {"cluster_of": self.output.cluster_of.clone()}

    def load_stage_state_dict(self, stage, state):
        self.output.set_clusters(state["cluster_of"][1:])

    def stage_signature(self, stage):
        keys = ("cf_model_path", "cf_hidden_size", "n_clusters", "clustering", "cluster_source")
        return {k: self.config[k] for k in keys} | {"n_items": self.n_items}

    # ----- input (Sec. 3.2, 3.4) ------------------------------------------------------------
    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Projected item embeddings ``e`` (LLM width) of ``items`` (any shape), or of the whole
        catalogue ``[n_items, d]``, cached while the model is in eval mode."""
        if items is not None:
            return self.item_proj(self.item_embedding(items))
        if self.training:
            return self.item_proj(self.item_embedding.weight)
        if "items" not in self._cache:
            self._cache["items"] = self.item_proj(self.item_embedding.weight)
        return self._cache["items"]

    def history_inputs(self, item_seq, item_len):
        """Input embeddings ``[B, S, d]``, attention mask and the placeholder's index per row."""
        items, valid = self.last_items(item_seq, item_len, self.max_seq_length)
        slots, present = self.item_vectors(items), valid
        if self.training and self.metadata_sampling:
            B, H = items.shape
            # each item: ID only (0), text only (1) or both (2); ID-only examples keep 0 everywhere
            choice = torch.randint(0, 3, (B, H), device=items.device)
            id_only = torch.rand(B, device=items.device) < self.id_only_ratio
            choice = choice.masked_fill(id_only.unsqueeze(1), 0)
            if self.text_input == "tokens":  # the item's text in the LLM's own tokens
                text = self.llm.get_input_embeddings()(self.item_text_ids[items])  # [B, H, T, d]
                text_present = self.item_text_mask[items]
            else:  # one token: the projected sentence embedding of the text
                text = self.text_proj(self.item_text_emb[items]).unsqueeze(2)
                text_present = torch.ones_like(items, dtype=torch.bool).unsqueeze(2)
            text_present = text_present & (valid & (choice >= 1)).unsqueeze(2)
            slots = torch.cat([text, slots.unsqueeze(2)], 2).flatten(1, 2)  # text tokens before the ID token
            present = torch.cat([text_present, (valid & (choice != 1)).unsqueeze(2)], 2).flatten(1)
        # left-align the present tokens, then the placeholder right after them
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        slots = slots.gather(1, order.unsqueeze(-1).expand_as(slots))
        n = present.sum(1)
        inputs = torch.cat([slots, slots.new_zeros(len(slots), 1, slots.shape[-1])], 1)
        rows = torch.arange(len(inputs), device=inputs.device)
        inputs = inputs.index_put((rows, n), self.placeholder.expand(len(inputs), -1))
        mask = torch.arange(inputs.shape[1], device=inputs.device).unsqueeze(0) <= n.unsqueeze(1)
        return inputs, mask, n

    def user_state(self, interaction) -> torch.Tensor:
        """``h``: the last layer's output at the label placeholder, ``[B, d]``."""
        inputs, mask, n = self.history_inputs(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        hidden = transformer_body(self.llm)(inputs_embeds=inputs, attention_mask=mask.long(), use_cache=False)
        return hidden.last_hidden_state[torch.arange(len(n), device=n.device), n]

    # ----- output layer (Eq. 1-4) -----------------------------------------------------------
    def calculate_loss(self, interaction):
        h = self.user_state(interaction)
        target = interaction[self.POS_ITEM_ID]
        if self.softmax_type == "full":  # Eq. 1 over the items
            return F.cross_entropy(h @ self.item_vectors()[1:].T, target - 1)
        return self.output.loss(h, target, self.item_vectors)  # Eq. 4, target clusters only

    def log_probs(self, h):
        """``log P(item | h)`` for every item ``[B, n_items]`` (Eq. 4; Eq. 1 for ``full``)."""
        if self.softmax_type == "two_level":
            return self.output.log_probs(h, self.item_vectors())
        scores = h @ self.item_vectors().T
        scores[:, 0] = float("-inf")
        return scores.log_softmax(-1)

    # ----- single-step inference (Sec. 4.3.2) -----------------------------------------------------
    def ann_index(self):
        """faiss index over ``e + c(item)`` (two-level) or ``e`` (full), rows = items 1..N-1."""
        if "ann" not in self._cache:
            with torch.no_grad():
                vectors = self.item_vectors()
                keys = self.output.ann_keys(vectors) if self.softmax_type == "two_level" else vectors
            self._cache["ann"] = faiss_mips_index(keys[1:], self.ann_index_type)
        return self._cache["ann"]

    @torch.no_grad()
    def ann_topk(self, h, k: int):
        """Top-``k`` items by faiss MIPS with the user state ``h``: items ``[B, k]`` and scores."""
        return faiss_search(self.ann_index(), h, k, offset=1)

    def full_sort_predict(self, interaction):
        h = self.user_state(interaction)
        if self.inference == "exact":
            return self.log_probs(h)
        k = min(self.topk, self.n_items - 1)
        if self.inference == "structure":
            items, values, _ = self.output.structure_topk(h, self.item_vectors(), k)
        else:
            items, values = self.ann_topk(h, k)
        scores = torch.full((len(h), self.n_items), float("-inf"), device=h.device).scatter(1, items, values)
        scores[:, 0] = float("-inf")
        return scores

    def predict(self, interaction):
        return self.log_probs(self.user_state(interaction)).gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    # ----- caches -------------------------------------------------------------------------
    def train(self, mode=True):
        self._cache = {}
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._cache = {}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
