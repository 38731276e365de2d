"""Batched beam search constrained by a prefix trie of valid code sequences.

The trie is stored as sorted integer edge keys per depth (``parent * V + token``), so the valid
continuations of every beam of every user are found with one ``searchsorted`` per step: no Python
loop over beams, users or tokens. Every finished sequence is a real item, and since beams are
distinct prefixes and codes are one-to-one, no item is returned twice. Decoding is greedy over
log-probabilities (never sampled).
"""

from __future__ import annotations

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


def _unique_first(keys):
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uniq),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return uniq, first


@torch.no_grad()
def constrained_beam_search(step_fn, trie: PrefixTrie, batch_size: int, beam_size: int, level_ranges,
                            device="cpu"):
    """Return ``items [B, beam]`` (``-1`` where fewer valid items exist) and their log-probs.

    ``step_fn(prefix [B * beam, t]) -> log_probs [B * beam, V]`` gives the next-token
    distribution after each prefix; ``level_ranges[t] = (lo, hi)`` is the token range of level t.
    """
    B = batch_size
    scores = torch.full((B, beam_size), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at the start, so no prefix is expanded twice
    nodes = torch.zeros(B, beam_size, dtype=torch.long, device=device)
    prefix = torch.zeros(B, beam_size, 0, dtype=torch.long, device=device)
    for t, (lo, hi) in enumerate(level_ranges):
        log_probs = step_fn(prefix.reshape(B * beam_size, t))[:, lo:hi]
        K = hi - lo
        valid, child = trie.step(nodes.reshape(-1), t, torch.arange(lo, hi, device=device))
        total = scores.reshape(-1, 1) + log_probs.masked_fill(~valid, float("-inf"))
        top = total.reshape(B, beam_size * K).topk(beam_size, dim=1)
        beam_idx, token = top.indices // K, top.indices % K
        scores = top.values
        nodes = child.reshape(B, beam_size * K).gather(1, top.indices)
        prefix = torch.cat([prefix.gather(1, beam_idx.unsqueeze(-1).expand(-1, -1, t)),
                            (token + lo).unsqueeze(-1)], dim=2)
    items = trie.leaf_item[nodes]
    items = torch.where(torch.isfinite(scores), items, torch.full_like(items, -1))
    return items, scores
