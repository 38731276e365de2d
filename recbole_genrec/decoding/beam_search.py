"""Batched beam search constrained by a prefix trie of valid code sequences.

The trie is stored as sorted integer edge keys per depth (``parent * V + token``), so the valid
continuations of every beam of every user are found with one ``searchsorted`` per step: no Python
loop over beams, users or tokens. Every finished sequence is a real item, and since beams are
distinct prefixes and codes are one-to-one, no item is returned twice. Decoding is greedy over
log-probabilities (never sampled).

The same engine drives an uncached ``step_fn(prefix)`` (re-reads the whole prefix each step) or a
KV-cached stepper (one new token per beam per step; the engine reorders the cache by the chosen
parent beams): :func:`seq2seq_stepper` (T5) and :func:`causal_stepper` (decoder-only).
"""

from __future__ import annotations

import inspect

import torch


class PrefixTrie:
    """Prefix trie over ``sequences [n, D]`` (token ids) of the items ``item_ids [n]``."""

    def __init__(self, sequences: torch.Tensor, item_ids: torch.Tensor, vocab_size: int):
        if len(torch.unique(sequences, dim=0)) != len(sequences):
            raise ValueError("PrefixTrie needs one-to-one sequences: two items share a code sequence")
        self.depth, self.vocab_size = sequences.shape[1], vocab_size
        self.keys, self.children = [], []
        parent = torch.zeros(len(sequences), dtype=torch.long)
        for t in range(self.depth):
            _, child = torch.unique(sequences[:, : t + 1], dim=0, return_inverse=True)
            keys = parent * vocab_size + sequences[:, t]
            keys, first = _unique_first(keys)
            self.keys.append(keys)
            self.children.append(child[first])
            parent = child
        # leaves are numbered by the unique full sequences: map leaf -> item
        self.leaf_item = torch.empty(len(sequences), dtype=torch.long)
        self.leaf_item[parent] = item_ids

    def to(self, device):
        self.keys = [k.to(device) for k in self.keys]
        self.children = [c.to(device) for c in self.children]
        self.leaf_item = self.leaf_item.to(device)
        return self

    def step(self, nodes: torch.Tensor, depth: int, tokens: torch.Tensor):
        """For parents ``nodes [M]`` and candidate ``tokens [K]``: ``valid [M, K]``, ``child [M, K]``."""
        keys = nodes.unsqueeze(1) * self.vocab_size + tokens.unsqueeze(0)
        table = self.keys[depth]
        pos = torch.searchsorted(table, keys).clamp(max=len(table) - 1)
        valid = table[pos] == keys
        return valid, torch.where(valid, self.children[depth][pos], torch.zeros_like(pos))


def item_trie(codes: torch.Tensor, vocab_size: int, allowed: torch.Tensor | None = None) -> PrefixTrie:
    """The trie over the code sequences ``codes[1:]`` of items ``1 .. n-1`` (row 0: the padding
    item), or over the ``allowed`` items only (``[n]`` bool, e.g. a protocol's cold items), on the
    device of ``codes``."""
    items = torch.arange(1, len(codes))
    if allowed is not None:
        items = items[allowed[1:].cpu()]
        if len(items) == 0:
            raise ValueError("item_trie: no allowed item to decode")
    return PrefixTrie(codes.cpu()[items], items, vocab_size).to(codes.device)


def _unique_first(keys):
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return uniq, first


@torch.no_grad()
def constrained_beam_search(step_fn, trie: PrefixTrie, batch_size: int, beam_size: int, level_ranges,
                            device="cpu", cached=False, reorder=None):
    """Return ``items [B, beam]`` (``-1`` where fewer valid items exist) and their log-probs.

    ``level_ranges[t] = (lo, hi)`` is the token range of level t. Rows are ``b * beam + k`` (beam k
    of user b). Two kinds of ``step_fn``:

    - ``cached=False``: ``step_fn(prefix [B * beam, t]) -> log_probs [B * beam, V]``, the
      next-token distribution after each whole prefix (the model re-reads it every step).
    - ``cached=True``: a stateful stepper ``step_fn(last_tokens, state) -> (log_probs, state)``.
      The first call gets ``(None, None)`` (run the prompt / start token, build the state); each
      later call gets the tokens just chosen ``[B * beam]`` and the state of their parent beams:
      after every step the engine applies ``reorder(state, index)`` with the flat parent row
      ``index [B * beam] = b * beam + parent_beam`` (default :func:`reorder_state`: transformers
      ``Cache`` objects, legacy key/value tuples, tensors, dicts of them). ``log_probs`` may have
      ``B`` rows on the first call (one per user): the state is then expanded to ``B * beam``
      rows by the same reorder, so the prompt is encoded once per user, not once per beam.
    """
    B = batch_size
    reorder = reorder or reorder_state
    scores = torch.full((B, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at the start, so no prefix is expanded twice
    nodes = torch.zeros(B, beam_size, dtype=torch.long, device=device)
    prefix = torch.zeros(B, beam_size, 0, dtype=torch.long, device=device)
    state, last = None, None
    for t, (lo, hi) in enumerate(level_ranges):
        if cached:
            log_probs, state = step_fn(last, state)
            if t == 0 and log_probs.shape[0] == B and beam_size > 1:  # one row per user: expand
                log_probs = log_probs.repeat_interleave(beam_size, 0)
                state = reorder(state, torch.arange(B, device=device).repeat_interleave(beam_size))
        else:
            log_probs = step_fn(prefix.reshape(B * beam_size, t))
        log_probs = log_probs[:, lo:hi]
        K = hi - lo
        valid, child = trie.step(nodes.reshape(-1), t, torch.arange(lo, hi, device=device))
        total = scores.reshape(-1, 1) + log_probs.masked_fill(~valid, float("-inf"))
        top = total.reshape(B, beam_size * K).topk(beam_size, dim=1)
        beam_idx, token = top.indices // K, top.indices % K
        scores = top.values
        nodes = child.reshape(B, beam_size * K).gather(1, top.indices)
        prefix = torch.cat([prefix.gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, t)),
                            (token + lo).unsqueeze(-1)], dim=2)
        if cached and t + 1 < len(level_ranges):
            rows = torch.arange(B, device=device).unsqueeze(1) * beam_size + beam_idx
            state = reorder(state, rows.reshape(-1))
            last = (token + lo).reshape(-1)
    items = trie.leaf_item[nodes]
    items = torch.where(torch.isfinite(scores), items, torch.full_like(items, -1))
    return items, scores


def reorder_state(state, index: torch.Tensor):
    """Rows ``index`` of a decoding state (in place for a transformers ``Cache``): a ``Cache``
    (``reorder_cache``: every layer's keys and values, self- and cross-attention), a tensor
    (batch-first), or a dict / tuple / list of them; anything else is returned as is."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index.to(state.device))
    if hasattr(state, "reorder_cache"):
        state.reorder_cache(index)
        return state
    if isinstance(state, dict):
        return {k: reorder_state(v, index) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        return type(state)(reorder_state(v, index) for v in state)
    return state


# ----- KV-cached steppers over transformers backbones ----------------------------------------
def _cache_names(llm):
    """(forward keyword, output attribute) of the KV cache: ``cache`` in transformers >= 5.x,
    ``past_key_values`` before (a peft wrapper is looked through)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return name, name


def _log_softmax_last(logits):
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def seq2seq_stepper(llm, hidden, mask, start_id: int, embed=None):
    """Cached decoder steps of an encoder-decoder (T5) over encoder states ``hidden [B, S, d]``
    (one row per user) with ``mask [B, S]``: the first call decodes the start token for the B
    users; later calls feed one token per beam, reusing the self-attention cache (grows one
    position a step) and the cross-attention cache (computed once). ``embed(ids)`` gives input
    embeddings (``decoder_inputs_embeds``) when the model builds its own; else ids are fed."""
    arg, out_attr = _cache_names(llm)

    def step(last, state):
        if state is None:
            tokens = torch.full((hidden.shape[0], 1), start_id, dtype=torch.long, device=hidden.device)
            state = {"hidden": hidden, "mask": mask, "cache": None}
        else:
            tokens = last.unsqueeze(1)
        dec = {"decoder_inputs_embeds": embed(tokens)} if embed is not None else {"decoder_input_ids": tokens}
        out = llm(encoder_outputs=(state["hidden"],), attention_mask=state["mask"], use_cache=True,
                  **{arg: state["cache"]}, **dec)
        state["cache"] = getattr(out, out_attr)
        return _log_softmax_last(out.logits), state

    return step


def causal_stepper(llm, prompt_embeds, prompt_mask, embed):
    """Cached steps of a decoder-only backbone: the first call runs the left-padded prompt
    (``prompt_embeds [B, S, d]``, ``prompt_mask [B, S]``, position ids counted over real tokens)
    once per user; each later call feeds one token per beam with the attention mask extended by
    one column and the next position id. ``embed(ids)`` gives the input embeddings."""
    arg, out_attr = _cache_names(llm)

    def step(last, state):
        if state is None:
            mask = prompt_mask.long()
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            out = llm(inputs_embeds=prompt_embeds, attention_mask=mask, position_ids=pos, use_cache=True,
                      logits_to_keep=1, **{arg: None})
            state = {"mask": mask, "next_pos": pos[:, -1:] + 1}
        else:
            mask = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            out = llm(inputs_embeds=embed(last.unsqueeze(1)), attention_mask=mask, position_ids=state["next_pos"],
                      use_cache=True, logits_to_keep=1, **{arg: state["cache"]})
            state = {"mask": mask, "next_pos": state["next_pos"] + 1}
        state["cache"] = getattr(out, out_attr)
        return _log_softmax_last(out.logits), state

    return step


def full_scores(items: torch.Tensor, scores: torch.Tensor, n_items: int) -> torch.Tensor:
    """``[B, n_items]`` scores for RecBole's full-ranking evaluator: ``-inf`` except the decoded
    ``items [B, beam]`` (``-1`` = none), which carry their sequence log-probabilities."""
    out = torch.full((items.shape[0], n_items), float("-inf"), device=scores.device)
    found = items >= 0
    out.scatter_(1, items.clamp(min=0), torch.where(found, scores, torch.full_like(scores, float("-inf"))))
    out[:, 0] = float("-inf")
    return out
