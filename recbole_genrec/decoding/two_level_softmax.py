"""The two-level (cluster, item) softmax and its single-step decoders (TwoLevelLLMRec, Sec. 4).

Items ``1..N-1`` (0 is RecBole's padding item) are partitioned into clusters with learnable centroid
embeddings. With ``h [B, d]`` an LLM output and ``e [N, d]`` the item vectors:

- ``P(c | h) = softmax_c(h . centroid_c)`` (Eq. 2);
- ``P(t | c, h) = softmax over the items of c of h . e_t`` (Eq. 3);
- ``P(t | h) = P(c(t) | h) P(t | c(t), h)`` (Eq. 4).

Text tokens (``n_text``, a backbone with a tokenizer) are clusters of their own whose centroid is the
token's LLM embedding (Sec. 4.2), so ``P(v | h) = P(c_v | h)``; they are passed in as ``text_centroids``.

:meth:`loss` projects each member of the batch's target clusters once (Sec. 4.3.1); :meth:`structure_topk`
finds the exact top-k with the bound ``P(t | h) <= P(c(t) | h)`` (Eq. 6); :meth:`ann_keys` gives the
vectors ``e_t + centroid_{c(t)}`` whose maximum inner products with ``h`` approximate the ranking
(Sec. 4.3.2, the per-cluster partition function dropped); :meth:`rerank_topk` ranks such ANN candidates
by their exact Eq. 4 log-probability, computing ``log Z_c(h)`` only for clusters of the candidates.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class TwoLevelSoftmax(nn.Module):
    def __init__(self, n_items: int, n_clusters: int, dim: int, n_text: int = 0):
        super().__init__()
        self.n_items, self.n_clusters, self.n_text = n_items, n_clusters, n_text  # item clusters, text tokens
        self.cluster_emb = nn.Embedding(n_clusters, dim)  # centroid embeddings (Eq. 2)
        nn.init.normal_(self.cluster_emb.weight, std=0.02)
        self.register_buffer("cluster_of", torch.zeros(n_items, dtype=torch.long))
        self._index = None

    def set_clusters(self, labels: torch.Tensor) -> None:
        """Store the cluster of every real item (``[N - 1]``); empty clusters are dropped by
        renumbering (their centroid rows stay unused)."""
        _, compact = torch.unique(labels, return_inverse=True)
        self.cluster_of.zero_()
        self.cluster_of[1:] = compact.to(self.cluster_of.device)
        self._index = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._index = None
        super()._load_from_state_dict(*args, **kwargs)

    def index(self):
        """``members [K, M]`` (item ids, 0 = padding), ``member_mask [K, M]``, ``slot_of [N]`` (an
        item's column in its cluster's row) and ``used [K]`` (clusters that have items)."""
        if self._index is None or self._index[0].device != self.cluster_of.device:
            c = self.cluster_of[1:]
            sizes = torch.bincount(c, minlength=self.n_clusters)
            order = torch.argsort(c, stable=True)
            slot = torch.empty_like(c)
            slot[order] = torch.arange(len(c), device=c.device) - (sizes.cumsum(0) - sizes)[c[order]]
            members = torch.zeros(self.n_clusters, int(sizes.max()), dtype=torch.long, device=c.device)
            members[c, slot] = torch.arange(1, self.n_items, device=c.device)
            member_mask = torch.zeros_like(members, dtype=torch.bool)
            member_mask[c, slot] = True
            self._index = (members, member_mask, torch.cat([slot.new_zeros(1), slot]), sizes > 0)
        return self._index

    def stats(self) -> dict:
        sizes = torch.bincount(self.cluster_of[1:], minlength=self.n_clusters)
        used = sizes[sizes > 0]
        return {"clusters": int(len(used)), "min_size": int(used.min()), "max_size": int(used.max()),
                "mean_size": round(float(used.float().mean()), 1)}

    @property
    def cluster_count(self) -> int:
        """``|C|``: the item clusters and one cluster per text token (Sec. 4.2)."""
        return self.n_clusters + self.n_text

    def cluster_log_probs(self, h: torch.Tensor, text_centroids: torch.Tensor | None = None) -> torch.Tensor:
        """``log P(c | h)`` (Eq. 2), ``[B, K]``, or ``[B, K + n_text]`` with the text tokens' clusters
        (``text_centroids [n_text, d]``); clusters without items get ``-inf``. Without text centroids
        the softmax is over item clusters: ``P(c | h, the next token is an item)``."""
        used = self.index()[3]
        logits = (h @ self.cluster_emb.weight.T).masked_fill(~used, float("-inf"))
        if text_centroids is not None:
            logits = torch.cat([logits, h @ text_centroids.T], 1)
        return logits.log_softmax(-1)

    def loss(self, h: torch.Tensor, target: torch.Tensor, item_vectors: Callable[[torch.Tensor], torch.Tensor],
             text_centroids: torch.Tensor | None = None, is_text: torch.Tensor | None = None):
        """``(-log P(c(t) | h), -log P(t | c(t), h))`` summed over the targets ``t`` and divided by their
        number (their sum is the mean ``-log P(t | h)``, Eq. 4). ``target`` are item ids, or text token
        ids where ``is_text`` (``P(t | c_t, h) = 1``). ``item_vectors(ids)`` is called once, on the
        members of the batch's unique target clusters; each row's logits index into them (Sec. 4.3.1)."""
        members, member_mask, slot_of, _ = self.index()
        is_text = torch.zeros_like(target, dtype=torch.bool) if is_text is None else is_text
        item = ~is_text
        cluster = torch.where(is_text, self.n_clusters + target, self.cluster_of[target.masked_fill(is_text, 0)])
        log_pc = self.cluster_log_probs(h, text_centroids)
        cluster_loss = -log_pc.gather(1, cluster.unsqueeze(1)).sum() / len(h)
        if not item.any():
            return cluster_loss, cluster_loss.new_zeros(())
        h, target, cluster = h[item], target[item], cluster[item]
        unique, inverse = torch.unique(cluster, return_inverse=True)
        sizes = member_mask[unique].sum(1)
        vectors = item_vectors(members[unique][member_mask[unique]])  # [sum(sizes), d], cluster by cluster
        cols = torch.arange(int(sizes.max()), device=h.device)
        rows = (sizes.cumsum(0) - sizes)[inverse].unsqueeze(1) + cols  # row of each member of a target's cluster
        own = cols < sizes[inverse].unsqueeze(1)
        logits = torch.einsum("bd,bmd->bm", h, vectors[rows.masked_fill(~own, 0)]).masked_fill(~own, float("-inf"))
        return cluster_loss, F.cross_entropy(logits, slot_of[target], reduction="sum") / len(is_text)

    def log_probs(self, h: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """``log P(t | h)`` of every item, ``[B, N]`` (Eq. 4; column 0 is ``-inf``), the text clusters
        left out (inference ranks items only, Sec. 3.4)."""
        scores = h @ vectors.T
        c, real = self.cluster_of, scores[:, 1:]
        # per-cluster partition function log Z_c(h) [B, K]: a max-shifted log-sum-exp by scatter
        shift = real.new_full((len(h), self.n_clusters), float("-inf"))
        shift = shift.scatter_reduce(1, c[1:].expand_as(real), real, "amax").detach()
        total = torch.zeros_like(shift).index_add_(1, c[1:], (real - shift[:, c[1:]]).exp())
        log_z = shift + total.log()
        out = self.cluster_log_probs(h)[:, c] + scores - log_z[:, c]
        out[:, 0] = float("-inf")
        return out

    @torch.no_grad()
    def structure_topk(self, h: torch.Tensor, vectors: torch.Tensor, k: int):
        """Exact top-``k`` by hierarchical pruning: clusters in order of ``P(c | h)``; stop once the
        next cluster's bound (Eq. 6) cannot beat the k-th best item found. Returns items ``[B, k]``,
        their ``log P(t | h)`` and the number of clusters visited per row."""
        members, member_mask, _, _ = self.index()
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
            active &= (bound > best[:, -1]) & torch.isfinite(bound)
            rows = active.nonzero().flatten()
            if len(rows) == 0:
                break
            own, own_mask = members[cluster[rows]], member_mask[cluster[rows]]
            logits = torch.einsum("bd,bmd->bm", h[rows], vectors[own]).masked_fill(~own_mask, float("-inf"))
            log_p = (bound[rows].unsqueeze(1) + logits.log_softmax(-1)).masked_fill(~own_mask, float("-inf"))
            values, picked = torch.cat([best[rows], log_p], 1).topk(k, dim=1)
            best[rows] = values
            best_items[rows] = torch.cat([best_items[rows], own], 1).gather(1, picked)
            visited[rows] += 1
        return best_items, best, visited

    def ann_keys(self, vectors: torch.Tensor) -> torch.Tensor:
        """``e_t + centroid_{c(t)}`` for every item ``[N, d]``: MIPS keys of the ANN approximation."""
        return vectors + self.cluster_emb.weight[self.cluster_of]

    def cluster_blocks(self, vectors: torch.Tensor) -> list:
        """The real items' ``vectors`` cluster by cluster: one ``[size_c, d]`` view per cluster into a
        single reordered copy (for :meth:`rerank_topk`; cache it while ``vectors`` are fixed)."""
        members, member_mask, _, _ = self.index()
        return list(vectors[members[member_mask]].split(member_mask.sum(1).tolist()))

    @staticmethod
    def _pair_log_z(h, rows, clusters, blocks):
        """Exact ``log Z_c(h_r)`` (the denominator of Eq. 3) for (row ``r``, cluster ``c``) pairs: one
        matrix product per distinct cluster, with the rows that need it."""
        order = torch.argsort(clusters)
        distinct, counts = torch.unique_consecutive(clusters[order], return_counts=True)
        groups = h[rows[order]].split(counts.tolist())
        out = h.new_empty(len(order))
        out[order] = torch.cat([(g @ blocks[c].T).logsumexp(1) for g, c in zip(groups, distinct.tolist())])
        return out

    @torch.no_grad()
    def rerank_topk(self, h: torch.Tensor, vectors: torch.Tensor, candidates: torch.Tensor, k: int, blocks=None):
        """The top-``k`` of ``candidates [B, m]`` (item ids, e.g. from the ANN search over
        :meth:`ann_keys`; ``0`` = none) by exact ``log P(t | h) = log P(c | h) + h . e_t - log Z_c(h)``
        (Eq. 2-4): items ``[B, k]`` and their exact log-probabilities (``-inf``, item ``0`` where a row
        has fewer than ``k`` candidates). ``log Z_c(h)`` is computed only for (row, cluster) pairs of the
        candidates, and not for all of them: ``log Z_c(h) >= logsumexp`` of the row's candidates in ``c``
        bounds each candidate's log-probability from above (as Eq. 6 does with ``P(c | h)``); rounds take
        each row's ``k`` best-bounded candidates not yet scored and compute their clusters' ``log Z``,
        until no unscored candidate's bound reaches the row's ``k``-th exact score. The result is the
        exact top-``k`` of the candidates. ``blocks``: :meth:`cluster_blocks` of ``vectors`` (cache it)."""
        B, m = candidates.shape
        if k > m:
            raise ValueError(f"cannot re-rank {m} candidates into a top-{k}")
        blocks = self.cluster_blocks(vectors) if blocks is None else blocks
        row, col = (candidates > 0).nonzero(as_tuple=True)  # the real candidates, flattened
        items = candidates[row, col]
        cluster = self.cluster_of[items]
        score = (h[row] * vectors[items]).sum(-1)  # h . e_t
        base = self.cluster_log_probs(h)[row, cluster] + score  # log P(c | h) + h . e_t
        pairs, pair_of = torch.unique(row * self.n_clusters + cluster, return_inverse=True)
        pair_row, pair_cluster = pairs // self.n_clusters, pairs % self.n_clusters
        # lower bound of log Z per pair: log-sum-exp of its candidates' h . e (max-shifted)
        shift = score.new_full((len(pairs),), float("-inf")).scatter_reduce(0, pair_of, score, "amax")
        bound = shift + score.new_zeros(len(pairs)).index_add_(0, pair_of, (score - shift[pair_of]).exp()).log()
        upper = base - bound[pair_of]  # >= the exact log P(t | h)
        log_z = score.new_zeros(len(pairs))
        done = torch.zeros(len(pairs), dtype=torch.bool, device=h.device)
        exact = torch.full((B, m), float("-inf"), device=h.device)
        kth = torch.full((B,), float("-inf"), device=h.device)
        flat = torch.full((B, m), -1, dtype=torch.long, device=h.device)
        flat[row, col] = torch.arange(len(row), device=h.device)
        while True:
            open_ = ~done[pair_of] & (upper + 1e-4 >= kth[row])  # a margin for rounding
            if not open_.any():
                break
            ranked = torch.full((B, m), float("-inf"), device=h.device)
            ranked[row[open_], col[open_]] = upper[open_]
            top, picked = ranked.topk(k, dim=1)
            new = torch.unique(pair_of[flat.gather(1, picked)[torch.isfinite(top)]])
            log_z[new] = self._pair_log_z(h, pair_row[new], pair_cluster[new], blocks)
            done[new] = True
            scored = done[pair_of]
            exact[row[scored], col[scored]] = base[scored] - log_z[pair_of[scored]]
            kth = exact.topk(k, dim=1).values[:, -1]
        values, picked = exact.topk(k, dim=1)
        return candidates.gather(1, picked).masked_fill(torch.isinf(values), 0), values


def faiss_mips_index(keys: torch.Tensor, kind: str = "flat", hnsw_m: int = 32, ef_construction: int | None = None):
    """A faiss inner-product index over ``keys [n, d]``: ``flat`` (exact), ``hnsw`` (approximate; a
    graph of degree ``hnsw_m``, built with breadth ``ef_construction``, faiss' default 40 if ``None``)
    or ``hnsw_sq`` (the same graph over 8-bit scalar-quantised keys: a quarter of the memory traffic,
    approximate scores; for candidates that are re-scored exactly)."""
    import faiss

    keys = keys.detach().float().cpu().contiguous().numpy()
    if kind == "flat":
        index = faiss.IndexFlatIP(keys.shape[1])
    elif kind in ("hnsw", "hnsw_sq"):
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(keys.shape[1], int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWSQ(keys.shape[1], faiss.ScalarQuantizer.QT_8bit, int(hnsw_m),
                                      faiss.METRIC_INNER_PRODUCT)
            index.train(keys)
        if ef_construction is not None:
            index.hnsw.efConstruction = int(ef_construction)
    else:
        raise ValueError(f"ann_index must be 'flat', 'hnsw' or 'hnsw_sq', got {kind!r}")
    index.add(keys)
    return index


def faiss_search(index, queries: torch.Tensor, k: int, offset: int = 0, ef_search: int | None = None):
    """Top-``k`` rows of ``index`` for ``queries``: ids (+ ``offset``) ``[B, k]`` and scores; rows
    faiss could not fill get id ``0`` and score ``-inf``. ``ef_search``: an HNSW index's search breadth
    for this call (faiss does not raise it to ``k`` by itself; ``None``: the index's own, default 16)."""
    import faiss

    params = None
    if ef_search is not None and isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
    scores, ids = index.search(queries.detach().float().cpu().contiguous().numpy(), k, params=params)
    ids, scores = torch.from_numpy(ids).to(queries.device), torch.from_numpy(scores).to(queries.device)
    missing = ids < 0
    return (ids + offset).masked_fill(missing, 0), scores.masked_fill(missing, float("-inf"))
