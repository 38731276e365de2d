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
uses IDs only. Our choices (the paper's prompt is natural-language text for a pretrained LLM): an
item's text (the ``item_text_fields``) enters as one token, its sentence embedding through a linear
projection, so the built-in presets need no text vocabulary; the instruction words of the prompt
are left out and the label placeholder plays the role of "id:"; labels are item IDs only (the next
item is what RecBole evaluates), so text tokens never appear in the output softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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
        d_item = config["item_embedding_size"]
        self.item_embedding = nn.Embedding(self.n_items, d_item, padding_idx=0)  # E_I (Sec. 3.2)
        self.item_proj = nn.Sequential(nn.Linear(d_item, config["item_proj_hidden"]), nn.GELU(),
                                       nn.Linear(config["item_proj_hidden"], d))  # projection head
        self.placeholder = nn.Parameter(torch.randn(d) * 0.02)  # the label's placeholder (Sec. 6.1.2)

        needs_text = self.metadata_sampling or (self.clustering == "kmeans" and self.cluster_source == "text")
        if needs_text and not config["item_text_fields"]:
            raise ValueError("TwoLevelLLMRec: metadata_sampling (or cluster_source 'text') needs item_text_fields; "
                             "set item_text_fields or metadata_sampling: False")
        text_emb = self.item_text_embeddings(config, dataset) if needs_text else torch.zeros(self.n_items, 1)
        self.register_buffer("item_text_emb", text_emb, persistent=False)
        self.text_proj = nn.Linear(text_emb.shape[1], d) if self.metadata_sampling else None

        n_real = self.n_items - 1
        self.n_clusters = int(config["n_clusters"] or max(1, round(math.sqrt(n_real))))
        if not 1 <= self.n_clusters <= n_real:
            raise ValueError(f"n_clusters must be between 1 and the number of items ({n_real}), got {self.n_clusters}")
        self.cluster_emb = nn.Embedding(self.n_clusters, d)  # centroid embeddings (Eq. 2)
        nn.init.normal_(self.cluster_emb.weight, std=0.02)
        self.register_buffer("cluster_of", torch.zeros(self.n_items, dtype=torch.long))
        self.stages = ("cf",) if self.clustering == "kmeans" and self.cluster_source == "cf" else ()
        if not self.stages:  # clusters need nothing trained: computed now, saved with the model
            self.set_clusters(self.compute_clusters(self._cluster_input(dataset)))
        self.id_tokens = {f: dataset.field2id_token[f] for f in (config["USER_ID_FIELD"], self.ITEM_ID)}
        self._cache = {}

    @staticmethod
    def _option(config, key, choices):
        value = config[key]
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value

    # ----- clusters (pre-processing) --------------------------------------------------------
    def _cluster_input(self, dataset):
        if self.clustering == "frequency":
            counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items)
            return counts[1:].float()
        if self.clustering == "kmeans":
            return self.item_text_emb[1:]
        return None

    def compute_clusters(self, x: torch.Tensor | None) -> torch.Tensor:
        """Cluster of every real item ``[n_items - 1]`` from ``x``: item vectors (kmeans), training
        counts (frequency) or nothing (random). Seeded by ``seed``."""
        n, K = self.n_items - 1, self.n_clusters
        generator = torch.Generator().manual_seed(int(self.config["seed"]))
        labels = torch.empty(n, dtype=torch.long)
        if self.clustering == "kmeans":
            x = x.float().cpu()
            labels = torch.cdist(x, kmeans(x, K, generator=generator)).argmin(1)
        else:  # equal-size groups along an order: by count (frequency) or a random permutation
            order = torch.argsort(-x, stable=True) if self.clustering == "frequency" else torch.randperm(n, generator=generator)
            labels[order] = torch.arange(n) * K // n
        return labels

    def set_clusters(self, labels: torch.Tensor) -> None:
        """Store the partition; empty clusters are dropped by renumbering (their centroids unused)."""
        _, compact = torch.unique(labels, return_inverse=True)
        self.cluster_of.zero_()
        self.cluster_of[1:] = compact.to(self.cluster_of.device)
        self._cache = {}

    def cluster_index(self):
        """``members [K, M]`` (item ids, 0 = padding), ``member_mask [K, M]``, ``slot_of [n_items]``
        (an item's column in its cluster's row) and ``used [K]`` (clusters with items)."""
        if "index" not in self._cache:
            c = self.cluster_of[1:]
            K = self.n_clusters
            sizes = torch.bincount(c, minlength=K)
            order = torch.argsort(c, stable=True)
            starts = sizes.cumsum(0) - sizes
            slot = torch.empty_like(c)
            slot[order] = torch.arange(len(c), device=c.device) - starts[c[order]]
            members = torch.zeros(K, int(sizes.max()), dtype=torch.long, device=c.device)
            members[c, slot] = torch.arange(1, self.n_items, device=c.device)
            member_mask = torch.zeros_like(members, dtype=torch.bool)
            member_mask[c, slot] = True
            slot_of = torch.cat([slot.new_zeros(1), slot])
            self._cache["index"] = (members, member_mask, slot_of, sizes > 0)
        return self._cache["index"]

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
        self.set_clusters(self.compute_clusters(emb[1:]))
        return {"source": source, **self.cluster_stats()}

    def cluster_stats(self) -> dict:
        sizes = torch.bincount(self.cluster_of[1:], minlength=self.n_clusters)
        used = sizes[sizes > 0]
        return {"clusters": int(len(used)), "min_size": int(used.min()), "max_size": int(used.max()),
                "mean_size": round(float(used.float().mean()), 1)}

    def stage_state_dict(self, stage):
        return {"cluster_of": self.cluster_of.clone()}

    def load_stage_state_dict(self, stage, state):
        self.cluster_of.copy_(state["cluster_of"])
        self._cache = {}

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
            text = self.text_proj(self.item_text_emb[items])
            slots = torch.stack([text, slots], 2).flatten(1, 2)  # text token before the ID token
            present = torch.stack([valid & (choice >= 1), valid & (choice != 1)], 2).flatten(1)
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
    def cluster_log_probs(self, h):
        """``log P(cluster | h)`` (Eq. 2), ``[B, K]``; clusters without items get ``-inf``."""
        used = self.cluster_index()[3]
        logits = (h @ self.cluster_emb.weight.T).masked_fill(~used, float("-inf"))
        return logits.log_softmax(-1)

    def calculate_loss(self, interaction):
        h = self.user_state(interaction)
        target = interaction[self.POS_ITEM_ID]
        if self.softmax_type == "full":  # Eq. 1 over the items
            logits = h @ self.item_vectors()[1:].T
            return F.cross_entropy(logits, target - 1)
        members, member_mask, slot_of, _ = self.cluster_index()
        cluster = self.cluster_of[target]
        cluster_loss = F.nll_loss(self.cluster_log_probs(h), cluster)  # -log P(c(t) | h)
        own = members[cluster]  # the target cluster's items only (Sec. 4.3.1)
        logits = torch.einsum("bd,bmd->bm", h, self.item_vectors(own)).masked_fill(~member_mask[cluster], float("-inf"))
        item_loss = F.cross_entropy(logits, slot_of[target])  # -log P(t | c(t), h)
        return cluster_loss, item_loss

    def log_probs(self, h):
        """``log P(item | h)`` for every item ``[B, n_items]`` (Eq. 4; Eq. 1 for ``full``)."""
        scores = h @ self.item_vectors().T
        scores[:, 0] = float("-inf")
        if self.softmax_type == "full":
            return scores.log_softmax(-1)
        members, member_mask, _, _ = self.cluster_index()
        within = scores[:, members].masked_fill(~member_mask, float("-inf"))
        log_z = within.logsumexp(-1)  # per-cluster partition function [B, K]
        c = self.cluster_of
        out = self.cluster_log_probs(h)[:, c] + scores - log_z[:, c]
        out[:, 0] = float("-inf")
        return out

    # ----- single-step inference (Sec. 4.3.2) -----------------------------------------------------
    @torch.no_grad()
    def structure_topk(self, h, k: int):
        """Exact top-``k`` by hierarchical pruning (Eq. 6). Returns items ``[B, k]``, their
        ``log P`` and the number of clusters visited per user."""
        members, member_mask, _, _ = self.cluster_index()
        log_pc = self.cluster_log_probs(h)
        order = log_pc.argsort(1, descending=True)
        B = len(h)
        best = torch.full((B, k), float("-inf"), device=h.device)
        best_items = torch.zeros(B, k, dtype=torch.long, device=h.device)
        visited = torch.zeros(B, dtype=torch.long, device=h.device)
        active = torch.ones(B, dtype=torch.bool, device=h.device)
        for rank in range(order.shape[1]):
            cluster = order[:, rank]
            bound = log_pc.gather(1, cluster.unsqueeze(1)).squeeze(1)
            active &= (bound > best[:, -1]) & torch.isfinite(bound)  # no item here can beat the k-th best
            rows = active.nonzero().flatten()
            if len(rows) == 0:
                break
            own, own_mask = members[cluster[rows]], member_mask[cluster[rows]]
            logits = torch.einsum("bd,bmd->bm", h[rows], self.item_vectors()[own]).masked_fill(~own_mask, float("-inf"))
            log_p = (bound[rows].unsqueeze(1) + logits.log_softmax(-1)).masked_fill(~own_mask, float("-inf"))
            values, picked = torch.cat([best[rows], log_p], 1).topk(k, dim=1)
            best[rows] = values
            best_items[rows] = torch.cat([best_items[rows], own], 1).gather(1, picked)
            visited[rows] += 1
        return best_items, best, visited

    def ann_index(self):
        """faiss index over ``e + c(item)`` (two-level) or ``e`` (full), rows = items 1..N-1."""
        if "ann" not in self._cache:
            import faiss

            with torch.no_grad():
                vectors = self.item_vectors()[1:]
                if self.softmax_type == "two_level":
                    vectors = vectors + self.cluster_emb.weight[self.cluster_of[1:]]
            vectors = vectors.detach().float().cpu().contiguous().numpy()
            if self.ann_index_type == "flat":
                index = faiss.IndexFlatIP(vectors.shape[1])
            else:
                index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.add(vectors)
            self._cache["ann"] = index
        return self._cache["ann"]

    @torch.no_grad()
    def ann_topk(self, h, k: int):
        """Top-``k`` items by faiss MIPS with the user state ``h``: items ``[B, k]`` and scores."""
        scores, ids = self.ann_index().search(h.detach().float().cpu().contiguous().numpy(), k)
        ids, scores = torch.from_numpy(ids).to(h.device), torch.from_numpy(scores).to(h.device)
        scores = scores.masked_fill(ids < 0, float("-inf"))  # faiss pads with -1 when it finds fewer
        return (ids + 1).clamp(min=0), scores

    def full_sort_predict(self, interaction):
        h = self.user_state(interaction)
        if self.inference == "exact":
            return self.log_probs(h)
        k = min(self.topk, self.n_items - 1)
        items, values = self.structure_topk(h, k)[:2] if self.inference == "structure" else self.ann_topk(h, k)
        scores = torch.full((len(h), self.n_items), float("-inf"), device=h.device)
        return scores.scatter(1, items, values).index_fill(1, torch.tensor([0], device=h.device), float("-inf"))

    def predict(self, interaction):
        return self.log_probs(self.user_state(interaction)).gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    # ----- caches -------------------------------------------------------------------------
    def train(self, mode=True):
        self._cache.pop("items", None), self._cache.pop("ann", None)
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._cache = {}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
