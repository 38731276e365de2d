"""SETRec: Order-agnostic Identifier for LLM-based Generative Recommendation (Lin et al., 2025).

Each item is a *set* of 1 + ``n_sem`` continuous tokens (Sec. 3.1): a CF token, the item's frozen
SASRec embedding through a trainable linear projection, and ``n_sem`` semantic tokens, chunks of
one autoencoder latent over the item's text embedding (Eq. 3, :mod:`quantize.set_tokenizer`).

History encoding (Sec. 3.2.2): the last ``MAX_ITEM_LIST_LENGTH`` items become
``H x (1 + n_sem)`` input embeddings. All tokens of one item share one position. On a
decoder-only backbone (Qwen2/Llama) the sparse attention mask (Fig. 5b) lets a token see every
token of earlier items and itself, never the other tokens of its own item; on T5 the encoder is
bidirectional and the shared positions are fed to its relative position bias.

Query-guided simultaneous generation (Eq. 5): 1 + ``n_sem`` learnable query vectors yield all
tokens in one forward pass, through the decoder for T5 (an identity self-attention mask: each query sees
only itself and the encoded history, so their positions do not matter) or appended after the history for decoder-only
backbones (each query sees the whole history and itself). No autoregressive loop.

Training (Eq. 6, 8): per query a softmax over that dimension's token corpus (inner products with
the tokens of every item), **averaged** over the queries in use as in the official code (one
``CrossEntropyLoss(reduction="mean")`` over all queries' rows), plus ``alpha`` x the autoencoder's
reconstruction loss (Eq. 4). Grounding (Eq. 7): score = (1 - beta) * CF score + beta * **sum** of the
``n_sem`` semantic scores (the official weights ``[1 - beta, beta, ..., beta]``); ``beta`` is chosen
on the validation data after training (``SETRecTrainer``), never on test.
Items unseen in training (cold, ``warm_item`` buffer) are scored through their text alone: their CF
token is the zero-CF one (``cf_proj(0)``), never their untrained SASRec row. (The official code uses
the SASRec rows of all items.)

Ablations (Sec. 4.3.1): ``setrec_use_cf``, ``setrec_use_sem``, ``setrec_learn_queries`` (False:
random frozen queries) and ``setrec_sparse_mask`` (False: the original causal mask with
sequential positions).
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F
from recbole.utils import set_color
from torch import nn

from recbole_genrec.compat import safe_torch_load
from recbole_genrec.llm.backbone import apply_lora, backbone_from_config, transformer_body
from recbole_genrec.model.base import GenerativeRecommender, load_cf_item_embeddings, train_cf_model
from recbole_genrec.quantize.set_tokenizer import SetTokenizer
from recbole_genrec.trainer import StagedTrainer


class SETRecTrainer(StagedTrainer):
    """Staged trainer that picks the grounding weight beta on validation data after training."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if valid_data is None or not (self.model.use_cf and self.model.use_sem):
            return result
        start = time.perf_counter()  # choosing beta is part of training: it joins the run's train time
        self.wait_for_rank0()
        if saved and os.path.isfile(self.saved_model_file):
            checkpoint = safe_torch_load(self.saved_model_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
        best_beta, best_score, best_result = None, None, None
        for beta in self.config["setrec_beta_grid"]:
            self.model.beta.fill_(float(beta))
            valid_result = self.evaluate(valid_data, load_best_model=False, show_progress=False)
            score = valid_result[self.valid_metric]
            self.logger.info(f"beta {beta}: valid {self.valid_metric} {score:.4f}")
            better = best_score is None or (score > best_score if self.valid_metric_bigger else score < best_score)
            if better:
                best_beta, best_score, best_result = float(beta), score, valid_result
        self.model.beta.fill_(best_beta)
        self.logger.info(set_color("grounding beta", "blue") + f" = {best_beta} (chosen on validation)")
        if saved:
            self.best_valid_score = best_score
            self._save_checkpoint(self.start_epoch, verbose=False)
        self.run_train_time_s += time.perf_counter() - start
        return best_score, best_result


class SETRec(GenerativeRecommender):
    stages = ("cf",)
    trainer_class = SETRecTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.n_sem = config["n_sem"]
        self.alpha = config["alpha"]
        self.history = self.max_seq_length
        self.use_cf = config["setrec_use_cf"]
        self.use_sem = config["setrec_use_sem"] and self.n_sem > 0
        self.sparse_mask = config["setrec_sparse_mask"]
        if not (self.use_cf or self.use_sem):
            raise ValueError("SETRec needs at least one of setrec_use_cf / setrec_use_sem")
        backbone = backbone_from_config(config, vocab_size=config["setrec_vocab_size"] or 8)
        if config["use_lora"]:
            backbone = apply_lora(backbone, config["lora_r"], config["lora_alpha"], config["lora_dropout"])
        self.backbone_family = backbone.family
        self.is_encoder_decoder = backbone.is_encoder_decoder
        self.llm = backbone.model
        d = backbone.hidden_size
        text_emb = self.item_text_embeddings(config, dataset)
        self.register_buffer("item_text_emb", text_emb, persistent=False)
        self.register_buffer("cf_item_emb", torch.zeros(self.n_items, config["cf_hidden_size"]))
        from recbole_genrec.evaluation.runs import warm_items  # (runs imports the model registry)

        self.register_buffer("warm_item", warm_items(dataset))  # [n_items] bool, saved with the checkpoint
        self.cf_proj = nn.Linear(config["cf_hidden_size"], d)
        self.sem_tokenizer = SetTokenizer(text_emb.shape[1], d, max(self.n_sem, 1), tuple(config["ae_hidden"]))
        self.n_query = 1 + self.n_sem
        self.queries = nn.Parameter(torch.randn(self.n_query, d) * 0.02, requires_grad=config["setrec_learn_queries"])
        self.register_buffer("beta", torch.tensor(float(config["setrec_beta"])))
        # what one-pass inference reuses across users, valid while the parameters are unchanged: filled
        # in eval mode only, emptied by train() / eval() / load_state_dict (never holds beta, which
        # SETRecTrainer changes in eval mode)
        self._eval_cache = {}

    # ----- CF stage -------------------------------------------------------------------
    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False):
        if self.config["cf_model_path"]:
            emb = load_cf_item_embeddings(self.config["cf_model_path"], self.n_items)
        else:
            cf = train_cf_model(self.config, train_data, valid_data, "SASRec",
                                overrides={"hidden_size": self.config["cf_hidden_size"], "loss_type": "CE"},
                                epochs=stage_config["epochs"], learning_rate=stage_config["learning_rate"],
                                show_progress=show_progress)
            emb = cf.item_embedding.weight.detach()
        if emb.shape[1] != self.cf_item_emb.shape[1]:
            raise ValueError(f"cf_model_path embeddings are {emb.shape[1]}-d but cf_hidden_size is "
                             f"{self.cf_item_emb.shape[1]}")
        self.cf_item_emb.copy_(emb.to(self.cf_item_emb.device))
        return {"cf_dim": emb.shape[1]}

    def stage_state_dict(self, stage):
        return {"cf_item_emb": self.cf_item_emb.clone()}

    def load_stage_state_dict(self, stage, state):
        self.cf_item_emb.copy_(state["cf_item_emb"])

    def stage_signature(self, stage):
        return {k: self.config[k] for k in ("cf_model_path", "cf_hidden_size", "MAX_ITEM_LIST_LENGTH")} | {
            "n_items": self.n_items} | self.cf_stage_signature()

    # ----- tokens ---------------------------------------------------------------------
    def item_tokens(self, text_emb=None, cf_emb=None):
        """Set identifiers of items: ``[N, 1 + n_sem, d]`` (CF token first). Defaults: all items, with
        zero CF embeddings for items unseen in training (``warm_item``)."""
        text_emb = self.item_text_emb if text_emb is None else text_emb
        if cf_emb is None:
            cf_emb = self.cf_item_emb * self.warm_item.unsqueeze(1).to(self.cf_item_emb.dtype)
        cf = self.cf_proj(cf_emb).unsqueeze(1)
        sem = self.sem_tokenizer(text_emb)[:, : self.n_sem]
        tokens = torch.cat([cf, sem], 1)
        keep = torch.tensor([self.use_cf] + [self.use_sem] * self.n_sem, device=tokens.device)
        return tokens * keep.view(1, -1, 1)  # an ablated dimension contributes nothing

    def _slot_mask(self):
        return torch.tensor([self.use_cf] + [self.use_sem] * self.n_sem)

    def history_inputs(self, item_seq, item_len, tokens):
        """Flattened history embeddings ``[B, H * Q, d]``, item validity ``[B, H]``, item positions."""
        items, valid = self.last_items(item_seq, item_len, self.history)
        slots = self._slot_mask()
        # index_select, not tokens[items]: the backward of advanced indexing accumulates repeated items in
        # a thread-dependent order on CPU (a seed no longer fixed the result on two threads)
        emb = tokens.index_select(0, items.flatten()).view(*items.shape, *tokens.shape[1:])
        if not bool(slots.all()):
            emb = emb[:, :, slots.to(items.device)]  # [B, H, q, d]: only the dimensions in use
        B, H, q, d = emb.shape
        return emb.reshape(B, H * q, d), valid, q

    # ----- forward (Eq. 5) --------------------------------------------------------------
    def generate_tokens(self, item_seq, item_len, tokens=None):
        """One forward pass: the generated token of every dimension, ``[B, 1 + n_sem, d]``."""
        tokens = self.item_tokens() if tokens is None else tokens
        hist, valid, q = self.history_inputs(item_seq, item_len, tokens)
        B, H = valid.shape
        if self.is_encoder_decoder:
            return self._generate_t5(hist, valid, q)
        return self._generate_decoder_only(hist, valid, q)

    def _generate_t5(self, hist, valid, q):
        B, H = valid.shape
        mask = valid.repeat_interleave(q, 1).long()
        positions = torch.arange(H, device=hist.device).repeat_interleave(q)
        encoder = self.llm.get_encoder()
        cache = None if self.training else self._eval_cache
        with _shared_positions(encoder, positions if self.sparse_mask else None, cache):
            enc = encoder(inputs_embeds=hist, attention_mask=mask).last_hidden_state
        Q = self.n_query
        # each query attends only to itself (identity self-attention mask), so the relative position
        # bias is the same constant for all of them: order-free, in one decoder pass. One mask for
        # every user ([1, 1, Q, Q], broadcast over the batch)
        eye = torch.eye(Q, dtype=torch.bool, device=hist.device)
        self_mask = torch.zeros(1, 1, Q, Q, dtype=enc.dtype, device=hist.device)
        self_mask = self_mask.masked_fill(~eye, torch.finfo(enc.dtype).min)
        return self.llm.get_decoder()(
            inputs_embeds=self.queries.unsqueeze(0).expand(B, Q, -1), attention_mask=self_mask,
            encoder_hidden_states=enc, encoder_attention_mask=mask, use_cache=False,
        ).last_hidden_state

    def attention_mask_4d(self, valid, q, dtype):
        """Sparse mask (Fig. 5b) over ``[history tokens, queries]``: ``[B, 1, S, S]`` additive."""
        B, H = valid.shape
        Q = self.n_query
        device = valid.device
        item_of = torch.cat([torch.arange(H, device=device).repeat_interleave(q),
                             torch.full((Q,), H, device=device)])
        idx = torch.arange(len(item_of), device=device)
        if self.sparse_mask:
            allowed = (item_of[None, :] < item_of[:, None]) | (idx[None, :] == idx[:, None])
        else:  # ablation: the ordinary causal mask over the flattened sequence
            allowed = idx[None, :] <= idx[:, None]
        key_valid = torch.cat([valid.repeat_interleave(q, 1), torch.ones(B, Q, dtype=torch.bool, device=device)], 1)
        allowed = allowed.unsqueeze(0) & key_valid.unsqueeze(1)
        allowed = allowed | torch.eye(len(item_of), dtype=torch.bool, device=device).unsqueeze(0)
        mask = torch.zeros(B, 1, len(item_of), len(item_of), dtype=dtype, device=device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)

    def _generate_decoder_only(self, hist, valid, q):
        return self.decoder_only_states(hist, valid, q)[:, -self.n_query:]

    def decoder_only_states(self, hist, valid, q):
        """Last hidden states ``[B, H * q + Q, d]`` of ``[history tokens, queries]``."""
        B, H = valid.shape
        Q = self.n_query
        inputs = torch.cat([hist, self.queries.unsqueeze(0).expand(B, Q, -1)], 1)
        if self.sparse_mask:
            pos = torch.cat([torch.arange(H, device=hist.device).repeat_interleave(q),
                             torch.full((Q,), H, device=hist.device)])
        else:
            pos = torch.arange(inputs.shape[1], device=hist.device)
        mask = self.attention_mask_4d(valid, q, inputs.dtype)
        return transformer_body(self.llm)(inputs_embeds=inputs, attention_mask=mask,
                                          position_ids=pos.unsqueeze(0).expand(B, -1), use_cache=False).last_hidden_state

    # ----- losses and scores (Eq. 6-8) ------------------------------------------------------
    def dimension_scores(self, generated, tokens):
        """Inner products per dimension: ``[B, 1 + n_sem, N]``."""
        return torch.einsum("bqd,nqd->bqn", generated, tokens)

    def calculate_loss(self, interaction):
        """Eq. 8: (mean over used dimensions of the Eq. 6 CE, ``alpha`` x Eq. 4 reconstruction)."""
        tokens = self.item_tokens()
        generated = self.generate_tokens(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], tokens)
        logits = self.dimension_scores(generated, tokens)[:, :, 1:]  # column 0 is padding
        target = interaction[self.POS_ITEM_ID] - 1
        used = self._slot_mask().nonzero().flatten().tolist()
        # averaged like the official T54Rec.forward (one mean CE over n_query x B rows), not summed
        gen_loss = torch.stack([F.cross_entropy(logits[:, k], target) for k in used]).mean()
        items = torch.unique(torch.cat([interaction[self.ITEM_SEQ].flatten(), interaction[self.POS_ITEM_ID]]))
        items = items[items > 0]
        rec_loss = self.sem_tokenizer.reconstruction_loss(self.item_text_emb[items])
        return gen_loss, self.alpha * rec_loss

    def ground(self, generated, tokens):
        """Eq. 7: (1 - beta) * CF score + beta * sum of the n_sem semantic scores, for every item
        (official weights ``[1 - beta, beta, ..., beta]`` in ``model_t5.py`` ``T54Rec.predict``)."""
        scores = self.dimension_scores(generated, tokens)
        cf, sem = scores[:, 0], scores[:, 1:].sum(1)
        if not self.use_sem:
            return cf
        if not self.use_cf:
            return sem
        return (1 - self.beta) * cf + self.beta * sem

    def grounding_weights(self):
        """Eq. 7's weight of each dimension's score, ``[1 + n_sem]`` (an unused dimension: 0)."""
        if not self.use_sem:
            w_cf, w_sem = torch.ones_like(self.beta), torch.zeros_like(self.beta)
        elif not self.use_cf:
            w_cf, w_sem = torch.zeros_like(self.beta), torch.ones_like(self.beta)
        else:
            w_cf, w_sem = 1 - self.beta, self.beta
        return torch.cat([w_cf.view(1), w_sem.view(1).expand(self.n_sem)])

    def ground_catalogue(self, generated):
        """:meth:`ground` over the cached catalogue (eval mode) as one ``[B, Q * d] x [Q * d, N]``
        product: each generated token weighted by its dimension's grounding weight, against the
        catalogue's set tokens laid out once (no ``[B, Q, N]`` per-dimension scores and no per-batch
        re-layout of the catalogue). Equal to :meth:`ground` up to float rounding."""
        table = self._eval_cache.get("score_table")
        if table is None:
            tokens = self.catalogue_tokens()
            table = tokens.reshape(len(tokens), -1).t().contiguous()  # [Q * d, N]
            self._eval_cache["score_table"] = table
        weighted = generated * self.grounding_weights().to(generated.dtype).view(1, -1, 1)
        return weighted.reshape(len(generated), -1) @ table

    def catalogue_tokens(self):
        """``item_tokens()`` of the catalogue, cached while the model is in eval mode."""
        if self.training:
            self._eval_cache = {}
            return self.item_tokens()
        if "tokens" not in self._eval_cache:
            self._eval_cache["tokens"] = self.item_tokens()
        return self._eval_cache["tokens"]

    def train(self, mode=True):
        self._eval_cache = {}
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._eval_cache = {}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def score_items(self, interaction, text_emb=None, cf_emb=None):
        """Scores of arbitrary items given their text (and CF) embeddings: how items unseen in
        training are recommended. ``cf_emb`` defaults to zeros (no interactions)."""
        tokens_all = self.catalogue_tokens()
        generated = self.generate_tokens(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], tokens_all)
        if text_emb is None:
            return self.ground(generated, tokens_all) if self.training else self.ground_catalogue(generated)
        if cf_emb is None:
            cf_emb = torch.zeros(len(text_emb), self.cf_item_emb.shape[1], device=text_emb.device)
        return self.ground(generated, self.item_tokens(text_emb, cf_emb))

    def full_sort_predict(self, interaction):
        scores = self.score_items(interaction)
        scores[:, 0] = float("-inf")
        return scores

    def predict(self, interaction):
        scores = self.score_items(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)


@contextlib.contextmanager
def _shared_positions(encoder, positions, cache=None):
    """Feed item-level positions to T5's relative position bias (tokens of an item share one).
    ``cache`` (eval mode: the model's ``_eval_cache``) keeps the bias, which is the same for every user."""
    if positions is None:
        yield
        return
    attn = encoder.block[0].layer[0].SelfAttention

    def compute_bias(query_length, key_length, device=None, past_seen_tokens=0):
        pos = positions.to(device or attn.relative_attention_bias.weight.device)
        key = ("position_bias", len(pos), str(pos.device))
        use_cache = cache is not None and not torch.is_grad_enabled()  # (a bias with grad stays fresh)
        if use_cache and key in cache and torch.equal(cache[key][0], pos):
            return cache[key][1]
        bucket = attn._relative_position_bucket(
            pos[None, :] - pos[:, None], bidirectional=not attn.is_decoder,
            num_buckets=attn.relative_attention_num_buckets, max_distance=attn.relative_attention_max_distance,
        )
        bias = attn.relative_attention_bias(bucket).permute([2, 0, 1]).unsqueeze(0)
        if use_cache:
            cache[key] = (pos, bias)
        return bias

    attn.compute_bias = compute_bias
    try:
        yield
    finally:
        del attn.compute_bias
