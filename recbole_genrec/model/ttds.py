"""TTDS: twin-tower dynamic semantic IDs, trained jointly with the LLM that encodes them
("Unleash LLMs Potential for Recommendation by Coordinating Twin-Tower Dynamic Semantic Token
Generator"). No public code exists; where the paper is silent the choice is ours and says so.

- **The LLM is its own text encoder** (Sec. 4.2.1, Eq. 6): X = masked mean of the backbone's last
  hidden states (T5: encoder; decoder-only: the stack) over an entity's text, same weights (+ LoRA)
  as the recommender (``ttds_text_source: warmup`` or ``live``, below). Items:
  ``item_text_fields``. Users: ``user_text_fields`` of the ``.user`` file when given, then the
  titles (first ``item_text_fields`` column) of the user's last ``ttds_user_history_titles``
  TRAINING items, newest first, so that a text cut to the encoder's length drops the oldest titles
  (paper: comments/queries/profile, which ml-100k lacks; our choice). A user with no text at all
  (no training interaction and no ``user_text_fields``: under the warm/cold protocol, users who
  arrive after its training period) is told apart by nothing: all such users share one Sid and
  do not fit the user tower (our choice). With
  ``llm_path`` the backbone's tokenizer reads the text; the tiny presets have no vocabulary, so
  text words are hashed (md5) into ``ttds_text_vocab`` extra tokens of the backbone (our choice).
- **X for a backbone that knows no words** (our choice): the paper's LLM is pretrained; the tiny
  presets are randomly initialised, so their X carries almost nothing. On ml-100k the mutual
  information between the first codes of consecutive training items was 0.048 nats from t5-tiny's
  X (0.028 with the same codes shuffled across items), 0.221 (0.011) for TIGER's codes
  (``benchmarks/id_signal.py``). ``ttds_text_source: encoder`` takes X from the packaged text
  encoder instead (TIGER's embeddings of the same texts, fixed; 0.170 nats, shuffled 0.028), and
  L_ID maps the pooled LLM states into X's space with a linear ``x_head``; the hashed words are
  then read only in the instructions. ``auto`` (default): ``encoder`` on a preset without
  pretrained weights, ``warmup`` with ``llm_path``, SmolLM2 or the LSH indexer (both LSH ablations
  hash the backbone's X).
- **Twin towers** (Sec. 4.2.2, Eq. 7, 10, 11): an item and a user tower, each an MLP encoder
  (paper d-2048-1024-512-256, here ``ttds_tower_hidden`` -> ``ttds_code_dim``) and M residual
  codebooks of N codes, nearest code by squared Euclidean distance (:class:`quantize.rq_vae.RQVAE`
  without a decoder, k-means initialised). Sid = (i_1..i_M) + a collision suffix (Sec. 4.2.5).
  Each tower has its own token range.
- **Gradient path** (paper silent; our choice): the input embedding of ID token (level l, code c)
  is ``W_up e^l_c + level_l`` (``ttds_token_embedding: codeword``), so the recommender's loss
  reaches the codebooks; ``free`` gives TIGER-style free rows. With ``ttds_tie_output`` the LM
  head's code-token logits use the same embeddings (h . (W_up e + level)), as the tied backbones
  tie their own input and output rows. In L_ID the entity's own quantised
  vectors enter as ``e + (r - sg[r])``: forward value the codeword, gradient to the codebook AND,
  straight through, to the encoder.
- **DM-VAE** (Sec. 4.2.3, Eq. 12-14), per tower: L_ID = ||f(Sid tokens) - sg[X]||^2 (pooled LLM
  states), L_Token = sum over levels of codebook + commitment terms, L_DM = L_ID + beta L_Token.
  The towers read sg[X] (our choice: X is a target, not a path into the LLM).
- **Tasks** (Sec. 4.2.1, 4.2.4, Eq. 8-9, 15): next item (user Sid + history Sids -> next item's
  Sid) and user prediction (an item's Sid + the Sids of the users who had it before, time order,
  TRAINING interactions only -> the next such user). The paper's comment/query generation is not
  built (ml-100k has neither). L_All = L_LLM + alpha L_DM. Prompts wrap the Sids in an instruction
  (``INSTRUCTIONS``: one template per task in our words, after the paper's examples; the paper
  averages its results over several; the tiny presets read the words hashed, like item texts);
  ``ttds_instruction: False`` leaves the Sids alone. Optimiser: the paper
  uses AdamW at 5e-4 (Sec. 5.1.4); the YAML keeps RecBole's Adam at 2e-3, TIGER's recipe here.
- **Schedule** (Sec. 5.1.4): stage ``warmup`` trains towers + ID embeddings on L_DM with the LLM
  frozen; the recommender stage trains everything. **Dynamic IDs**: every Sid is recomputed from X
  and the current towers after warm-up and at the start of every joint epoch (``TTDSTrainer``); the
  share of changed IDs is logged. Code tables are persistent buffers, so a checkpoint evaluates
  with the table it was trained with.
- **Keeping IDs learnable** (paper silent; our choices, measured in :meth:`TTDS.text_targets` and
  :meth:`TTDS.param_groups`): the paper fine-tunes a pretrained LLaMA through LoRA, whose frozen
  base barely moves X; a randomly initialised preset under full fine-tuning moves it so far that
  nearly every first-level code changed at each refresh. ``ttds_text_source: warmup`` keeps X as the
  warm-up's backbone computed it (``live``: the current backbone, the paper's wording taken
  literally), and ``ttds_tower_learning_rate`` trains the towers slower than the LLM in the joint
  stage, so IDs move by the towers' learning, a few at a time.
- **Decoding**: the trie-constrained beam search over item Sids, T5 or decoder-only (one engine,
  KV-cached steps, :mod:`recbole_genrec.decoding.beam_search`). ``full_sort_predict`` as TIGER's.
- **Ablations** (Table 2): ``ttds_user_tower: False`` (STDS: no user Sids, no user task),
  ``ttds_dynamic: False`` (TTSS: towers and IDs frozen after warm-up), ``alpha: 0`` (TTDS-DM: no
  DM-VAE anywhere, so no warm-up training either: the towers keep their k-means initialisation on X),
  ``ttds_tasks: [next_item]`` (TTDS-HO), ``ttds_levels`` (M), ``ttds_indexer``: ``rq`` |
  ``lsh`` (sign bits of fixed random projections of X; dynamic = TT-DLSH, static = TT-SLSH) |
  ``random`` (TT-SR); the LSH/random indexers have no tower to train (free token rows, no L_DM).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.utils import set_color
from torch import nn

from recbole_genrec.data import TextEncoder, item_text_embeddings, load_item_texts, load_user_texts
from recbole_genrec.decoding import (PrefixTrie, causal_stepper, constrained_beam_search, full_scores,
                                     item_trie, seq2seq_stepper)
from recbole_genrec.llm.backbone import add_new_tokens, apply_lora, backbone_from_config, transformer_body
from recbole_genrec.model.base import GenerativeRecommender
from recbole_genrec.quantize.codes import build_code_table
from recbole_genrec.quantize.rq_vae import RQVAE
from recbole_genrec.trainer import StagedTrainer

PAD, EOS, SEP = 0, 1, 2
TASKS = ("next_item", "user")
TEXT_SOURCES = ("auto", "encoder", "warmup", "live")
# Instruction prompts (Sec. 4.2.1 and 4.2.4 give one example each; the wording here is ours), split
# at the Sid slots: next item = [user_intro] user Sid [history_intro] item Sids; user prediction =
# [item_intro] item Sid [users_intro] user Sids [user_question]. Without a user tower the user slot
# and its intro are left out (``history_intro`` then opens the prompt).
INSTRUCTIONS = {
    "user_intro": "as a sequential recommender, predict the next item for user",
    "history_intro": "given the interaction history:",
    "item_intro": "the item",
    "users_intro": "was chosen by these users in time order:",
    "user_question": "which user will choose it next?",
}


class TTDSTrainer(StagedTrainer):
    """Recomputes every Sid at the start of each joint epoch (dynamic IDs, Sec. 4.2); the towers
    train at their own ``ttds_tower_learning_rate`` in the joint stage."""

    def _build_optimizer(self, **kwargs):
        params = kwargs.pop("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(params=self.model.param_groups(list(params)), **kwargs)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if self.model.dynamic:
            changed = self.model.refresh_ids()
            self.logger.info(set_color("dynamic IDs", "blue") + f" epoch {epoch_idx}: {changed}")
        return super()._train_epoch(train_data, epoch_idx, loss_func, show_progress)


class TTDS(GenerativeRecommender):
    stages = ("warmup",)
    trainer_class = TTDSTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.M, self.N = config["ttds_levels"], config["ttds_codebook_size"]
        self.S = config["ttds_suffix_size"]
        self.history = self.max_seq_length
        self.alpha, self.dm_beta = float(config["alpha"]), float(config["ttds_beta"])
        self.use_user = bool(config["ttds_user_tower"])
        self.dynamic = bool(config["ttds_dynamic"])
        # (a checkpoint from before these options has neither: warmup, with no stored X, reads live X)
        pretrained = bool(config["llm_path"]) or config["llm_preset"] == "smollm2-135m"
        self.text_source = self.option(config, "ttds_text_source", TEXT_SOURCES) if config["ttds_text_source"] \
            else "warmup"
        self.tower_lr = self.optional_float(config, "ttds_tower_learning_rate")
        self.indexer = self.option(config, "ttds_indexer", ("rq", "lsh", "random"))
        if self.text_source == "auto":  # LSH: both ablations hash the backbone's X (TT-DLSH reads it live)
            self.text_source = "warmup" if pretrained or self.indexer == "lsh" else "encoder"
        self.token_embedding = self.option(config, "ttds_token_embedding", ("codeword", "free"))
        if self.indexer != "rq":
            self.token_embedding = "free"  # no codebook to project
        tasks = list(config["ttds_tasks"] or ["next_item"])
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or "next_item" not in tasks:
            raise ValueError(f"ttds_tasks must contain 'next_item' and only {TASKS}; got {tasks}")
        self.tasks = [t for t in tasks if t != "user" or self.use_user]
        self.beam_size = config["beam_size"]
        topk = max(config["topk"]) if config["topk"] else 10
        if self.beam_size < topk:
            raise ValueError(f"beam_size ({self.beam_size}) must be >= the largest topk ({topk})")
        self.USER_ID = config["USER_ID_FIELD"]
        self.n_users = dataset.user_num

        # ----- vocabulary: [specials][item ID tokens][user ID tokens][hashed text words] -----
        self.n_id = self.M * self.N + self.S  # per tower
        self.text_vocab = int(config["ttds_text_vocab"])
        if self.text_vocab < 1 and not pretrained:
            raise ValueError(f"ttds_text_vocab must be >= 1 with llm_preset {config['llm_preset']!r} (it has no "
                             f"tokenizer: item texts and instructions are hashed into that many tokens); got "
                             f"{self.text_vocab}")
        n_new = 2 * self.n_id
        preset_vocab = 3 + n_new + self.text_vocab
        backbone = backbone_from_config(config, vocab_size=preset_vocab)
        self.tokenizer = backbone.tokenizer
        if pretrained:
            self.item_offset = add_new_tokens(backbone, n_new)
            if self.tokenizer is None:
                self.text_offset = add_new_tokens(backbone, self.text_vocab)
            cfg = backbone.model.config
            self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else PAD
            self.eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else EOS
            self.sep_id = add_new_tokens(backbone, 1)  # its own token: pad may equal eos (SmolLM2)
        else:
            self.item_offset, self.pad_id, self.eos_id, self.sep_id = 3, PAD, EOS, SEP
            self.text_offset = 3 + n_new
        self.user_offset = self.item_offset + self.n_id
        if config["use_lora"]:
            new_ids = list(range(self.item_offset, self.item_offset + n_new))
            if self.sep_id >= self.item_offset:
                new_ids.append(self.sep_id)
            if self.tokenizer is None and self.text_vocab:
                new_ids += list(range(self.text_offset, self.text_offset + self.text_vocab))
            backbone = apply_lora(backbone, config["lora_r"], config["lora_alpha"], config["lora_dropout"], new_ids)
        self.llm = backbone.model
        self.is_encoder_decoder = backbone.is_encoder_decoder
        d = backbone.hidden_size

        # ----- texts (token ids), history-derived data: training interactions only -----
        self.train_items = self.user_training_items(dataset)
        item_texts = load_item_texts(config, dataset)
        user_texts = self.user_texts(config, dataset, self.train_items) if self.use_user else [""]
        self.user_text_strings = user_texts  # kept for inspection (tests, logging)
        # users with no text at all (no training interaction, no user_text_fields; e.g. users who come
        # after the warm/cold protocol's training period): nothing tells them apart, so they share one
        # Sid and take no part in fitting the user tower (our choice; the paper's users all have text)
        self.register_buffer("user_has_text", torch.tensor([bool(t) for t in user_texts]), persistent=False)
        if self.use_user and not bool(self.user_has_text[1:].any()):
            raise ValueError(
                "TTDS: no user has any text for the user tower: user_text_fields is empty and no user has a "
                "training title (ttds_user_history_titles = "
                f"{config['ttds_user_history_titles']}); set user_text_fields (e.g. [age, gender, occupation] "
                "for ml-100k), ttds_user_history_titles > 0, or ttds_user_tower: False")
        max_len = int(config["ttds_text_length"])
        self.register_buffer("item_text_ids", self.tokenize(item_texts, max_len), persistent=False)
        self.register_buffer("user_text_ids", self.tokenize(user_texts, max_len), persistent=False)
        # X of the text encoder (ttds_text_source: encoder), rows 0..n; its width dx is the towers' input
        encoded = None
        if self.text_source == "encoder":
            encoded = {"item": self.encoder_x(config, item_texts)}
            if self.use_user:
                encoded["user"] = self.encoder_x(config, user_texts, width=encoded["item"].shape[1])
        dx = encoded["item"].shape[1] if encoded else d

        # ----- twin towers and ID-token embeddings -----
        tower = dict(hidden=tuple(config["ttds_tower_hidden"]), e_dim=config["ttds_code_dim"], levels=self.M,
                     codebook_size=self.N, beta=config["ttds_commitment"], decoder=False)
        self.item_tower = RQVAE(dx, **tower)
        self.user_tower = RQVAE(dx, **tower) if self.use_user else None
        # f in L_ID (Eq. 12) maps pooled LLM states into X's space: the identity when X is the LLM's own
        self.x_head = nn.Linear(d, dx) if encoded else nn.Identity()
        self.up_proj = nn.ModuleDict({"item": nn.Linear(config["ttds_code_dim"], d),
                                      **({"user": nn.Linear(config["ttds_code_dim"], d)} if self.use_user else {})})
        self.level_emb = nn.Parameter(torch.randn(self.M, d) * 0.02)
        # output side tied to the same codeword embeddings (our choice): a code token's logit is
        # h . (W_up e + level), so a small move of an item's code is a small move of its logits
        self.tie_output = bool(config["ttds_tie_output"]) and self.token_embedding == "codeword"
        if self.tie_output:
            self.llm.get_output_embeddings().register_forward_hook(self._tied_id_logits)
        # LSH: fixed random hyperplanes, log2(N) sign bits per level
        bits = int(math.log2(self.N)) if self.N > 1 else 1
        g = torch.Generator().manual_seed(int(config["seed"]))
        lsh_dim = d if self.dynamic and not encoded else dx  # TT-DLSH reads the backbone's live X (text_targets)
        self.register_buffer("lsh_planes", torch.randn(self.M, bits, lsh_dim, generator=g), persistent=False)

        # ----- history-derived data: training interactions only -----
        indptr, users = self.item_user_sequences(dataset)
        self.register_buffer("item_user_indptr", indptr, persistent=False)
        self.register_buffer("item_user_seq", users, persistent=False)
        self.user_history = int(config["ttds_user_history"])
        self.aux_batch = int(config["ttds_aux_batch"])
        # instruction words around the Sids (Sec. 4.2.1, 4.2.4), token ids [n] per slot
        self.instruction = bool(config["ttds_instruction"])
        for name, text in INSTRUCTIONS.items():
            self.register_buffer(f"instr_{name}", self.text_tokens(text if self.instruction else ""),
                                 persistent=False)

        # ----- X (Eq. 6) as the warm-up's backbone computed it (warmup) or the text encoder's -----
        self.register_buffer("item_x", torch.zeros(self.n_items, dx))
        self.register_buffer("user_x", torch.zeros(self.n_users if self.use_user else 1, dx))
        self.register_buffer("x_ready", torch.zeros((), dtype=torch.bool))
        self._x_ready = False  # mirrors x_ready: no device sync per batch
        if encoded:
            self.keep_text_targets({k: v[1:] for k, v in encoded.items()})

        # ----- code tables: token ids [n, M + 1], saved with every checkpoint -----
        self.register_buffer("item_sid", torch.zeros(self.n_items, self.M + 1, dtype=torch.long))
        self.register_buffer("user_sid", torch.zeros(self.n_users if self.use_user else 1, self.M + 1,
                                                     dtype=torch.long))
        self._trie = None
        self.logger = getLogger()

    # ----- data (training interactions only) --------------------------------------------------
    def user_training_items(self, dataset) -> list[list[int]]:
        """Each user's training items in time order: the longest training history + its target."""
        inter = dataset.inter_feat
        uid, seq, length = inter[dataset.uid_field], inter[self.ITEM_SEQ], inter[self.ITEM_SEQ_LEN]
        target = inter[self.ITEM_ID]
        out = [[] for _ in range(dataset.user_num)]
        best = torch.full((dataset.user_num,), -1, dtype=torch.long)
        best_len = torch.full((dataset.user_num,), -1, dtype=torch.long)
        for row, (u, n) in enumerate(zip(uid.tolist(), length.tolist())):
            if n >= best_len[u]:  # the latest of the longest (capped) histories
                best_len[u], best[u] = n, row
        for u in range(1, dataset.user_num):
            row = int(best[u])
            if row >= 0:
                out[u] = seq[row, : int(length[row])].tolist() + [int(target[row])]
        return out

    def user_texts(self, config, dataset, train_items) -> list[str]:
        """User text: ``user_text_fields`` of the ``.user`` file, then the titles of the last
        ``ttds_user_history_titles`` training items, newest first (never a validation or test
        item). Both text encoders cut a long text at its end (64 sub-words for the packaged one,
        ``ttds_text_length`` words for the hashed one), so the oldest titles are the ones cut."""
        fields = list(config["user_text_fields"] or [])
        profile = load_user_texts(config, dataset, fields) if fields else [""] * dataset.user_num
        title_field = (config["item_text_fields"] or [None])[0]
        titles = load_item_texts(config, dataset, [title_field])
        k = int(config["ttds_user_history_titles"])
        texts = []
        for u in range(dataset.user_num):
            recent = [titles[i].split(": ", 1)[-1] for i in reversed(train_items[u][-k:])] if k else []
            parts = ([profile[u]] if profile[u] else []) + ([f"recent: {', '.join(recent)}"] if recent else [])
            texts.append("; ".join(parts))
        return texts

    def item_user_sequences(self, dataset):
        """CSR (``indptr [n_items + 1]``, ``users``) of the users of each item in time order, over
        every TRAINING interaction: the rows' targets, plus each user's first training item (the
        one item that is never a target: it opens the history of the user's first row)."""
        inter = dataset.inter_feat
        items, users = inter[self.ITEM_ID], inter[dataset.uid_field]
        # each user's first row (history = [first item]): RecBole's augmentation writes a user's rows
        # together and in time order, so it is the row where the user id changes
        first = torch.ones(len(users), dtype=torch.bool)
        first[1:] = users[1:] != users[:-1]
        first &= inter[self.ITEM_SEQ_LEN] == 1
        # each row contributes (its first history item, if it is the user's first row) then its target
        keep = torch.stack([first, torch.ones_like(first)], 1).flatten()
        items = torch.stack([inter[self.ITEM_SEQ][:, 0], items], 1).flatten()[keep]
        users = users.repeat_interleave(2)[keep]
        order = torch.arange(len(items))
        time_field = dataset.time_field
        if time_field and time_field in inter:
            times = inter[time_field].double()
            list_field = time_field + self.config["LIST_SUFFIX"]
            # the first item's own time; without the time list, its row's time (a tie keeps it first)
            first_times = inter[list_field][:, 0].double() if list_field in inter else times
            order = torch.argsort(torch.stack([first_times, times], 1).flatten()[keep], stable=True)
        items, users = items[order], users[order]
        by_item = torch.argsort(items, stable=True)
        counts = torch.bincount(items, minlength=self.n_items)
        indptr = torch.zeros(self.n_items + 1, dtype=torch.long)
        indptr[1:] = counts.cumsum(0)
        return indptr, users[by_item]

    def tokenize(self, texts, max_len) -> torch.Tensor:
        """Token ids ``[n, max_len]`` (pad-filled) of ``texts`` for the backbone's text encoder."""
        if self.tokenizer is not None:
            tok = self.tokenizer
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
            enc = tok([t or " " for t in texts], max_length=max_len, truncation=True, padding="max_length",
                      return_tensors="pt")
            ids = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, self.pad_id)
            return ids
        out = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())[:max_len]
            for j, w in enumerate(words):
                out[i, j] = self.text_offset + int(hashlib.md5(w.encode()).hexdigest(), 16) % self.text_vocab
        return out

    def text_tokens(self, text: str) -> torch.Tensor:
        """Token ids ``[n]`` of one instruction piece, no special tokens (empty text: none)."""
        if not text:
            return torch.zeros(0, dtype=torch.long)
        if self.tokenizer is not None:
            return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        words = re.findall(r"\w+", text.lower())
        return self.tokenize([text], len(words))[0]

    # ----- embeddings and backbone passes -----------------------------------------------------
    def id_token_table(self, kind: str) -> torch.Tensor | None:
        """``[M * N, d]`` input embeddings of a tower's code tokens (``W_up e + level``), or None
        with free rows."""
        if self.token_embedding == "free":
            return None
        tower = self.item_tower if kind == "item" else self.user_tower
        codewords = tower.codebooks.reshape(self.M * self.N, -1)
        return self.up_proj[kind](codewords) + self.level_emb.repeat_interleave(self.N, 0)

    def _tied_id_logits(self, module, inputs, output):
        """Forward hook on the LM head: code-token columns become ``h . id_token_table``."""
        h = inputs[0]
        pieces, start = [], 0
        for kind in ("item", "user") if self.use_user else ("item",):
            lo = self.item_offset if kind == "item" else self.user_offset
            pieces += [output[..., start:lo], h @ self.id_token_table(kind).to(h.dtype).T]
            start = lo + self.M * self.N
        return torch.cat(pieces + [output[..., start:]], -1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, code tokens through :meth:`id_token_table`."""
        emb = self.llm.get_input_embeddings()(ids)
        kinds = ("item", "user") if self.use_user else ("item",)
        for kind in kinds:
            table = self.id_token_table(kind)
            if table is None:
                continue
            lo = self.item_offset if kind == "item" else self.user_offset
            inside = (ids >= lo) & (ids < lo + self.M * self.N)
            rows = table[(ids - lo).clamp(0, self.M * self.N - 1)]
            emb = torch.where(inside.unsqueeze(-1), rows.to(emb.dtype), emb)
        return emb

    def hidden_states(self, embeds, mask):
        """Last hidden states ``[B, S, d]`` of the text/ID encoder (T5 encoder or decoder stack)."""
        if self.is_encoder_decoder:
            return self.llm.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        return transformer_body(self.llm)(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                          use_cache=False).last_hidden_state

    @staticmethod
    def pool(states, mask):
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1.0)

    def text_repr(self, text_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Eq. 6: X = masked-mean pooled last hidden state over the text (no gradient: a target)."""
        out, was_training = [], self.llm.training
        self.llm.eval()  # X is a target: no dropout noise
        with torch.no_grad():
            for start in range(0, len(text_ids), batch_size):
                ids = text_ids[start:start + batch_size]
                mask = (ids != self.pad_id).long()
                mask[:, 0] = 1  # an empty text still has one (pad) position
                out.append(self.pool(self.hidden_states(self.embed(ids), mask), mask))
        self.llm.train(was_training)
        return torch.cat(out).float()

    @staticmethod
    def encoder_x(config, texts, width: int | None = None) -> torch.Tensor:
        """X from the text encoder (``ttds_text_source: encoder``): ``[len(texts), dx]`` sentence
        embeddings (cached on disk, as TIGER's), scaled from unit norm to unit mean square per
        dimension, the scale of a T5 / RMS-normed LLM state, so L_ID weighs as it would on the LLM's
        own X. Empty texts get a zero row (all empty: ``width`` zeros each)."""
        encoder = TextEncoder(config["text_encoder_path"], max_length=config["text_encoder_max_length"],
                              batch_size=config["text_encoder_batch_size"])
        emb = item_text_embeddings(texts, os.path.join(config["checkpoint_dir"], "text_emb"), encoder,
                                   show_progress=config["show_progress"])
        if emb.shape[1] == 0:
            return torch.zeros(len(texts), width or 0)
        return torch.from_numpy(emb).float() * math.sqrt(emb.shape[1])

    @staticmethod
    def optional_float(config, key) -> float | None:
        """``config[key]`` as a float; ``None`` for ``~`` / ``none`` / ``null`` (YAML or the CLI)."""
        value = config[key]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("~", "none", "null", "")):
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number or ~ (unset), got {value!r}") from None

    def text_targets(self, kind: str, index: torch.Tensor | None = None) -> torch.Tensor:
        """X (Eq. 6) of the entities ``index`` (default: all, row 0 excluded) of one tower.

        ``ttds_text_source: warmup`` (``auto`` with a pretrained backbone; our choice): X as the
        backbone computed it at the end of the warm-up, kept in ``item_x`` / ``user_x``, the analogue
        of the paper's frozen LLaMA base under LoRA (Sec. 5.1.4). ``live``: the current backbone.
        Measured on ml-100k (t5-tiny, full fine-tuning, Adam 2e-3): after 150 joint steps live X had
        moved by 1.76x its own norm and 99.5% of the items' first codes changed with the towers
        untouched, so every epoch's refresh handed the recommender new IDs. Dynamic LSH (TT-DLSH)
        reads the backbone's live X: its hyperplanes are fixed, so X is all that can move its IDs.
        ``encoder``: the text encoder's X, stored in ``__init__`` and never moved."""
        if self.text_source != "encoder" and (self.text_source == "live" or (self.indexer == "lsh" and self.dynamic)
                                              or not self._x_ready):
            text_ids = self.item_text_ids if kind == "item" else self.user_text_ids
            return self.text_repr(text_ids[1:] if index is None else text_ids[index])
        x = self.item_x if kind == "item" else self.user_x
        return x[1:] if index is None else x[index]

    def keep_text_targets(self, x: dict) -> None:
        """Store the warm-up's X of each tower (``x[kind]``: rows 1..n) in the ``*_x`` buffers."""
        for kind, value in x.items():
            buffer = self.item_x if kind == "item" else self.user_x
            buffer[1:] = value.to(buffer.dtype)
        self.x_ready.fill_(True)
        self._x_ready = True

    def param_groups(self, params: list) -> list:
        """Optimiser groups of the joint stage: the towers (encoders, codebooks) at
        ``ttds_tower_learning_rate`` when it is set, everything else at the run's learning rate.
        Our choice, paper silent: Adam moves a parameter about one learning rate a step whatever
        its loss weight, so ``alpha`` alone cannot slow the towers; on ml-100k, 150 steps on a fixed X
        changed 82% of the items' first codes at the run's 2e-3 and 12% at the default 2e-5."""
        if self.tower_lr is None:
            return params
        tower = {id(p) for k in ("item", "user") if self.tower(k) is not None for p in self.tower(k).parameters()}
        groups = [{"params": [p for p in params if id(p) not in tower]},
                  {"params": [p for p in params if id(p) in tower], "lr": self.tower_lr}]
        return [g for g in groups if g["params"]]

    # ----- towers, DM-VAE (Eq. 10-14) ---------------------------------------------------------
    def tower(self, kind):
        return self.item_tower if kind == "item" else self.user_tower

    def with_text(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` (rows 1..n of one tower) of the entities that have text: every item; the
        users with text (``user_has_text``). Only they fit a tower (k-means, standardisation)."""
        return x if kind == "item" else x[self.user_has_text[1:].to(x.device)]

    def code_table(self, kind: str, codes: torch.Tensor) -> torch.Tensor:
        """One-to-one table ``[n, M + 1]`` (collision suffix, Sec. 4.2.5) of one tower's codes; the
        users without text are one entity, so they share one Sid (that of the first of them)."""
        keep = torch.ones(len(codes), dtype=torch.bool, device=codes.device)
        if kind == "user":
            keep = self.user_has_text[1:].to(codes.device).clone()
            empty = torch.nonzero(~keep).flatten()
            if len(empty):
                keep[empty[0]] = True
        try:
            table = build_code_table(codes[keep], "suffix", suffix_size=self.S)
        except ValueError as err:
            raise ValueError(f"TTDS {kind} IDs: {err} (here ttds_codebook_size or ttds_suffix_size)") from None
        if bool(keep.all()):
            return table
        full = torch.empty(len(codes), table.shape[1], dtype=table.dtype, device=table.device)
        full[keep] = table
        full[~keep] = table[int(keep[: int(empty[0])].sum())]  # the first user without text's row
        return full

    def dm_loss(self, kind: str, x: torch.Tensor) -> dict:
        """L_ID, L_Token and L_DM (Eq. 12-14) of entities with text representations ``x [n, d]``."""
        x = x.detach()
        tower = self.tower(kind)
        z = tower.encode(x)
        _, codes, residuals, token_loss, codewords = tower.quantize(z, return_codewords=True)
        st = codewords + (residuals - residuals.detach())  # value e, gradient to codebook and encoder
        emb = self.up_proj[kind](st.transpose(0, 1)) + self.level_emb  # [n, M, d]
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        sid_repr = self.pool(self.hidden_states(emb, mask), mask)  # f(Sid tokens)
        id_loss = F.mse_loss(self.x_head(sid_repr).float(), x)
        return {"id": id_loss, "token": token_loss, "dm": id_loss + self.dm_beta * token_loss}

    @torch.no_grad()
    def compute_codes(self, kind: str, x: torch.Tensor, static_source=None) -> torch.Tensor:
        """Codes ``[n, M]`` of entities from their text representations, by the chosen indexer."""
        if self.indexer == "rq":
            return self.tower(kind).get_codes(x)
        if self.indexer == "lsh":
            proj = torch.einsum("nd,lbd->nlb", x - self.with_text(kind, x).mean(0), self.lsh_planes.to(x.device))
            weights = 2 ** torch.arange(proj.shape[-1], device=x.device)
            return ((proj > 0).long() * weights).sum(-1) % self.N
        g = torch.Generator().manual_seed(int(self.config["seed"]) + (0 if kind == "item" else 1))
        return torch.randint(0, self.N, (len(x), self.M), generator=g).to(x.device)

    @torch.no_grad()
    def follow_representations(self, kind: str, x: torch.Tensor) -> int:
        """Keep a tower usable while the LLM (hence X) moves (our choice, paper silent): its input
        standardisation is re-fitted to the current X (without it X's drift under joint training
        collapsed the codes: collision rate 0.52 -> 0.81 in one tiny-set epoch, vs 0.52 -> 0.63)
        and codes no entity uses are re-seeded on current residuals (as TIGER's RQ-VAE does
        between epochs). Returns the re-seeded count."""
        tower = self.tower(kind)
        x = self.with_text(kind, x)
        tower.x_mean.copy_(x.mean(0))
        tower.x_std.copy_(x.std(0).clamp(min=1e-6))
        _, codes, residuals, _ = tower.quantize(tower.encode(x))
        g = torch.Generator().manual_seed(int(self.config["seed"]))
        return tower.reseed_dead_codes(residuals, codes, generator=g)

    def sid_tokens(self, kind: str, table: torch.Tensor) -> torch.Tensor:
        """Token ids of a one-to-one code table ``[n, M + 1]`` (last column: suffix)."""
        lo = self.item_offset if kind == "item" else self.user_offset
        levels = torch.arange(self.M, device=table.device) * self.N
        codes = lo + levels + table[:, : self.M]
        suffix = lo + self.M * self.N + table[:, self.M:]
        return torch.cat([codes, suffix], 1)

    @torch.no_grad()
    def refresh_ids(self, follow: bool | None = None) -> dict:
        """Recompute every Sid from X (:meth:`text_targets`) and the current towers (eval mode),
        resolve collisions, rebuild the trie; return the collision rate and the share of changed
        IDs per tower. ``follow`` (default: with ``ttds_text_source: live``) first re-fits the
        towers to the current X (:meth:`follow_representations`); the warm-up's refresh always
        does, so with a fixed X a refresh without training in between changes nothing."""
        was_training = self.training
        self.eval()
        stats = {}
        kinds = ("item", "user") if self.use_user else ("item",)
        if follow is None:
            follow = self.text_source == "live"
        for kind in kinds:
            x = self.text_targets(kind)
            if self.indexer == "rq" and self.dynamic and follow:
                stats[f"{kind}_reseeded"] = self.follow_representations(kind, x)
            codes = self.compute_codes(kind, x)
            target = self.item_sid if kind == "item" else self.user_sid
            old = target[1:].clone()
            try:
                table = self.code_table(kind, codes)
            except ValueError as err:
                if not bool((old > 0).all()):  # no earlier table to keep: a clear error
                    raise
                self.logger.warning(f"TTDS {kind} IDs not refreshed, the previous table is kept: {err}")
                stats[f"{kind}_changed"] = 0.0
                continue
            tokens = self.sid_tokens(kind, table)
            distinct = torch.unique(table[:, : self.M], dim=0)  # over the entities with text (+ one without)
            stats[f"{kind}_collision_rate"] = round(1.0 - len(distinct) / len(torch.unique(table, dim=0)), 4)
            stats[f"{kind}_changed"] = round(float((old != tokens).any(1).float().mean()), 4)
            stats[f"{kind}_changed@0"] = round(float((old[:, 0] != tokens[:, 0]).float().mean()), 4)  # first level
            target[1:] = tokens
            target[0] = self.pad_id
        self._trie = None
        self.train(was_training)
        return stats

    # ----- warm-up stage (Sec. 5.1.4) ---------------------------------------------------------
    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        if stage != "warmup":
            return super().train_stage(stage, train_data, valid_data, stage_config, show_progress)
        kinds = ("item", "user") if self.use_user else ("item",)
        llm_params = [p for p in self.llm.parameters()]
        frozen = [p.requires_grad for p in llm_params]
        for p in llm_params:  # Sec. 5.1.4: the LLM is frozen during warm-up
            p.requires_grad_(False)
        history = []
        try:
            if self.text_source == "encoder":  # fixed since __init__
                x = {k: (self.item_x if k == "item" else self.user_x)[1:] for k in kinds}
            else:
                x = {k: self.text_repr(self.item_text_ids[1:] if k == "item" else self.user_text_ids[1:]) for k in kinds}
                self.keep_text_targets(x)
            x = {k: self.with_text(k, x[k]) for k in kinds}  # the towers fit the entities with text
            if self.indexer == "rq":
                g = torch.Generator().manual_seed(int(self.config["seed"]))
                for k in kinds:
                    self.tower(k).init_codebooks(x[k], generator=g)
            if self.indexer == "rq" and self.alpha > 0:  # TTDS-DM (alpha 0): no DM-VAE, k-means towers
                params = [p for k in kinds for p in list(self.tower(k).parameters()) + list(self.up_proj[k].parameters())]
                params += [self.level_emb, *self.x_head.parameters()]
                optimizer = torch.optim.AdamW(params, lr=stage_config["learning_rate"])
                gen = torch.Generator().manual_seed(int(self.config["seed"]) + 7)
                epochs = range(stage_config["epochs"])
                if show_progress:
                    from tqdm import tqdm

                    epochs = tqdm(epochs, desc="TTDS warm-up")
                for epoch in epochs:
                    self.train()
                    self.llm.eval()  # frozen: the same network that computed X, no dropout
                    totals = {f"{k}_{part}": 0.0 for k in kinds for part in ("dm", "id", "token")}
                    for k in kinds:
                        order = torch.randperm(len(x[k]), generator=gen)
                        for start in range(0, len(order), stage_config["batch_size"]):
                            idx = order[start:start + stage_config["batch_size"]].to(x[k].device)
                            parts = self.dm_loss(k, x[k][idx])
                            if not torch.isfinite(parts["dm"]):
                                raise FloatingPointError(
                                    f"TTDS: L_DM became {float(parts['dm'])} at warm-up epoch {epoch + 1} ({k} "
                                    f"tower); try a lower warmup_learning_rate (now {stage_config['learning_rate']})")
                            optimizer.zero_grad()
                            parts["dm"].backward()
                            optimizer.step()
                            for part, value in parts.items():
                                totals[f"{k}_{part}"] += float(value.detach()) * len(idx) / len(x[k])
                    history.append({key: round(v, 5) for key, v in totals.items()})
                    self.logger.info(f"TTDS warm-up epoch {epoch + 1}: L_DM {history[-1]}")
        finally:
            for p, flag in zip(llm_params, frozen):
                p.requires_grad_(flag)
        stats = self.refresh_ids(follow=True)
        if not self.dynamic:  # TTSS: towers and IDs frozen from here on
            for k in kinds:
                for p in self.tower(k).parameters():
                    p.requires_grad_(False)
        first, last = (history[0], history[-1]) if history else ({}, {})
        return {**stats, "L_DM_first": {k: first.get(f"{k}_dm") for k in kinds},
                "L_DM_last": {k: last.get(f"{k}_dm") for k in kinds}, "warmup_first": first, "warmup_last": last}

    def stage_state_dict(self, stage):
        return {"towers": {k: v for k, v in self.state_dict().items()
                           if k.startswith(("item_tower", "user_tower", "up_proj", "level_emb", "x_head", "item_x",
                                            "user_x", "x_ready"))},
                "item_sid": self.item_sid.clone(), "user_sid": self.user_sid.clone()}

    def load_stage_state_dict(self, stage, state):
        self.load_state_dict(state["towers"], strict=False)
        self.item_sid.copy_(state["item_sid"])
        self.user_sid.copy_(state["user_sid"])
        self._trie = None
        if not self.dynamic:
            for k in ("item", "user") if self.use_user else ("item",):
                for p in self.tower(k).parameters():
                    p.requires_grad_(False)

    def stage_signature(self, stage):
        keys = ("alpha", "ttds_levels", "ttds_codebook_size", "ttds_suffix_size", "ttds_code_dim", "ttds_tower_hidden",
                "ttds_commitment", "ttds_beta", "ttds_user_tower", "ttds_dynamic", "ttds_indexer",
                "ttds_token_embedding", "ttds_text_vocab", "ttds_text_length", "ttds_user_history_titles",
                "user_text_fields", "item_text_fields", "llm_path", "llm_preset", "llm_config", "use_lora",
                "text_encoder_path", "text_encoder_max_length")
        return {k: self.config[k] for k in keys} | {"n_items": self.n_items, "n_users": self.n_users,
                                                     "ttds_text_source": self.text_source}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._trie = None
        if strict and not any(k in state_dict for k in ("item_x", "user_x", "x_ready")):
            # a checkpoint from before X was stored: it trained on live X, which it keeps reading
            own = self.state_dict()
            state_dict = {**state_dict, **{k: torch.zeros_like(own[k]) for k in ("item_x", "user_x", "x_ready")}}
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:  # a failed strict load may still have copied x_ready
            self._x_ready = bool(self.x_ready)

    # ----- prompts and the seq2seq loss (Eq. 8-9) ----------------------------------------------
    def _words(self, name, batch):
        piece = getattr(self, f"instr_{name}")
        return piece.unsqueeze(0).expand(batch, -1)

    def next_item_prompt(self, interaction):
        """Token ids ``[B, S]`` (left-padded), Sec. 4.2.1: [instruction] user Sid [instruction]
        history item Sids, then </s> or SEP (``ttds_instruction: False``: the Sids alone)."""
        items, valid = self.last_items(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], self.history)
        B = items.shape[0]
        parts = []
        if self.use_user:
            parts += [self._words("user_intro", B), self.user_sid[interaction[self.USER_ID]]]
        parts += [self._words("history_intro", B),
                  self.item_sid[items].masked_fill(~valid.unsqueeze(-1), self.pad_id).flatten(1)]
        return self._close(parts)

    def user_prompt(self, items, context):
        """User prediction (Sec. 4.2.4): [instruction] the item's Sid [instruction] the Sids of its
        earlier users ``context [B, H]`` [question]."""
        B = items.shape[0]
        users = self.user_sid[context].masked_fill((context == 0).unsqueeze(-1), self.pad_id).flatten(1)
        return self._close([self._words("item_intro", B), self.item_sid[items], self._words("users_intro", B), users,
                            self._words("user_question", B)])

    def _close(self, parts):
        ids = torch.cat(parts, 1)
        # left-pad: move every row's padding to the front (a stable sort on "is a real token")
        order = torch.argsort((ids != self.pad_id).long(), dim=1, stable=True)
        ids = ids.gather(1, order)
        close = self.eos_id if self.is_encoder_decoder else self.sep_id
        ids = torch.cat([ids, torch.full_like(ids[:, :1], close)], 1)
        keep = (ids != self.pad_id).any(0)
        return ids[:, keep]

    def target_logits(self, prompt, target):
        """Teacher-forced logits ``[B, T, V]`` predicting each token of ``target [B, T]`` (T >= 0
        tokens given; T5: the decoder after its start token; decoder-only: the prompt's closing
        SEP and the target tokens but the last, appended after the prompt). With T = 0 on a
        decoder-only backbone: the SEP's logits ``[B, 1, V]`` (the first target token)."""
        mask = (prompt != self.pad_id).long()
        if self.is_encoder_decoder:
            start = self.llm.config.decoder_start_token_id or 0
            dec = torch.cat([torch.full_like(target[:, :1], start), target[:, :-1]], 1) if target.shape[1] else \
                torch.full_like(prompt[:, :1], start)
            return self.llm(inputs_embeds=self.embed(prompt), attention_mask=mask,
                            decoder_inputs_embeds=self.embed(dec), use_cache=False).logits
        given = target[:, :-1] if target.shape[1] else target
        ids = torch.cat([prompt, given], 1)
        full = torch.cat([mask, torch.ones_like(given)], 1)
        pos = (full.cumsum(1) - 1).clamp(min=0)
        keep = given.shape[1] + 1
        return self.llm(inputs_embeds=self.embed(ids), attention_mask=full, position_ids=pos, use_cache=False,
                        logits_to_keep=keep).logits[:, -keep:]

    def seq2seq_loss(self, prompt, target):
        """Eq. 9: token cross-entropy of ``target`` given ``prompt``."""
        logits = self.target_logits(prompt, target)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

    def user_task_batch(self, items):
        """(items, context users [B, H_u], next user) for items with at least two training users."""
        counts = self.item_user_indptr[items + 1] - self.item_user_indptr[items]
        ok = counts >= 2
        items, counts = items[ok], counts[ok]
        if len(items) == 0:
            return None
        pick = torch.randperm(len(items), device=items.device)[: self.aux_batch]  # not the lowest ids
        items, counts = items[pick], counts[pick]
        cut = 1 + (torch.rand(len(items), device=items.device) * (counts - 1)).long()  # 1..n-1
        start = self.item_user_indptr[items]
        H = self.user_history
        offsets = torch.arange(H, device=items.device)
        pos = cut.unsqueeze(1) - H + offsets
        valid = pos >= 0
        context = self.item_user_seq[(start.unsqueeze(1) + pos.clamp(min=0))] * valid
        target = self.item_user_seq[start + cut]
        return items, context, target

    def calculate_loss(self, interaction):
        """L_All = L_LLM + alpha * L_DM (Eq. 15)."""
        targets = interaction[self.POS_ITEM_ID]
        losses = {"next_item": self.seq2seq_loss(self.next_item_prompt(interaction), self.item_sid[targets])}
        if "user" in self.tasks:
            batch = self.user_task_batch(torch.unique(targets))
            if batch is not None:
                items, context, nxt = batch
                losses["user"] = self.seq2seq_loss(self.user_prompt(items, context), self.user_sid[nxt])
        l_llm = sum(losses.values()) / len(losses)
        self.last_losses = {k: float(v.detach()) for k, v in losses.items()}
        if self.alpha == 0 or self.indexer != "rq":
            return l_llm
        l_dm = self.batch_dm_loss(interaction)
        self.last_losses["dm"] = float(l_dm.detach())
        return l_llm + self.alpha * l_dm

    def _sample(self, ids):
        """At most ``ttds_aux_batch`` of ``ids``, drawn at random (not the lowest ids)."""
        return ids[torch.randperm(len(ids), device=ids.device)[: self.aux_batch]]

    def batch_dm_loss(self, interaction):
        """L_DM on the batch's target items (and users), each tower on at most ``ttds_aux_batch``."""
        items = self._sample(torch.unique(interaction[self.POS_ITEM_ID]))
        loss = self.dm_loss("item", self.text_targets("item", items))["dm"]
        if self.use_user:
            users = torch.unique(interaction[self.USER_ID])
            users = self._sample(users[self.user_has_text[users]])  # the tower fits users with text only
            if len(users):
                loss = loss + self.dm_loss("user", self.text_targets("user", users))["dm"]
        return loss

    # ----- decoding ---------------------------------------------------------------------------
    def level_ranges(self):
        lo, N = self.item_offset, self.N
        return [(lo + l * N, lo + (l + 1) * N) for l in range(self.M)] + [
            (lo + self.M * N, lo + self.M * N + self.S)]

    @property
    def trie(self) -> PrefixTrie:
        if self._trie is None:  # every item, or the ones a protocol allows (restricted_decoding)
            self._trie = item_trie(self.item_sid, self.item_offset + 2 * self.n_id + 1, self.allowed_items)
        return self._trie

    @torch.no_grad()
    def beam_search(self, interaction, beam_size=None, use_cache=None):
        """Top items by trie-constrained beam search: ``items [B, beam]`` (-1 = none), log-probs.

        ``use_cache`` (default: config ``beam_kv_cache``, True when unset): KV-cached steps (T5:
        encoder once, then one decoder token per beam and step; decoder-only: the prompt once per
        user, then one token per beam), every input through :meth:`embed`; False re-runs the
        decoder (T5) or [prompt, prefix] (decoder-only) each step (the reference path)."""
        beam = beam_size or self.beam_size
        prompt = self.next_item_prompt(interaction)
        B = prompt.shape[0]
        if use_cache is None:
            use_cache = self.config["beam_kv_cache"] is not False
        if use_cache:
            mask = (prompt != self.pad_id).long()
            if self.is_encoder_decoder:
                hidden = self.llm.get_encoder()(inputs_embeds=self.embed(prompt), attention_mask=mask).last_hidden_state
                step = seq2seq_stepper(self.llm, hidden, mask, self.llm.config.decoder_start_token_id or 0, self.embed)
            else:
                step = causal_stepper(self.llm, self.embed(prompt), mask, self.embed)
            return constrained_beam_search(step, self.trie, B, beam, self.level_ranges(), device=prompt.device,
                                           cached=True)
        prompt = prompt.repeat_interleave(beam, 0)
        if self.is_encoder_decoder:
            mask = (prompt != self.pad_id).long()
            hidden = self.llm.get_encoder()(inputs_embeds=self.embed(prompt), attention_mask=mask).last_hidden_state
            start = self.llm.config.decoder_start_token_id or 0

            def step(prefix):
                dec = torch.cat([prefix.new_full((prefix.shape[0], 1), start), prefix], 1)
                logits = self.llm(encoder_outputs=(hidden,), attention_mask=mask, decoder_inputs_embeds=self.embed(dec),
                                  use_cache=False).logits[:, -1]
                return F.log_softmax(logits.float(), -1)
        else:
            def step(prefix):  # [prompt, prefix] re-run each step
                ids = torch.cat([prompt, prefix], 1)
                mask = torch.cat([(prompt != self.pad_id).long(), torch.ones_like(prefix)], 1)
                pos = (mask.cumsum(1) - 1).clamp(min=0)
                logits = self.llm(inputs_embeds=self.embed(ids), attention_mask=mask, position_ids=pos,
                                  use_cache=False, logits_to_keep=1).logits[:, -1]
                return F.log_softmax(logits.float(), -1)

        return constrained_beam_search(step, self.trie, B, beam, self.level_ranges(), device=prompt.device)

    def full_sort_predict(self, interaction):
        return full_scores(*self.beam_search(interaction), self.n_items)

    def predict(self, interaction):
        """Sequence log-likelihood of the given items (sampled evaluation)."""
        prompt = self.next_item_prompt(interaction)
        target = self.item_sid[interaction[self.ITEM_ID]]
        log_probs = F.log_softmax(self.target_logits(prompt, target).float(), -1)
        return log_probs.gather(2, target.unsqueeze(-1)).squeeze(-1).sum(1)
