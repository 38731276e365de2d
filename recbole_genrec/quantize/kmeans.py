"""Small k-means helpers used to initialise and regularise codebooks."""

from __future__ import annotations

import math

import torch


def kmeans(x: torch.Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means on ``x [n, d]``; returns ``k`` centroids ``[k, d]``.

    With fewer points than clusters the missing centroids are points plus small noise.
    """
    n = x.shape[0]
    if n >= k:
        centroids = x[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        extra = x[torch.randint(0, n, (k - n,), generator=generator)]
        centroids = torch.cat([x, extra + 1e-3 * torch.randn(extra.shape, generator=generator)])
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        moved = counts.squeeze(1) > 0
        centroids[moved] = sums[moved] / counts[moved]
    return centroids


def balanced_assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Assign each row of ``x`` to a centroid with at most ``ceil(n / k)`` rows per centroid.

    Greedy on the globally sorted distances: the size-constrained k-means step LETTER uses to
    group codewords.
    """
    n, k = x.shape[0], centroids.shape[0]
    cap = -(-n // k)
    order = torch.argsort(torch.cdist(x, centroids).flatten()).tolist()
    assign, load, left = [-1] * n, [0] * k, n
    for flat in order:  # plain lists: this loop runs every epoch under LETTER
        i, c = divmod(flat, k)
        if assign[i] < 0 and load[c] < cap:
            assign[i] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assign, dtype=torch.long)


def constrained_kmeans(x: torch.Tensor, k: int, iters: int = 5, generator=None) -> torch.Tensor:
    """Size-constrained k-means labels for ``x`` (clusters of at most ``ceil(n / k)`` rows)."""
    centroids = kmeans(x, k, iters=iters, generator=generator)
    for _ in range(iters):
        assign = balanced_assign(x, centroids)
        for c in range(k):
            members = assign == c
            if members.any():
                centroids[c] = x[members].mean(0)
    return balanced_assign(x, centroids)


def sinkhorn(cost: torch.Tensor, epsilon: float, iters: int = 100) -> torch.Tensor:
    """Entropic optimal transport plan between rows (uniform) and columns (uniform) of ``cost``.

    Used to balance the last-level assignment (LETTER): ``argmax`` of the plan per row. The costs
    are centred and scaled to [-1, 1] (as LETTER's ``center_distance_for_constraint``) and the
    iterations run in log-space in float64, so a small ``epsilon`` or a wide cost range cannot
    underflow to all-zero rows. Returns ``[n, k]`` whose rows sum to 1 and columns to ``n / k``.
    """
    c = cost.double()
    middle = (c.max() + c.min()) / 2
    c = (c - middle) / (c.max() - middle).clamp(min=1e-12)
    log_q = -c / epsilon
    n, k = log_q.shape
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)  # rows: 1/n each
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # columns: 1/k each
    return (log_q + math.log(n)).exp().to(cost.dtype)
