"""TIGER: Recommender Systems with Generative Retrieval (Rajput et al., NeurIPS 2023).

Stage ``tokenizer``: an RQ-VAE (:mod:`recbole_genrec.quantize.rq_vae`) turns each item's text
embedding into L codes (Sec. 3.1); collisions get a dedup suffix code (Sec. 3.1, "an extra
token"), so every item is a unique tuple of L + 1 codes, each level with its own ``codebook_size``
tokens in the backbone vocabulary.

Stage ``recommender``: a T5 encoder-decoder reads the code tokens of the last
``MAX_ITEM_LIST_LENGTH`` history items (oldest first, then ``</s>``) and is trained with token
cross-entropy to generate the next item's L + 1 codes (Sec. 3.2). Inference is a trie-constrained
beam search (:mod:`recbole_genrec.decoding`) that can only emit existing items;
``full_sort_predict`` returns ``[B, n_items]`` scores that are ``-inf`` except the decoded items,
which carry their sequence log-probabilities. ``exact_scores`` gives every item's
log-likelihood (slow; to check the beam search on small catalogs).

``tiger_user_tokens: N`` (0 = off, the default; the paper uses 2000) prepends the hashed user
token of Sec. 3.2: the raw user id is hashed (md5) into one of N extra vocabulary tokens.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from recbole_genrec.decoding import PrefixTrie, constrained_beam_search, full_scores, item_trie, seq2seq_stepper
from recbole_genrec.llm.backbone import add_new_tokens, apply_lora, backbone_from_config
from recbole_genrec.model.base import GenerativeRecommender
from recbole_genrec.quantize.codes import build_code_table, catalogue_codebook_size, code_tokens
from recbole_genrec.quantize.rq_vae import RQVAE, codebook_stats, train_rq_vae
from recbole_genrec.trainer import StagedTrainer

PAD, EOS = 0, 1


class TIGER(GenerativeRecommender):
    stages = ("tokenizer",)
    trainer_class = StagedTrainer
    collision_handling_default = "suffix"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.levels = config["rq_levels"]
        self.codebook_size = catalogue_codebook_size(config["codebook_size"], self.n_items - 1)
        self.depth = self.levels + 1  # + the dedup suffix level
        self.history = self.max_seq_length
        self.beam_size = config["beam_size"]
        topk = max(config["topk"]) if config["topk"] else 10
        if self.beam_size < topk:
            raise ValueError(f"beam_size ({self.beam_size}) must be >= the largest topk ({topk})")
        self.collision_handling = config["collision_handling"] or self.collision_handling_default
        if self.collision_handling not in ("suffix", "sinkhorn"):
            raise ValueError(f"collision_handling must be 'suffix' or 'sinkhorn', got {self.collision_handling!r}")

        text_emb = self.item_text_embeddings(config, dataset)
        self.register_buffer("item_text_emb", text_emb, persistent=False)
        self.rq_vae = RQVAE(
            text_emb.shape[1], hidden=tuple(config["rq_hidden"]), e_dim=config["rq_e_dim"],
            levels=self.levels, codebook_size=self.codebook_size, beta=config["rq_beta"],
        )
        n_code_tokens = self.depth * self.codebook_size
        self.n_user_tokens = int(config["tiger_user_tokens"] or 0)
        n_new = n_code_tokens + self.n_user_tokens
        backbone = backbone_from_config(config, vocab_size=2 + n_new)
        if not backbone.is_encoder_decoder:
            raise ValueError(f"{type(self).__name__} needs an encoder-decoder (T5) backbone, got {backbone.family}")
        if config["llm_path"] or config["llm_preset"] == "smollm2-135m":
            self.token_offset = add_new_tokens(backbone, n_new)
        else:
            self.token_offset = 2
        self.USER_ID = config["USER_ID_FIELD"]
        self.user_token_offset = self.token_offset + n_code_tokens
        self.register_buffer("user_token", self.hashed_user_tokens(dataset), persistent=False)
        if config["use_lora"]:
            new_ids = range(self.token_offset, self.token_offset + n_new)
            backbone = apply_lora(backbone, config["lora_r"], config["lora_alpha"], config["lora_dropout"], new_ids)
        self.llm = backbone.model
        self.pad_id = self.llm.config.pad_token_id if self.llm.config.pad_token_id is not None else PAD
        self.eos_id = self.llm.config.eos_token_id if self.llm.config.eos_token_id is not None else EOS
        self.register_buffer("item_codes", torch.zeros(self.n_items, self.depth, dtype=torch.long))
        self._trie = None

    def hashed_user_tokens(self, dataset) -> torch.Tensor:
        """``[n_users]`` token id of each user's hash bucket (Sec. 3.2); all -1 when off."""
        raw = dataset.field2id_token[self.USER_ID]
        if not self.n_user_tokens:
            return torch.full((len(raw),), -1, dtype=torch.long)
        buckets = [int(hashlib.md5(str(r).encode()).hexdigest(), 16) % self.n_user_tokens for r in raw]
        return self.user_token_offset + torch.tensor(buckets, dtype=torch.long)

    # ----- tokenizer stage -------------------------------------------------------------
    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        if stage != "tokenizer":
            return super().train_stage(stage, train_data, valid_data, stage_config, show_progress)
        x = self.item_text_emb[1:]
        history = train_rq_vae(
            self.rq_vae, x, epochs=stage_config["epochs"], lr=stage_config["learning_rate"],
            batch_size=stage_config["batch_size"], seed=self.config["seed"], show_progress=show_progress,
            **self.tokenizer_loss_options(),
        )["loss"]
        return {**self.assign_codes(), "final_loss": round(history[-1], 4) if history else None}

    def tokenizer_loss_options(self) -> dict:
        """Extra RQ-VAE losses (none for TIGER; LETTER adds its regularisers)."""
        return {}

    @torch.no_grad()
    def assign_codes(self) -> dict:
        """Quantise every item, resolve collisions, write ``item_codes``; freeze the RQ-VAE."""
        self.rq_vae.eval()
        x = self.item_text_emb[1:]
        codes = self.rq_vae.get_codes(x)
        stats = codebook_stats(codes, self.codebook_size)
        table = self.code_table(x, codes)
        self.item_codes[1:] = code_tokens(table, self.token_offset, self.codebook_size)
        self.item_codes[0] = self.pad_id
        self._trie = None
        for p in self.rq_vae.parameters():
            p.requires_grad_(False)
        return {**stats, "max_suffix": int(table[:, -1].max())}

    def code_table(self, x, codes) -> torch.Tensor:
        """One-to-one code table ``[n, L + 1]`` of the items' nearest-codeword ``codes``: collisions
        resolved by ``collision_handling`` (the dedup suffix; ``sinkhorn``: re-assigned on the last level)."""
        costs = self.rq_vae.last_level_costs(x) if self.collision_handling == "sinkhorn" else None
        return build_code_table(codes, self.collision_handling, last_costs=costs, suffix_size=self.codebook_size)

    def stage_state_dict(self, stage):
        return {"rq_vae": self.rq_vae.state_dict(), "item_codes": self.item_codes.clone()}

    def load_stage_state_dict(self, stage, state):
        self.rq_vae.load_state_dict(state["rq_vae"])
        self.item_codes.copy_(state["item_codes"])
        self._trie = None
        for p in self.rq_vae.parameters():
            p.requires_grad_(False)

    def stage_signature(self, stage):
        keys = ("rq_levels", "codebook_size", "rq_e_dim", "rq_hidden", "rq_beta", "collision_handling",
                "item_text_fields", "text_encoder_path", "llm_path", "llm_preset")
        return {"text": self.tensor_digest(self.item_text_emb), "n_items": self.n_items,
                **{k: self.config[k] for k in keys}}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._trie = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----- recommender -----------------------------------------------------------------
    def encoder_inputs(self, item_seq, item_len, users=None):
        """``input_ids [B, S]`` and ``attention_mask``: [hashed user token,] history code tokens,
        ``</s>``."""
        items, valid = self.last_items(item_seq, item_len, self.history)
        tokens = self.item_codes[items].masked_fill(~valid.unsqueeze(-1), self.pad_id)
        ids = tokens.reshape(len(items), -1)
        if self.n_user_tokens:
            if users is None:
                raise ValueError("tiger_user_tokens needs the user id field in the interaction")
            ids = torch.cat([self.user_token[users].unsqueeze(1), ids], 1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], self.eos_id)], 1)
        mask = ids != self.pad_id
        keep = mask.any(0)  # drop columns that are padding for every row
        return ids[:, keep], mask[:, keep].long()

    def model_inputs(self, interaction):
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        return self.encoder_inputs(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], users)

    def calculate_loss(self, interaction):
        ids, mask = self.model_inputs(interaction)
        labels = self.item_codes[interaction[self.POS_ITEM_ID]].contiguous()
        return self.llm(input_ids=ids, attention_mask=mask, labels=labels).loss

    def _encode(self, interaction):
        ids, mask = self.model_inputs(interaction)
        hidden = self.llm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def _decoder_log_probs(self, hidden, mask, decoder_input_ids):
        """Log-probabilities ``[M, T, V]`` of the tokens after each decoder input position."""
        logits = self.llm(encoder_outputs=(hidden,), attention_mask=mask,
                          decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return F.log_softmax(logits.float(), dim=-1)

    def _shifted(self, target_tokens):
        start = torch.full_like(target_tokens[:, :1], self.llm.config.decoder_start_token_id or 0)
        return torch.cat([start, target_tokens[:, :-1]], 1)

    def level_ranges(self):
        K, o = self.codebook_size, self.token_offset
        return [(o + level * K, o + (level + 1) * K) for level in range(self.depth)]

    @property
    def trie(self) -> PrefixTrie:
        if self._trie is None:  # every item, or the ones a protocol allows (restricted_decoding)
            vocab = self.token_offset + self.depth * self.codebook_size  # above every code token
            self._trie = item_trie(self.item_codes, vocab, self.allowed_items)
        return self._trie

    @torch.no_grad()
    def beam_search(self, interaction, beam_size=None, use_cache=None):
        """Top items by trie-constrained beam search: ``items [B, beam]`` (-1 = none), log-probs.

        ``use_cache`` (default: config ``beam_kv_cache``, True when unset): KV-cached decoder
        steps (encoder once, start token once per user, then one token per beam and step); False
        re-runs the decoder over the whole prefix each step (the reference path)."""
        beam = beam_size or self.beam_size
        hidden, mask = self._encode(interaction)
        B = hidden.shape[0]
        start = self.llm.config.decoder_start_token_id or 0
        if use_cache is None:
            use_cache = self.config["beam_kv_cache"] is not False
        if use_cache:
            step = seq2seq_stepper(self.llm, hidden, mask, start)
            return constrained_beam_search(step, self.trie, B, beam, self.level_ranges(), device=hidden.device,
                                           cached=True)
        hidden = hidden.repeat_interleave(beam, 0)
        mask = mask.repeat_interleave(beam, 0)

        def step(prefix):
            dec = torch.cat([prefix.new_full((prefix.shape[0], 1), start), prefix], 1)
            return self._decoder_log_probs(hidden, mask, dec)[:, -1]

        return constrained_beam_search(step, self.trie, B, beam, self.level_ranges(), device=hidden.device)

    def full_sort_predict(self, interaction):
        return full_scores(*self.beam_search(interaction), self.n_items)

    @torch.no_grad()
    def sequence_log_prob(self, hidden, mask, target_tokens):
        """Sum of token log-probabilities of ``target_tokens [M, D]`` (teacher forcing)."""
        log_probs = self._decoder_log_probs(hidden, mask, self._shifted(target_tokens))
        return log_probs.gather(2, target_tokens.unsqueeze(-1)).squeeze(-1).sum(1)

    def predict(self, interaction):
        hidden, mask = self._encode(interaction)
        return self.sequence_log_prob(hidden, mask, self.item_codes[interaction[self.ITEM_ID]])

    @torch.no_grad()
    def exact_scores(self, interaction, chunk=512):
        """Log-likelihood of every item's code sequence: ``[B, n_items]`` (column 0 is -inf)."""
        hidden, mask = self._encode(interaction)
        B = hidden.shape[0]
        out = torch.full((B, self.n_items), float("-inf"), device=hidden.device)
        for start in range(1, self.n_items, chunk):
            items = torch.arange(start, min(start + chunk, self.n_items), device=hidden.device)
            C = len(items)
            targets = self.item_codes[items].repeat(B, 1)
            scores = self.sequence_log_prob(hidden.repeat_interleave(C, 0), mask.repeat_interleave(C, 0), targets)
            out[:, items] = scores.view(B, C)
        return out
