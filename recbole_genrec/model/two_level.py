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
  (Sec. 4.3.1): each member of the batch's target clusters is projected once, not the whole catalogue.
- ``full`` (Sec. 4.1): one softmax over every item (Eq. 1).
With a tokenizer (``llm_path``) the output vocabulary also holds the text tokens (Eq. 1; in Eq. 2 each
is its own cluster, centroid = its LLM embedding, Sec. 4.2). The presets have no text vocabulary:
items only.

Inference, ``twolevel_inference`` (Sec. 4.3.2):
- ``exact``: ``log P(item | h)`` of Eq. 4 for every item;
- ``structure``: the exact top-k by hierarchical pruning: clusters are expanded in order of
  ``P(cluster | h)``, which bounds the probability of each of their items (Eq. 6); the search stops
  when the next cluster's bound cannot beat the k-th best item found. Same top-k as ``exact``.
- ``ann``: faiss maximum inner product search over ``e + c(item)``, dropping the per-cluster
  partition function (the paper's approximation); ``ann_index`` flat (exact MIPS), hnsw (``hnsw_m``,
  ``hnsw_ef_construction``, ``hnsw_ef_search``) or hnsw_sq (the same over 8-bit quantised keys).
- ``ann_rerank`` (ours, for million-item catalogues): the same search returns ``ann_candidates``
  items, which are re-ranked by their exact Eq. 4 log-probability: ``log P(cluster | h)`` (Eq. 2 over
  all clusters, cheap) plus ``log P(item | cluster, h)`` (Eq. 3), whose partition function is computed
  only for the clusters the candidates fall in. Exact whenever the true top-k are among the
  candidates; the search's own scores are not used, so ``hnsw_sq`` costs it nothing. Two-level only: with ``full`` the ANN scores are already the exact logits ``h . e``
  (Eq. 1; HNSW stores the vectors uncompressed), so re-ranking would change nothing: use ``ann``.
``full_sort_predict`` returns ``[B, n_items]``: every score for ``exact``, otherwise ``-inf`` except
the retrieved top ``max(topk)`` items (``structure``, ``ann_rerank``: their log P(item | h); ``ann``:
their inner products).

Clusters (pre-processing, Sec. 4.2 and Table 5): ``clustering`` = ``kmeans`` on pretrained item
embeddings (``cluster_source: cf``: a RecBole BPR matrix factorisation trained as stage ``cf`` or
loaded from ``cf_model_path``; ``text``: the item text embeddings), ``frequency`` (items with similar
training counts together) or ``random``; about ``sqrt(#items)`` clusters unless ``n_clusters``.

Training paradigm (Sec. 3.4), ``metadata_sampling``: while training, each history item, and with a
tokenizer the label too, is shown as a random non-empty subset of {ID, text}; ``id_only_ratio`` of the
examples use IDs only for input and label. An item's text (the ``item_text_fields``) enters as the
backbone's own tokens (its first ``twolevel_text_tokens``) when the backbone has a tokenizer
(``llm_path``), as in the paper; the presets have no text vocabulary, so there it enters as one token,
the item's sentence embedding through a linear projection (``twolevel_text_input``: auto | tokens |
embedding), and labels are item IDs only. A sampled label is decoded ID first, then its text tokens
(the "id: .. title: .." order of Sec. 3.1), teacher-forced after the placeholder. Inference is ID-only:
ID inputs, one step, items ranked by ``P(item | h, an item)`` (text clusters left out of Eq. 2; same
ranking as Eq. 4). Our choices: the instruction words of the prompt are left out and the label
placeholder plays the role of "id:".
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
        self.softmax_type = self.option(config, "twolevel_softmax", ("two_level", "full"))
        self.inference = self.option(config, "twolevel_inference", ("exact", "structure", "ann", "ann_rerank"))
        self.ann_index_type = self.option(config, "ann_index", ("flat", "hnsw", "hnsw_sq"))
        self.hnsw_m = int(config["hnsw_m"] or 32)
        ef_construction, ef_search = config["hnsw_ef_construction"], config["hnsw_ef_search"]
        self.hnsw_ef_construction = None if ef_construction is None else int(ef_construction)
        self.hnsw_ef_search = None if ef_search is None else int(ef_search)
        self.clustering = self.option(config, "clustering", CLUSTERINGS)
        self.cluster_source = self.option(config, "cluster_source", ("cf", "text"))
        if self.softmax_type == "full" and self.inference == "structure":
            raise ValueError("twolevel_inference 'structure' needs twolevel_softmax 'two_level' (there is no hierarchy)")
        if self.softmax_type == "full" and self.inference == "ann_rerank":
            raise ValueError("twolevel_inference 'ann_rerank' needs twolevel_softmax 'two_level': with 'full' the "
                             "ANN scores are already the exact logits (Eq. 1), use twolevel_inference 'ann'")
        self.topk = max(config["topk"]) if isinstance(config["topk"], list) else int(config["topk"])
        self.ann_candidates = config["ann_candidates"]
        if not isinstance(self.ann_candidates, int) or self.ann_candidates < self.topk:
            raise ValueError(f"ann_candidates (the ANN candidates re-ranked by ann_rerank) must be an integer "
                             f">= the largest topk ({self.topk}), got {self.ann_candidates!r}")
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
        # text tokens in the output vocabulary (Sec. 4.2); none for the presets
        tokenizer = backbone.tokenizer
        self.n_text = 0 if tokenizer is None else min(len(tokenizer), self.llm.get_input_embeddings().num_embeddings)
        self.placeholder = nn.Parameter(torch.randn(d) * 0.02)  # the label's placeholder (Sec. 6.1.2)

        needs_text = self.metadata_sampling or (self.clustering == "kmeans" and self.cluster_source == "text")
        if needs_text and not config["item_text_fields"]:
            raise ValueError("TwoLevelLLMRec: metadata_sampling (or cluster_source 'text') needs item_text_fields; "
                             "set item_text_fields or metadata_sampling: False")
        self.text_input = self.option(config, "twolevel_text_input", ("auto", "tokens", "embedding"))
        if self.text_input == "auto":
            self.text_input = "tokens" if backbone.tokenizer is not None else "embedding"
        if self.metadata_sampling and (self.text_input == "tokens" or self.n_text):
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
        self._build_output(config["item_embedding_size"], config["item_proj_hidden"], d, n_clusters)
        self.stages = ("cf",) if self.clustering == "kmeans" and self.cluster_source == "cf" else ()
        if not self.stages:  # clusters that need nothing trained: computed now, saved with the model
            self.output.set_clusters(self.compute_clusters(self._cluster_input(dataset)))
        self.id_tokens = {f: dataset.field2id_token[f] for f in (config["USER_ID_FIELD"], self.ITEM_ID)}
        self._cache = {}

    def _build_output(self, item_size, proj_hidden, d, n_clusters):
        """``E_I``, its projection head (Sec. 3.2) and the two-level output layer (Sec. 4.2)."""
        self.item_embedding = nn.Embedding(self.n_items, item_size, padding_idx=0)
        self.item_proj = nn.Sequential(nn.Linear(item_size, proj_hidden), nn.GELU(), nn.Linear(proj_hidden, d))
        self.output = TwoLevelSoftmax(self.n_items, n_clusters, d, n_text=self.n_text)

    @classmethod
    def output_layer(cls, n_items, n_clusters, d, item_size=64, proj_hidden=128, softmax="two_level"):
        """The item side alone (``E_I``, projection, output layer; no LLM, no dataset), for benchmarks:
        :meth:`output_loss`, :meth:`log_probs` and the decoders run the model's own code."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.n_items, self.n_text, self.softmax_type, self.ann_index_type, self._cache = n_items, 0, softmax, "flat", {}
        self.ann_candidates, self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search = 200, 32, None, None
        self._build_output(item_size, proj_hidden, d, n_clusters)
        return self

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
        return {k: self.config[k] for k in keys} | {"n_items": self.n_items} | self.cf_stage_signature()

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

    def _presentation(self, B, H, device):
        """Per history item and (last column) the label: 0 ID, 1 text, 2 both (Sec. 3.4); the
        ``id_only_ratio`` share of rows is ID-only throughout. ``[B, H + 1]``."""
        choice = torch.randint(0, 3, (B, H + 1), device=device)
        id_only = torch.rand(B, device=device) < self.id_only_ratio
        return choice.masked_fill(id_only.unsqueeze(1), 0)

    def text_embeddings(self, token_ids):
        return self.llm.get_input_embeddings()(token_ids)

    def text_centroids(self):
        """The text tokens' cluster centroids: their LLM embeddings (Sec. 4.2); ``None`` for presets."""
        return self.llm.get_input_embeddings().weight[: self.n_text] if self.n_text else None

    def history_inputs(self, item_seq, item_len):
        """Input embeddings ``[B, S, d]``, attention mask and the placeholder's index per row."""
        return self.sequence_inputs(item_seq, item_len)[:3]

    def sequence_inputs(self, item_seq, item_len, target=None):
        """History tokens, the placeholder at ``n``, then (``target`` given, training with a text
        vocabulary) the label's tokens but its last, teacher-forced. Returns inputs ``[B, S, d]``, mask,
        ``n`` and the label ``(tokens [B, L], is_text [B, L], count [B])`` predicted at ``n, n+1, ..``."""
        items, valid = self.last_items(item_seq, item_len, self.max_seq_length)
        B, H = items.shape
        slots, present = self.item_vectors(items), valid
        sampling = self.training and self.metadata_sampling
        choice = self._presentation(B, H, items.device) if sampling else None
        if sampling:
            if self.text_input == "tokens":  # the item's text in the LLM's own tokens
                text = self.text_embeddings(self.item_text_ids[items])  # [B, H, T, d]
                text_present = self.item_text_mask[items]
            else:  # one token: the projected sentence embedding of the text
                text = self.text_proj(self.item_text_emb[items]).unsqueeze(2)
                text_present = torch.ones_like(items, dtype=torch.bool).unsqueeze(2)
            text_present = text_present & (valid & (choice[:, :H] >= 1)).unsqueeze(2)
            slots = torch.cat([text, slots.unsqueeze(2)], 2).flatten(1, 2)  # text tokens before the ID token
            present = torch.cat([text_present, (valid & (choice[:, :H] != 1)).unsqueeze(2)], 2).flatten(1)
        n = present.sum(1)
        parts, keep, label = [slots, self.placeholder.expand(B, 1, -1)], [present, present.new_ones(B, 1)], None
        if target is not None:
            tokens, count = target.unsqueeze(1), torch.ones_like(n)
            is_text = torch.zeros_like(tokens, dtype=torch.bool)
            if sampling and self.n_text:  # the label as ID, text or both (Sec. 3.4), ID first
                text_on = self.item_text_mask[target] & (choice[:, H] >= 1).unsqueeze(1)
                on = torch.cat([((choice[:, H] != 1) | ~text_on.any(1)).unsqueeze(1), text_on], 1)
                order = torch.argsort((~on).to(torch.int8), dim=1, stable=True)
                tokens = torch.cat([tokens, self.item_text_ids[target]], 1).gather(1, order)
                is_text = torch.cat([is_text, torch.ones_like(text_on)], 1).gather(1, order)
                emb = torch.cat([self.item_vectors(target).unsqueeze(1),
                                 self.text_embeddings(self.item_text_ids[target])], 1)
                emb = emb.gather(1, order.unsqueeze(-1).expand_as(emb))
                count = on.sum(1)
                parts.append(emb[:, :-1])  # label token j is the input that predicts token j + 1
                keep.append(torch.arange(emb.shape[1] - 1, device=n.device) < (count - 1).unsqueeze(1))
            label = (tokens, is_text, count)
        slots, present = torch.cat(parts, 1), torch.cat(keep, 1)
        # left-align the present tokens (the placeholder lands at n)
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)
        mask = torch.arange(slots.shape[1], device=n.device).unsqueeze(0) < present.sum(1, keepdim=True)
        inputs = slots.gather(1, order.unsqueeze(-1).expand_as(slots)).masked_fill(~mask.unsqueeze(-1), 0)
        return inputs, mask, n, label

    def _hidden(self, inputs, mask):
        body = transformer_body(self.llm)
        return body(inputs_embeds=inputs, attention_mask=mask.long(), use_cache=False).last_hidden_state

    def user_state(self, interaction) -> torch.Tensor:
        """``h``: the last layer's output at the label placeholder, ``[B, d]``."""
        inputs, mask, n = self.history_inputs(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self._hidden(inputs, mask)[torch.arange(len(n), device=n.device), n]

    def label_states(self, interaction):
        """The training targets: ``h [P, d]`` at each position predicting a label token, the tokens ``[P]``
        and whether each is text. Outside training or without a tokenizer: ``h``, the item, all False."""
        inputs, mask, n, (tokens, is_text, count) = self.sequence_inputs(
            interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.POS_ITEM_ID])
        steps = torch.arange(tokens.shape[1], device=n.device)
        on = steps < count.unsqueeze(1)
        rows = torch.arange(len(n), device=n.device).unsqueeze(1).expand_as(tokens)
        return self._hidden(inputs, mask)[rows[on], (n.unsqueeze(1) + steps)[on]], tokens[on], is_text[on]

    # ----- output layer (Eq. 1-4) -----------------------------------------------------------
    def calculate_loss(self, interaction):
        return self.output_loss(*self.label_states(interaction))

    def output_loss(self, h, target, is_text=None):
        """Mean ``-log P(token | h)`` (Eq. 1 for ``full``; Eq. 4 as the pair (cluster, in-cluster) for
        ``two_level``) over the targets: item ids, or text token ids where ``is_text``."""
        text = self.text_centroids()
        if self.softmax_type == "two_level":
            return self.output.loss(h, target, self.item_vectors, text, is_text)
        scores, index = h @ self.item_vectors()[1:].T, target - 1
        if text is not None:  # Eq. 1 over items and text tokens
            scores = torch.cat([scores, h @ text.T], 1)
            if is_text is not None:
                index = torch.where(is_text, self.n_items - 1 + target, index)
        return F.cross_entropy(scores, index)

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
            self._cache["ann"] = faiss_mips_index(keys[1:], self.ann_index_type, self.hnsw_m, self.hnsw_ef_construction)
        return self._cache["ann"]

    @torch.no_grad()
    def ann_topk(self, h, k: int, ef_search: int | None = None):
        """Top-``k`` items by faiss MIPS with the user state ``h``: items ``[B, k]`` and scores
        (``ef_search``: HNSW search breadth, default ``hnsw_ef_search``)."""
        return faiss_search(self.ann_index(), h, k, offset=1, ef_search=ef_search or self.hnsw_ef_search)

    @torch.no_grad()
    def ann_rerank_topk(self, h, k: int, candidates: int | None = None):
        """``ann_rerank``: the top ``ann_candidates`` items (or ``candidates``) by MIPS over ``e + c(item)``
        (Sec. 4.3.2), re-ranked by their exact ``log P(item | h)`` (Eq. 4; ``log Z`` only of candidates'
        clusters, see ``TwoLevelSoftmax.rerank_topk``). Items ``[B, k]`` and their log-probabilities. An
        HNSW search looks at least as many nodes wide as it retrieves candidates."""
        m = min(candidates or self.ann_candidates, self.n_items - 1)
        if m < k:
            raise ValueError(f"ann_candidates ({self.ann_candidates}) must be >= k ({k})")
        candidates, _ = self.ann_topk(h, m, ef_search=max(self.hnsw_ef_search or 0, m))
        vectors = self.item_vectors()
        if "blocks" not in self._cache:
            self._cache["blocks"] = self.output.cluster_blocks(vectors)
        return self.output.rerank_topk(h, vectors, candidates, k, self._cache["blocks"])

    def retrieve_topk(self, h, k: int):
        """The top-``k`` items ``[B, k]`` and their scores by the single-step ``twolevel_inference``
        (an HNSW search widened to ``k`` nodes when ``k`` is above ``max(topk)``: a narrower one
        returns fewer than ``k`` items)."""
        if self.inference == "structure":
            items, values, _ = self.output.structure_topk(h, self.item_vectors(), k)
            return items, values
        if self.inference == "ann_rerank":
            return self.ann_rerank_topk(h, k, candidates=max(self.ann_candidates, k))
        return self.ann_topk(h, k, ef_search=max(self.hnsw_ef_search or 0, k) if k > self.topk else None)

    def full_sort_predict(self, interaction):
        """``exact``: every item's Eq. 4 log-probability. Otherwise the top ``max(topk)`` items of
        ``retrieve_topk`` (the rest ``-inf``); within ``restricted_decoding`` (a protocol ranking
        part of the catalogue) the top ``max(topk)`` of the allowed items: the search is widened
        (doubling k) until every row holds that many allowed ones, so that it is the same mode's
        ranking of that part, not the few of its whole-catalogue top-k that fall there."""
        h = self.user_state(interaction)
        if self.inference == "exact":
            return self.log_probs(h)
        k = min(self.topk, self.n_items - 1)
        if self.allowed_items is None:
            items, values = self.retrieve_topk(h, k)
        else:
            allowed = self.allowed_items.to(h.device).clone()
            allowed[0] = False
            if not allowed.any():
                return torch.full((len(h), self.n_items), float("-inf"), device=h.device)
            k = min(k, int(allowed.sum()))
            m = k
            while True:
                items, values = self.retrieve_topk(h, m)
                kept = allowed[items]
                if m >= self.n_items - 1 or int(kept.sum(1).min()) >= k:
                    break
                m = min(2 * m, self.n_items - 1)
            values, best = values.masked_fill(~kept, float("-inf")).topk(k, dim=1)
            items = items.gather(1, best)
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
