"""Code tables: item -> tuple of codes, made one-to-one, and their LLM token ids.

Collisions (two items with the same tuple) are resolved by
- ``suffix`` (TIGER, default): one more level whose code is the item's rank among the items sharing
  its tuple (0 for the first), so every item gets L + 1 codes;
- ``sinkhorn`` (LETTER): colliding items are re-assigned on the last level by a Sinkhorn-balanced
  transport plan over the last-level distances (up to ``rounds`` times); whatever still collides
  then gets the dedup suffix, so the table is always one-to-one.
"""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_genrec.quantize.kmeans import sinkhorn
from recbole_genrec.quantize.rq_vae import collision_rate


# TIGER's codebooks (Rajput et al. 2023, Sec. 4.1): 256 codes per level for Amazon Beauty's 12,101
# items, i.e. about 47 items share a first-level code, which is what lets items share structure.
ITEMS_PER_FIRST_CODE = 48


def catalogue_codebook_size(value, n_items: int, low: int = 16, high: int = 256) -> int:
    """``codebook_size`` as configured, or for ``auto`` sized to the catalogue: about
    :data:`ITEMS_PER_FIRST_CODE` items per first-level code (TIGER's ratio), between ``low`` and
    ``high``. 256 codes for ~1k items would give each item nearly its own first code, so the codes
    would be item ids the recommender memorises (35 codes for ml-100k's 1,682 items)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return int(min(high, max(low, round(n_items / ITEMS_PER_FIRST_CODE))))
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"codebook_size: 'auto' or an integer >= 2, got {value!r}")
    return value


def dedup_suffix(codes: torch.Tensor) -> torch.Tensor:
    """Append the rank of each row among identical rows: ``[n, L] -> [n, L + 1]``."""
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    sorted_groups = inverse[order]
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    positions = torch.arange(len(codes), device=codes.device)
    group_start = torch.cummax(torch.where(starts, positions, torch.zeros_like(positions)), 0).values
    rank = torch.empty_like(inverse)
    rank[order] = positions - group_start
    return torch.cat([codes, rank.unsqueeze(1)], 1)


def sinkhorn_rebalance(codes: torch.Tensor, last_costs: torch.Tensor, epsilon=0.003, rounds=20) -> torch.Tensor:
    """Re-assign the last level of colliding items with a Sinkhorn plan (LETTER/LC-Rec)."""
    codes = codes.clone()
    for _ in range(rounds):
        _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        colliding = (counts[inverse] > 1).nonzero().flatten()
        if len(colliding) == 0:
            break
        plan = sinkhorn(last_costs[colliding], epsilon)
        codes[colliding, -1] = plan.argmax(1)
    return codes


def build_code_table(codes: torch.Tensor, method="suffix", last_costs=None, epsilon=0.003,
                     suffix_size=None) -> torch.Tensor:
    """One-to-one codes for the items (rows). Logs the collision rate before and after."""
    logger = getLogger()
    before = collision_rate(codes)
    if method == "sinkhorn":
        if last_costs is None:
            raise ValueError("collision handling 'sinkhorn' needs the last-level distances")
        codes = sinkhorn_rebalance(codes, last_costs, epsilon)
    elif method != "suffix":
        raise ValueError(f"collision_handling must be 'suffix' or 'sinkhorn', got {method!r}")
    table = dedup_suffix(codes)
    needed = int(table[:, -1].max()) + 1 if len(table) else 1
    if suffix_size is not None and needed > suffix_size:
        raise ValueError(
            f"{needed} items share one code tuple but the dedup level has {suffix_size} codes; "
            f"train the tokenizer longer or enlarge codebook_size"
        )
    logger.info(f"code table: collision rate {before:.4f} before resolution ({method}), "
                f"max {needed} items per tuple, {collision_rate(table):.4f} after")
    return table


def code_tokens(table: torch.Tensor, offset: int, level_size: int) -> torch.Tensor:
    """Token ids of a code table: code ``c`` at level ``l`` is ``offset + l * level_size + c``."""
    levels = torch.arange(table.shape[1], device=table.device)
    return offset + levels * level_size + table
