"""TokenRec: Learning to Tokenize ID for LLM-based Generative Recommendations (Qu et al., 2024).

Stages:
- ``cf``: a RecBole LightGCN trained on the same data and split with its own pairwise loaders (or
  loaded from ``cf_model_path``); its final user and item embeddings are the "vector database"
  (Sec. II-C1, II-D3) and stay frozen;
- ``tokenizer``: two MQ-Tokenizers (:mod:`recbole_genrec.quantize.mq_tokenizer`, Eq. 2-14), one
  for items and one for users; each entity gets K codes, i.e. K out-of-vocabulary tokens among
  the K x L item tokens and K x L user tokens added to the backbone vocabulary;
- ``recommender``: the backbone encodes the prompt (Eq. 15): prompt 1 = the user's tokens, prompt 2
  = the user's tokens and the tokens of the history items (their order shuffled while training, as
  the paper does to drop sequential order; train and eval prompts share one layout). With a backbone
  tokenizer (``llm_path``) the prompt is a text template (Sec. II-D1, III-A4) whose words come from
  that tokenizer, interleaved with the code tokens; presets have no tokenizer and keep the ID-only
  prompt (user codes, item codes, eos). ``h`` (Eq. 17) is the decoder state of a fixed
  ``tokenrec_decoder_length``-token decoder input for T5 (flattened, as the official code does) or
  the last hidden state for decoder-only backbones; a three-layer MLP projects it to ``z`` in the
  LightGCN space (Eq. 18) and every item is scored by cosine similarity (Eq. 19). The loss is the
  cosine embedding loss of Eq. 20 with negatives from RecBole's sampler (1:1 by default) and margin
  ``gamma``; ``tokenrec_loss: softmax`` (our departure, for comparison: see
  ``benchmarks/tokenrec_space.py``) replaces it with a cross-entropy over the Eq. 19 cosines of all
  items divided by ``tokenrec_tau``. No autoregressive decoding: ``full_sort_predict`` returns all cosine scores and
  :meth:`retrieve` gives the same top-k through a faiss index.

Users with no edge in LightGCN's training graph (on the warm/cold split, users who arrive after the
training period) have no trained vector: their rows are LightGCN's initial ones. For new users the
paper updates the "vector database" with their interactions (Sec. II-E, III-C; for its unseen users,
who have training interactions, that is :meth:`refresh_user_embeddings`). These users' only
interactions are the history items in their prompt, so, as a cheap stand-in for that update (our
choice), they take no part in fitting the user MQ-Tokenizer and their user codes tokenize the mean
LightGCN vector of the prompt's history items (LightGCN's propagation makes a user a normalised sum of
its items' vectors; ``benchmarks/tokenrec_new_users.py`` measures how close that mean is), or the
trained users' mean vector when the prompt has no history.
"""

from __future__ import annotations

import copy
import math
import os
import re

import torch
import torch.nn.functional as F
from recbole.utils import InputType
from torch import nn

from recbole_genrec.compat import safe_torch_load
from recbole_genrec.decoding.two_level_softmax import faiss_mips_index, faiss_search
from recbole_genrec.llm.backbone import add_new_tokens, apply_lora, backbone_from_config
from recbole_genrec.model.base import GenerativeRecommender, train_general_cf_model
from recbole_genrec.quantize.mq_tokenizer import MQTokenizer, mq_stats, train_mq_tokenizer
from recbole_genrec.trainer import StagedTrainer

SPECIALS = 4  # pad 0, eos 1, separator 2, decoder query 3 (tiny presets)

# Text templates (only with a backbone tokenizer). Sec. III-A4: 11 templates, 10 *seen* in training
# and one held out as the *unseen* prompt. The paper does not print them; these are our own wording
# of the same idea (a user token, the history item tokens, a question about the user's taste).
TRAIN_TEMPLATES = (
    "The {user} bought these items: {items}. Which items fit this user next?",
    "Here is what the {user} chose before: {items}. What would this user pick now?",
    "{user} has a history of {items}. Describe what this user wants.",
    "Items the {user} engaged with: {items}. Which items match the user's taste?",
    "From the {user}'s choices {items}, infer what the user is looking for.",
    "Look at the {user}'s past items {items} and tell which items the user prefers.",
    "After {items}, what does the {user} probably want?",
    "Knowing that the {user} liked {items}, suggest what the user may enjoy.",
    "The record of the {user} lists {items}. What interests does the user have?",
    "Past items of the {user}: {items}. Recommend what suits the user.",
)
SEEN_TEMPLATE = TRAIN_TEMPLATES[5]  # evaluation prompt seen in training
UNSEEN_TEMPLATE = "Given that the {user} interacted with {items}, what else might the user like?"
USER_TEMPLATE = "I wonder what the {user} will like. Can you help me decide?"  # Prompt 1, Sec. II-D1


class TokenRec(GenerativeRecommender):
    input_type = InputType.PAIRWISE
    stages = ("cf", "tokenizer")
    trainer_class = StagedTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_books, self.book_size = config["mq_n_books"], config["mq_book_size"]
        self.cf_dim = config["cf_hidden_size"]
        self.prompt = config["tokenrec_prompt"]
        if self.prompt not in ("user", "user_history"):
            raise ValueError(f"tokenrec_prompt must be 'user' (prompt 1) or 'user_history' (prompt 2), got {self.prompt!r}")
        self.gamma = config["gamma"]
        # a config without the key (an older checkpoint's) means Eq. 20
        self.loss_kind = self.option(config, "tokenrec_loss", ("cosine", "softmax")) if config["tokenrec_loss"] \
            else "cosine"
        self.tau = config["tokenrec_tau"]
        if self.loss_kind == "softmax" and not (
                isinstance(self.tau, (int, float)) and not isinstance(self.tau, bool) and 0 < self.tau < math.inf):
            raise ValueError(f"tokenrec_tau must be a positive number with tokenrec_loss: softmax, got {self.tau!r}")
        self.n_users = dataset.user_num
        self.USER_ID = config["USER_ID_FIELD"]
        self.id_tokens = {f: dataset.field2id_token[f] for f in (self.USER_ID, self.ITEM_ID)}
        self.train_dataset = dataset  # the training graph for a LightGCN checkpoint (cf_model_path)
        if config["cf_model_path"] and (config["unseen_user_ratio"] or 0) > 0:
            raise ValueError("unseen_user_ratio > 0 cannot be used with cf_model_path: an external LightGCN "
                             "checkpoint has seen the unseen users; leave cf_model_path empty")
        n_new = 2 * self.n_books * self.book_size
        backbone = backbone_from_config(config, vocab_size=SPECIALS + n_new)
        if config["llm_path"] or config["llm_preset"] == "smollm2-135m":
            self.item_offset = add_new_tokens(backbone, n_new)
        else:
            self.item_offset = SPECIALS
        self.user_offset = self.item_offset + self.n_books * self.book_size
        if config["use_lora"]:
            ids = range(self.item_offset, self.item_offset + n_new)
            backbone = apply_lora(backbone, config["lora_r"], config["lora_alpha"], config["lora_dropout"], ids)
        self.llm, self.is_encoder_decoder = backbone.model, backbone.is_encoder_decoder
        cfg = self.llm.config
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self.eos_id = cfg.eos_token_id if cfg.eos_token_id is not None else 1
        self.decoder_length = config["tokenrec_decoder_length"]
        self.text_prompts = backbone.tokenizer is not None
        if self.text_prompts:
            self._build_templates(backbone.tokenizer, config["tokenrec_eval_template"] or "seen")
        d = backbone.hidden_size
        width = d * self.decoder_length if self.is_encoder_decoder else d
        hidden = config["proj_hidden"]
        self.proj = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config["proj_dropout"]),
                                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, self.cf_dim))
        mq_kwargs = dict(n_books=self.n_books, book_size=self.book_size, code_dim=config["mq_code_dim"],
                         hidden=tuple(config["mq_hidden"]), mask_ratio=config["mask_ratio"], beta=config["mq_beta"])
        self.item_tokenizer = MQTokenizer(self.cf_dim, **mq_kwargs)
        self.user_tokenizer = MQTokenizer(self.cf_dim, **mq_kwargs)
        self.register_buffer("user_emb", torch.zeros(self.n_users, self.cf_dim))
        self.register_buffer("item_emb", torch.zeros(self.n_items, self.cf_dim))
        # unseen-user protocol (Sec. III-C, see fewest_interaction_users)
        self.register_buffer("unseen_users", self.fewest_interaction_users(dataset, config["unseen_user_ratio"] or 0.0))
        # users with a trained LightGCN vector (the others: see the module docstring); the cf stage sets it
        # from its graph, this is the fallback for a checkpoint from before it was stored
        self.register_buffer("trained_users", self.users_in(dataset))
        self.register_buffer("user_codes", torch.zeros(self.n_users, self.n_books, dtype=torch.long))
        self.register_buffer("item_codes", torch.zeros(self.n_items, self.n_books, dtype=torch.long))

    @staticmethod
    def fewest_interaction_users(dataset, ratio: float) -> torch.Tensor:
        """``[n_users]`` bool: the ``ratio`` share of users with the fewest training interactions.

        Sec. III-C: "exclude the 5% of users (ref as *unseen users*) with the least interaction history
        from the training data split ... Consequently, all items interacted with by these users are also
        excluded from the training set ... only the training split is utilized for establishing these
        models, while it is allowed to update the vector database". So every training interaction of
        theirs is withheld from the LightGCN graph and loss, the tokenizers and the LLM loss (their
        validation interactions from early stopping too); afterwards their LightGCN rows are refreshed
        from those training interactions (:meth:`refresh_user_embeddings`) and their test items scored."""
        mask = torch.zeros(dataset.user_num, dtype=torch.bool)
        if ratio <= 0:
            return mask
        counts = torch.bincount(dataset.inter_feat[dataset.uid_field], minlength=dataset.user_num).float()
        counts[0] = float("inf")  # padding user
        counts[counts == 0] = float("inf")  # users with no training interaction are new users, not these
        n = max(1, int(round(ratio * (dataset.user_num - 1))))
        mask[torch.argsort(counts, stable=True)[:n]] = True
        return mask

    @staticmethod
    def users_in(dataset) -> torch.Tensor:
        """``[n_users]`` bool: the users with at least one interaction in ``dataset`` (padding excluded)."""
        counts = torch.bincount(dataset.inter_feat[dataset.uid_field], minlength=dataset.user_num)
        return (counts > 0) & (torch.arange(dataset.user_num) > 0)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if strict and "trained_users" not in state_dict:  # a checkpoint from before it was stored
            state_dict = {**state_dict, "trained_users": self.trained_users.clone()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ----- stages -------------------------------------------------------------------------
    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        if stage == "cf":
            return self._cf_stage(stage_config, show_progress)
        seen = ~self.unseen_users & self.trained_users
        x_items, x_users = self.item_emb[1:], self.user_emb[seen]
        seed = self.config["seed"]
        common = dict(epochs=stage_config["epochs"], lr=stage_config["learning_rate"],
                      batch_size=stage_config["batch_size"], seed=seed, show_progress=show_progress,
                      reseed_every=self.config["mq_reseed_every"])
        item_hist = train_mq_tokenizer(self.item_tokenizer, x_items, name="item MQ-Tokenizer", **common)
        user_hist = train_mq_tokenizer(self.user_tokenizer, x_users, name="user MQ-Tokenizer", **common)
        self.assign_codes()
        for p in list(self.item_tokenizer.parameters()) + list(self.user_tokenizer.parameters()):
            p.requires_grad_(False)
        return {"item": mq_stats(self.item_codes[1:], self.book_size), "user": mq_stats(self.user_codes[seen], self.book_size),
                "item_loss": round(item_hist[-1], 4), "user_loss": round(user_hist[-1], 4)}

    def _cf_stage(self, stage_config, show_progress):
        if self.config["cf_model_path"]:
            users, items = self.checkpoint_cf_embeddings(self.config["cf_model_path"])
            source, graph = self.config["cf_model_path"], self.train_dataset
        else:
            unseen = self.unseen_users.nonzero().flatten().cpu()
            # one thread: with more, LightGCN's sparse propagation sums in a varying order (vectors ~1e-8
            # apart between runs of one seed), which the recommender's training amplifies
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cf, _, graph = train_general_cf_model(
                    self.config, self.id_tokens, "LightGCN", epochs=stage_config["epochs"],
                    learning_rate=stage_config["learning_rate"], batch_size=stage_config["batch_size"],
                    overrides={"embedding_size": self.cf_dim, "stopping_step": self.config["cf_stopping_step"],
                               **{k: self.config[k] for k in ("valid_metric", "metrics", "topk")}},
                    show_progress=show_progress, exclude_users=unseen)
                with torch.no_grad():
                    users, items = cf.forward()
                    if len(unseen):
                        users = users.clone()
                        users[unseen] = self.refresh_user_embeddings(cf, graph, unseen)
            finally:
                torch.set_num_threads(threads)
            source = "LightGCN trained as stage 'cf'"
        if users.shape != self.user_emb.shape or items.shape != self.item_emb.shape:
            raise ValueError(f"CF embeddings {tuple(users.shape)}/{tuple(items.shape)} do not match the dataset "
                             f"({tuple(self.user_emb.shape)}/{tuple(self.item_emb.shape)}); check cf_hidden_size")
        self.user_emb.copy_(users.detach())
        self.item_emb.copy_(items.detach())
        self.trained_users.copy_(self.users_in(graph))  # an edge in the graph LightGCN propagated over
        return {"source": source, "cf_dim": self.cf_dim, "new_users": int((~self.trained_users[1:]).sum())}

    @torch.no_grad()
    def checkpoint_cf_embeddings(self, path):
        """Final (propagated) user and item embeddings of a RecBole LightGCN checkpoint: its weights are
        loaded into a LightGCN built on this model's training graph and ``forward()`` is called, the
        same kind of vectors as a LightGCN trained as stage ``cf`` (Sec. II-C1)."""
        from recbole.model.general_recommender.lightgcn import LightGCN

        if not os.path.isfile(path):
            raise FileNotFoundError(f"cf_model_path {path!r} does not exist")
        checkpoint = safe_torch_load(path, map_location="cpu")
        state, saved = checkpoint.get("state_dict", checkpoint), checkpoint.get("config")

        def saved_value(key):  # the checkpoint's RecBole config (or None)
            return saved[key] if saved is not None and key in saved else None

        if saved_value("model") not in (None, "LightGCN"):
            raise ValueError(f"cf_model_path {path!r} holds a {saved_value('model')} model, not LightGCN")
        if "user_embedding.weight" not in state or "item_embedding.weight" not in state:
            raise ValueError(f"cf_model_path {path!r} is not a RecBole LightGCN checkpoint "
                             "(no user_embedding.weight / item_embedding.weight)")
        users, items = state["user_embedding.weight"], state["item_embedding.weight"]
        if (len(users), len(items)) != (self.n_users, self.n_items):
            raise ValueError(f"cf_model_path {path!r} has {len(users)} users / {len(items)} items but the dataset "
                             f"has {self.n_users} / {self.n_items}: train it on the same data and filtering")
        for field, tokens in (checkpoint.get("field2id_token") or {}).items():
            if field in self.id_tokens and list(tokens) != list(self.id_tokens[field]):
                raise ValueError(f"cf_model_path {path!r}: its {field} ids differ from the dataset's")
        if users.shape[1] != self.cf_dim:
            raise ValueError(f"cf_model_path {path!r} has {users.shape[1]}-d embeddings; set cf_hidden_size to it")
        cf_config = copy.deepcopy(self.config)
        for key, default in (("n_layers", 2), ("reg_weight", 1e-5), ("require_pow", False)):  # RecBole's defaults
            cf_config[key] = default if saved_value(key) is None else saved_value(key)
        cf_config["embedding_size"] = self.cf_dim
        cf = LightGCN(cf_config, self.train_dataset).to(self.user_emb.device)
        cf.load_state_dict({k: v for k, v in state.items() if "norm_adj" not in k})
        return cf.eval().forward()

    @staticmethod
    @torch.no_grad()
    def refresh_user_embeddings(cf, full_train, users):
        """LightGCN embeddings of users kept out of training, from their interactions alone: their
        layer-0 vectors start as the mean of their items' and are propagated over the full training
        graph with every trained weight frozen (nothing else is retrained)."""
        from recbole.model.general_recommender.lightgcn import LightGCN

        refreshed = LightGCN(cf.cf_config, full_train).to(cf.user_embedding.weight.device)
        refreshed.load_state_dict({k: v for k, v in cf.state_dict().items() if "norm_adj" not in k}, strict=False)
        inter = full_train.inter_feat
        uid, iid = inter[full_train.uid_field], inter[full_train.iid_field]
        for user in users.tolist():
            items = iid[uid == user]
            if len(items):
                refreshed.user_embedding.weight[user] = refreshed.item_embedding.weight[items].mean(0)
        all_users, _ = refreshed.forward()
        return all_users[users]

    @torch.no_grad()
    def assign_codes(self):
        self.item_tokenizer.eval(), self.user_tokenizer.eval()
        self.item_codes[1:] = self.item_tokenizer.tokenize(self.item_emb[1:])
        z = self.user_emb[1:].clone()
        trained = self.trained_users[1:]
        if not trained.all():  # no training interaction: the trained users' mean (a prompt's history overrides it)
            z[~trained] = z[trained].mean(0)
        self.user_codes[1:] = self.user_tokenizer.tokenize(z)

    def stage_state_dict(self, stage):
        if stage == "cf":
            return {"user_emb": self.user_emb.clone(), "item_emb": self.item_emb.clone(),
                    "trained_users": self.trained_users.clone()}
        return {"item_tokenizer": self.item_tokenizer.state_dict(), "user_tokenizer": self.user_tokenizer.state_dict(),
                "item_codes": self.item_codes.clone(), "user_codes": self.user_codes.clone()}

    def load_stage_state_dict(self, stage, state):
        if stage == "cf":
            self.user_emb.copy_(state["user_emb"])
            self.item_emb.copy_(state["item_emb"])
            if "trained_users" in state:  # (a stage file from before it was stored: the fallback stays)
                self.trained_users.copy_(state["trained_users"])
            return
        self.item_tokenizer.load_state_dict(state["item_tokenizer"])
        self.user_tokenizer.load_state_dict(state["user_tokenizer"])
        self.item_codes.copy_(state["item_codes"])
        self.user_codes.copy_(state["user_codes"])
        for p in list(self.item_tokenizer.parameters()) + list(self.user_tokenizer.parameters()):
            p.requires_grad_(False)

    def stage_signature(self, stage):
        keys = ["cf_model_path", "cf_hidden_size", "cf_stopping_step", "unseen_user_ratio", "n_users"]
        if stage == "tokenizer":
            keys += ["mq_n_books", "mq_book_size", "mq_code_dim", "mq_hidden", "mask_ratio", "mq_beta", "mq_reseed_every"]
        return {k: self.config[k] for k in keys if k != "n_users"} | {"n_users": self.n_users, "n_items": self.n_items} \
            | self.cf_stage_signature()

    # ----- prompts (Eq. 15) -------------------------------------------------------------------
    def user_tokens(self, users, items=None, valid=None):
        """The K user tokens; a user with no training interaction gets the codes of the mean LightGCN
        vector of its prompt's history ``items`` (``valid`` slots), see the module docstring."""
        return self.user_offset + torch.arange(self.n_books, device=users.device) * self.book_size \
            + self.history_user_codes(users, items, valid)

    @torch.no_grad()
    def history_user_codes(self, users, items=None, valid=None):
        codes = self.user_codes[users]
        new = ~self.trained_users[users]
        if items is None or not new.any():
            return codes
        weight = valid[new].unsqueeze(-1).float()
        has_history = valid[new].any(1, keepdim=True)
        z = (self.item_emb[items[new]] * weight).sum(1) / weight.sum(1).clamp(min=1)
        codes[new] = torch.where(has_history, self.user_tokenizer.tokenize(z), codes[new])
        return codes

    def item_tokens(self, items):
        return self.item_offset + torch.arange(self.n_books, device=items.device) * self.book_size + self.item_codes[items]

    def shuffle_keys(self, shape, device):
        """Random sort keys that shuffle N(u) (Sec. II-D2); a hook, so tests can fix the order."""
        return torch.rand(shape, device=device)

    def shuffle_history(self, items, valid):
        """``items`` with the order of the valid items shuffled among the valid slots; pads stay put,
        so training and evaluation prompts share one layout (positions, T5 bias, RoPE, eos)."""
        keys = self.shuffle_keys(items.shape, items.device).masked_fill(~valid, float("inf"))
        shuffled = keys.argsort(1)  # the valid slots first, in random order
        rank = (valid.long().cumsum(1) - 1).clamp(min=0)  # the k-th valid slot takes the k-th of them
        own = torch.arange(items.shape[1], device=items.device).expand_as(items)
        return items.gather(1, torch.where(valid, shuffled.gather(1, rank), own))

    def prompt_ids(self, users, item_seq=None, item_len=None, shuffle=False):
        """Prompt token ids ``[B, S]`` and attention mask (Eq. 15). ``shuffle``: the training prompt
        (history order shuffled; with text prompts a random seen template).

        ID-only (presets, no tokenizer): user tokens [, history item tokens in RecBole's left-padded
        slots], eos. Text (``llm_path`` with a tokenizer): a template filled with ``user_`` + user
        codes and ``item_`` + item codes (Sec. II-D1), left-padded, eos last."""
        items = valid = None
        if self.prompt == "user_history":
            items, valid = self.last_items(item_seq, item_len, self.max_seq_length)
            if shuffle:  # the paper shuffles N(u) to drop the sequential signal
                items = self.shuffle_history(items, valid)
        if self.text_prompts:
            return self.text_prompt_ids(users, items, valid, shuffle)
        parts = [self.user_tokens(users, items, valid)]
        if items is not None:
            tokens = self.item_tokens(items).masked_fill(~valid.unsqueeze(-1), self.pad_id)
            parts.append(tokens.flatten(1))
        ids = torch.cat(parts + [torch.full_like(users.unsqueeze(1), self.eos_id)], 1)
        mask = ids != self.pad_id
        keep = mask.any(0)
        return ids[:, keep], mask[:, keep].long()

    def _build_templates(self, tokenizer, eval_template):
        """Pre-tokenize the templates' words with the backbone tokenizer."""
        if eval_template not in ("seen", "unseen"):
            raise ValueError(f"tokenrec_eval_template must be 'seen' or 'unseen', got {eval_template!r}")

        def encode(text):
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        def parse(template):
            return [part[1:-1] if part in ("{user}", "{items}") else encode(part)
                    for part in re.split(r"(\{user\}|\{items\})", template) if part.strip()]

        self.user_word, self.item_word, self.item_sep = encode("user_"), encode("item_"), encode(",")
        if self.prompt == "user":
            self.train_templates = self.eval_templates = [parse(USER_TEMPLATE)]
        else:
            self.train_templates = [parse(t) for t in TRAIN_TEMPLATES]
            self.eval_templates = [parse(SEEN_TEMPLATE if eval_template == "seen" else UNSEEN_TEMPLATE)]

    def text_prompt_ids(self, users, items, valid, train):
        templates = self.train_templates if train else self.eval_templates
        choice = torch.randint(len(templates), (len(users),)).tolist() if len(templates) > 1 else [0] * len(users)
        user_codes = self.user_tokens(users, items, valid).tolist()
        histories = [[]] * len(users)
        if items is not None:
            codes, valid = self.item_tokens(items).tolist(), valid.tolist()
            histories = [[c for c, v in zip(row, ok) if v] for row, ok in zip(codes, valid)]
        rows = []
        for b, t in enumerate(choice):
            seq = []
            for piece in templates[t]:
                if piece == "user":
                    seq += self.user_word + user_codes[b]
                elif piece == "items":
                    for n, item in enumerate(histories[b]):
                        seq += (self.item_sep if n else []) + self.item_word + item
                else:
                    seq += piece
            rows.append(seq + [self.eos_id])
        width = max(len(seq) for seq in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, seq in enumerate(rows):
            ids[b, width - len(seq):] = torch.tensor(seq)
            mask[b, width - len(seq):] = 1
        return ids.to(users.device), mask.to(users.device)

    # ----- LLM4Rec + generative retrieval (Eq. 17-20) ---------------------------------------------
    def user_representation(self, interaction, shuffle=False):
        """``z`` (Eq. 18) in the LightGCN space: ``[B, cf_dim]``."""
        ids, mask = self.prompt_ids(interaction[self.USER_ID], interaction[self.ITEM_SEQ],
                                    interaction[self.ITEM_SEQ_LEN], shuffle=shuffle)
        if self.is_encoder_decoder:
            start = self.llm.config.decoder_start_token_id or 0
            dec = torch.full((len(ids), self.decoder_length), 3, dtype=torch.long, device=ids.device)
            dec[:, 0] = start
            out = self.llm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, output_hidden_states=True,
                           use_cache=False)
            h = out.decoder_hidden_states[-1].flatten(1)
        else:
            out = self.llm(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            h = out.hidden_states[-1][:, -1]  # the closing eos sees the whole prompt
        return self.proj(h)

    def calculate_loss(self, interaction):
        keep = ~self.unseen_users[interaction[self.USER_ID]]  # unseen users never train the LLM
        if not keep.all():
            interaction = interaction[keep.nonzero().flatten()]
        z = self.user_representation(interaction, shuffle=self.training)
        if len(z) == 0:
            return self.proj[0].weight.sum() * 0.0
        target = interaction[self.POS_ITEM_ID]
        if self.loss_kind == "softmax":  # every item is a negative; the sampled one is not used
            logits = self.cosine_scores(z) / self.tau
            logits[:, 0] = float("-inf")  # the padding item
            return F.cross_entropy(logits, target)
        pos = F.cosine_similarity(z, self.item_emb[target], dim=-1)
        neg = F.cosine_similarity(z, self.item_emb[interaction[self.NEG_ITEM_ID]], dim=-1)
        return (1 - pos).mean() + (neg - self.gamma).clamp(min=0).mean()  # Eq. 20

    def cosine_scores(self, z):
        """Eq. 19 for every item: ``[B, n_items]``."""
        return F.normalize(z, dim=-1) @ F.normalize(self.item_emb, dim=-1).T

    def full_sort_predict(self, interaction):
        return self.cosine_scores(self.user_representation(interaction))

    def predict(self, interaction):
        z = self.user_representation(interaction)
        return F.cosine_similarity(z, self.item_emb[interaction[self.ITEM_ID]], dim=-1)

    @torch.no_grad()
    def retrieve(self, interaction, k: int, index: str = "flat"):
        """Top-``k`` items by faiss over the normalised LightGCN item embeddings (inner product =
        cosine). ``index``: ``flat`` (exact) or ``hnsw`` (approximate)."""
        faiss_index = faiss_mips_index(F.normalize(self.item_emb[1:], dim=-1), index)
        items, scores = faiss_search(faiss_index, F.normalize(self.user_representation(interaction), dim=-1), k, offset=1)
        return items.cpu(), scores.cpu()
