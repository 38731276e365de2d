"""``eval_mask_history: True``: at evaluation, a user's history items score ``-inf``.

History = every item the user interacted with in the splits before the evaluated one: the
training split for validation, training + validation for test (targets and, for sequential
datasets, the items of their history lists). Under leave-one-out that is every item before the
target. It is the same mask for every model of a comparison, RecBole's own included, whatever
each model's history cap. TokenRec's official evaluation masks history this way; on data without
repeat consumption it is the honest protocol (a repeated target is then unreachable). Default
off, so RecBole's numbers stay RecBole's (which masks training items for its general models only).
"""

from __future__ import annotations

import types

import numpy as np
import scipy.sparse as sp
import torch


def history_matrix(datasets, n_users: int, n_items: int) -> sp.csr_matrix:
    """``[n_users, n_items]`` CSR of the items each user touched in ``datasets`` (targets and lists)."""
    rows, cols = [], []
    for dataset in datasets:
        inter = dataset.inter_feat
        users, items = inter[dataset.uid_field], inter[dataset.iid_field]
        rows.append(users.numpy())
        cols.append(items.numpy())
        list_field = dataset.iid_field + dataset.config["LIST_SUFFIX"]
        if list_field in inter:
            seq = inter[list_field]
            keep = seq > 0
            rows.append(users.unsqueeze(1).expand_as(seq)[keep].numpy())
            cols.append(seq[keep].numpy())
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=bool), (rows, cols)), shape=(n_users, n_items))
    matrix.sum_duplicates()
    return matrix


def install_history_mask(trainer, train_data, valid_data, test_data) -> None:
    """Make ``trainer.evaluate`` mask history items for ``valid_data``, ``test_data`` and loaders
    derived from them (``quick_start.subset_loader`` keeps the tag)."""
    train_set = train_data._dataset
    n_users, n_items = train_set.user_num, train_set.item_num
    train_hist = history_matrix([train_set], n_users, n_items)
    masks = {"valid": train_hist, "test": (train_hist + history_matrix([valid_data._dataset], n_users, n_items)).astype(bool)}
    valid_data.history_split, test_data.history_split = "valid", "test"
    uid_field = trainer.config["USER_ID_FIELD"]
    evaluate, batch_eval = trainer.evaluate, trainer._full_sort_batch_eval

    def masked_evaluate(self, eval_data, *args, **kwargs):
        self._history_mask = masks.get(getattr(eval_data, "history_split", None))
        try:
            return evaluate(eval_data, *args, **kwargs)
        finally:
            self._history_mask = None

    def masked_batch_eval(self, batched_data):
        interaction, scores, positive_u, positive_i = batch_eval(batched_data)
        if self._history_mask is not None:
            users = interaction[uid_field].cpu().numpy()
            sub = self._history_mask[users].tocoo()
            scores[torch.as_tensor(sub.row, device=scores.device),
                   torch.as_tensor(sub.col, device=scores.device)] = float("-inf")
        return interaction, scores, positive_u, positive_i

    trainer._history_mask = None
    trainer.evaluate = types.MethodType(masked_evaluate, trainer)
    trainer._full_sort_batch_eval = types.MethodType(masked_batch_eval, trainer)
