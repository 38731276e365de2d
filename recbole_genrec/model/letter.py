"""LETTER: Learnable Item Tokenization for Generative Recommendation (Wang et al., CIKM 2024).

TIGER's pipeline with LETTER's tokenizer (Sec. 3.1-3.2):
- stage ``cf``: a RecBole SASRec trained on the same split (or loaded from ``cf_model_path``);
  its item embeddings (``rq_e_dim`` wide) are frozen as the collaborative signal;
- stage ``tokenizer``: the RQ-VAE loss (averaged over levels, the last level Sinkhorn-balanced
  over each training batch) plus ``cf_weight`` x collaborative regularisation (Eq. 2: in-batch
  contrast between the quantised latent and the item's CF embedding) and ``div_weight`` x
  diversity regularisation (Eq. 3: codewords grouped by size-constrained k-means into
  ``div_groups`` groups; an assigned codeword is pulled towards another codeword of its group);
  the epoch with the fewest collisions is kept; then each group of colliding items is re-assigned
  on the last level with Sinkhorn (``collision_handling: sinkhorn``) before the dedup suffix. See
  :mod:`recbole_genrec.quantize.letter_tokenizer` for where this follows LETTER's code, not TIGER's;
- stage ``recommender``: TIGER's T5 with the ranking-guided generation loss, token
  cross-entropy on logits divided by ``gen_temperature`` (Sec. 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recbole_genrec.model.base import load_cf_item_embeddings, train_cf_model
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.quantize.letter_tokenizer import LetterRQVAE, letter_code_table, train_letter_rq_vae


class LETTER(TIGER):
    stages = ("cf", "tokenizer")
    collision_handling_default = "sinkhorn"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        # the tokenizer's initial weights come from the seed alone, not from the random state the
        # backbone built before them leaves (its size, LoRA): the tokenizer stage signs the seed
        with torch.random.fork_rng(devices=[]):  # the CPU generator, restored after
            torch.default_generator.manual_seed(config["seed"])
            self.rq_vae = LetterRQVAE(
                self.item_text_emb.shape[1], hidden=tuple(config["rq_hidden"]), e_dim=config["rq_e_dim"],
                levels=self.levels, codebook_size=self.codebook_size, beta=config["rq_beta"],
                sk_epsilon=config["letter_sk_epsilon"], sk_iters=config["letter_sk_iters"],
            )
        self.register_buffer("cf_item_emb", torch.zeros(self.n_items, config["rq_e_dim"]))
        self.gen_temperature = config["gen_temperature"] or 1.0

    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        if stage == "tokenizer":
            out = train_letter_rq_vae(
                self.rq_vae, self.item_text_emb[1:], epochs=stage_config["epochs"], lr=stage_config["learning_rate"],
                batch_size=stage_config["batch_size"], eval_step=self.config["tokenizer_eval_step"],
                seed=self.config["seed"], show_progress=show_progress, **self.tokenizer_loss_options(),
            )
            return {**self.assign_codes(), "final_loss": round(out["loss"][-1], 4) if out["loss"] else None,
                    "kept_epoch": out["best_epoch"], "kept_collision_rate": out["best_collision_rate"]}
        if stage != "cf":
            return super().train_stage(stage, train_data, valid_data, stage_config, show_progress)
        e_dim = self.config["rq_e_dim"]
        if self.config["cf_model_path"]:
            emb = load_cf_item_embeddings(self.config["cf_model_path"], self.n_items)
            source = self.config["cf_model_path"]
        else:
            cf = train_cf_model(
                self.config, train_data, valid_data, "SASRec",
                overrides={"hidden_size": e_dim, "inner_size": 4 * e_dim, "loss_type": "CE",
                           "learner": "adam", "weight_decay": 0.0},  # RecBole's SASRec recipe, not LETTER's AdamW
                epochs=stage_config["epochs"], learning_rate=stage_config["learning_rate"],
                show_progress=show_progress,
            )
            emb = cf.item_embedding.weight.detach()
            source = "SASRec trained as stage 'cf'"
        if emb.shape[1] != e_dim:
            raise ValueError(f"cf_model_path item embeddings are {emb.shape[1]}-d; LETTER needs rq_e_dim={e_dim}")
        self.cf_item_emb.copy_(emb.to(self.cf_item_emb.device))
        return {"source": source, "cf_dim": e_dim}

    def tokenizer_loss_options(self):
        return {
            "cf_emb": self.cf_item_emb[1:],
            "cf_weight": self.config["cf_weight"],
            "div_weight": self.config["div_weight"],
            "div_groups": self.config["div_groups"],
            "div_tau": self.config["div_tau"],
        }

    def code_table(self, x, codes) -> torch.Tensor:
        """LETTER's collision resolution: per colliding group, the Sinkhorn-balanced last level
        (:func:`~recbole_genrec.quantize.letter_tokenizer.letter_code_table`, up to 20 rounds), then
        the dedup suffix; ``collision_handling: suffix`` goes straight to the suffix."""
        rounds = 20 if self.collision_handling == "sinkhorn" else 0
        return letter_code_table(self.rq_vae, x, suffix_size=self.codebook_size, rounds=rounds)

    def stage_state_dict(self, stage):
        if stage == "cf":
            return {"cf_item_emb": self.cf_item_emb.clone()}
        return super().stage_state_dict(stage)

    def load_stage_state_dict(self, stage, state):
        if stage == "cf":
            self.cf_item_emb.copy_(state["cf_item_emb"])
        else:
            super().load_stage_state_dict(stage, state)

    def stage_signature(self, stage):
        keys = ("cf_model_path", "rq_e_dim", "MAX_ITEM_LIST_LENGTH")
        base = {"n_items": self.n_items, **{k: self.config[k] for k in keys}, **self.cf_stage_signature()}
        if stage == "cf":
            return base
        extra = ("cf_weight", "div_weight", "div_groups", "div_tau", "tokenizer_eval_step", "letter_sk_epsilon",
                 "letter_sk_iters")
        return {**super().stage_signature(stage), **base, **{k: self.config[k] for k in extra}}

    def calculate_loss(self, interaction):
        """Ranking-guided generation loss: token CE on logits / ``gen_temperature``."""
        ids, mask = self.model_inputs(interaction)
        labels = self.item_codes[interaction[self.POS_ITEM_ID]].contiguous()
        logits = self.llm(input_ids=ids, attention_mask=mask, decoder_input_ids=self._shifted(labels)).logits
        return F.cross_entropy((logits / self.gen_temperature).flatten(0, 1), labels.flatten())
