"""Top-k recommendations from a saved checkpoint, in raw ids.

>>> from recbole_genrec.recommend import recommend
>>> recommend("saved/TIGER-....pth", user_ids=["1", "2"], k=10)           # known users
>>> recommend("saved/TIGER-....pth", histories=[["50", "172", "133"]])    # users the model never saw

A known user's history is the one the test split gives the model: their training and validation
interactions in time order (the input of their test-split row; users without a test row, which had
too few interactions, use their whole history), truncated to ``MAX_ITEM_LIST_LENGTH``. A raw
history is an unseen user's items, oldest first; it is truncated to its last
``MAX_ITEM_LIST_LENGTH`` items and scored with the padding user id 0. Sequential models (RecBole's
SASRec, TIGER, LETTER, SETRec, TwoLevelLLMRec, TTDS, ...) take histories; a general model
(LightGCN, ...) scores known users only, and so does TokenRec (a user is its LightGCN embedding).

Scores are the model's ``full_sort_predict``; the padding item 0 is never recommended. A beam model
(TIGER, LETTER, TTDS) scores only what its beam reaches: its beam is widened for the call to ``k``
plus the number of excluded items when its ``beam_size`` is smaller. Items a model did not reach
(score ``-inf``: outside the protocol's part of the catalogue, or with no valid code path) are left
out, so a list may still hold fewer than ``k`` items.
"""

from __future__ import annotations

import csv
import os

import torch

# Sequential models that describe a user by a trained per-user embedding: no raw histories.
NEEDS_KNOWN_USER = {"TokenRec"}


class Recommender:
    """A loaded checkpoint answering :meth:`recommend` calls (load once, query many times)."""

    def __init__(self, config, model, dataset, train_data=None, valid_data=None, test_data=None):
        from recbole.utils import ModelType

        self.config, self.model, self.dataset = config, model, dataset
        self.train_data, self.valid_data, self.test_data = train_data, valid_data, test_data
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        self.device = config["device"]
        self.model.eval()
        self._titles = None
        self._test_rows = None

    @classmethod
    def from_checkpoint(cls, model_file: str) -> "Recommender":
        from recbole_genrec.quick_start import load_data_and_model

        config, model, dataset, train_data, valid_data, test_data = load_data_and_model(model_file)
        return cls(config, model, dataset, train_data, valid_data, test_data)

    # ----- ids ------------------------------------------------------------------------------
    def _codes(self, field: str, raw_ids, what: str) -> list[int]:
        token2id = self.dataset.field2token_id[field]
        unknown = [raw for raw in raw_ids if str(raw) not in token2id or str(raw) == "[PAD]"]
        if unknown:
            raise ValueError(f"unknown {what} ids (not in dataset '{self.config['dataset']}'): "
                             f"{', '.join(map(str, dict.fromkeys(unknown)))}")
        return [token2id[str(raw)] for raw in raw_ids]

    def _raw_items(self, codes) -> list[str]:
        id2token = self.dataset.field2id_token[self.iid_field]
        return [str(id2token[int(c)]) for c in codes]

    # ----- titles ---------------------------------------------------------------------------
    def titles(self) -> dict | None:
        """``{raw item id: title}`` from the ``.item`` file's title-like column (the first of
        ``item_text_fields``, else ``movie_title`` / ``title``); ``None`` without one."""
        if self._titles is None:
            self._titles = self._read_titles() or {}
        return self._titles or None

    def _read_titles(self) -> dict | None:
        path = os.path.join(self.config["data_path"], f"{self.config['dataset']}.item")
        if not os.path.isfile(path):
            return None
        separator = self.config["field_separator"] or "\t"
        with open(path, encoding=self.config["encoding"] or "utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=separator, quoting=csv.QUOTE_NONE)
            header = [column.split(":")[0] for column in next(reader, [])]
            text_fields = list(self.config["item_text_fields"] or [])
            candidates = text_fields[:1] + ["movie_title", "title"]
            field = next((c for c in candidates if c in header), None)
            if field is None or self.iid_field not in header:
                return None
            id_col, title_col = header.index(self.iid_field), header.index(field)
            return {row[id_col]: row[title_col].strip() for row in reader
                    if len(row) > max(id_col, title_col)}

    # ----- histories ------------------------------------------------------------------------
    def _user_rows(self) -> dict:
        """``{internal user id: row}`` of the first test-split row of each user (sequential)."""
        if self._test_rows is None:
            users = self.test_data._dataset.inter_feat[self.uid_field].tolist() if self.test_data else []
            self._test_rows = {}
            for row, user in enumerate(users):
                self._test_rows.setdefault(user, row)
        return self._test_rows

    def _fallback_history(self, user: int, raw_user) -> list[int]:
        """The whole history of a user without a test row: their last augmented row + its target."""
        inter = self.dataset.inter_feat
        rows = (inter[self.uid_field] == user).nonzero().flatten()
        if not len(rows):
            raise ValueError(f"user {raw_user} has no interaction the model can use as a history")
        list_field = self.iid_field + self.config["LIST_SUFFIX"]
        lengths = inter[self.dataset.item_list_length_field][rows]
        row = int(rows[int(torch.argmax(lengths))])
        n = int(inter[self.dataset.item_list_length_field][row])
        return inter[list_field][row][:n].tolist() + [int(inter[self.iid_field][row])]

    def _history_interaction(self, users: list[int], histories: list[list[int]]):
        from recbole.data.interaction import Interaction

        width = self.model.max_seq_length
        seq = torch.zeros(len(histories), width, dtype=torch.long)
        lengths = torch.zeros(len(histories), dtype=torch.long)
        for b, history in enumerate(histories):
            history = history[-width:]
            seq[b, : len(history)] = torch.tensor(history, dtype=torch.long)
            lengths[b] = len(history)
        return Interaction({self.uid_field: torch.tensor(users, dtype=torch.long),
                            self.model.ITEM_SEQ: seq, self.model.ITEM_SEQ_LEN: lengths})

    def _seen_by_user(self, user: int) -> list[int]:
        seen = []
        for loader in (self.train_data, self.valid_data):
            if loader is None:
                continue
            inter = loader._dataset.inter_feat
            seen += inter[self.iid_field][inter[self.uid_field] == user].tolist()
        return seen

    # ----- scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def _top_k(self, interaction, k: int, exclude: list[list[int]] | None):
        # a beam model (TIGER, LETTER, TTDS) scores only the items its beam reaches: widen the beam so
        # that k items are left once the excluded ones are taken out (and for k above its beam size)
        beam_size = getattr(self.model, "beam_size", None)
        beam_model = isinstance(beam_size, int)
        if beam_model:
            wanted = k + max((len(set(items)) for items in exclude or []), default=0)
            self.model.beam_size = max(beam_size, min(wanted, self.model.n_items - 1))
        try:
            scores = self.model.full_sort_predict(interaction.to(self.device))
        finally:
            if beam_model:
                self.model.beam_size = beam_size
        scores = scores.view(len(interaction), -1).clone().float()
        scores[:, 0] = float("-inf")
        if exclude is not None:
            for b, items in enumerate(exclude):
                if items:
                    scores[b, torch.tensor(items, dtype=torch.long, device=scores.device)] = float("-inf")
        values, indices = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        out = []
        for vals, idx in zip(values.cpu(), indices.cpu()):
            keep = torch.isfinite(vals)
            out.append((idx[keep].tolist(), vals[keep].tolist()))
        return out

    def recommend(self, user_ids=None, histories=None, k: int = 10, exclude_seen: bool = False) -> list[dict]:
        """One dict per query, known users first (in the order given), then raw histories:
        ``user`` (raw id, ``None`` for a history), ``history`` (raw item ids the model read, oldest
        first; ``None`` for a general model), ``items`` (raw ids, best first), ``scores`` and
        ``titles`` (``None`` when the ``.item`` file has no title-like column).
        ``exclude_seen``: never recommend an item of the history (general models: of the user's
        training and validation interactions)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(user_ids, (str, int)):
            user_ids = [user_ids]
        if histories is not None and histories and all(isinstance(h, (str, int)) for h in histories):
            histories = [histories]  # one history given as a flat list
        user_ids, histories = list(user_ids or []), [list(h) for h in (histories or [])]
        if not user_ids and not histories:
            raise ValueError("recommend: give user_ids (known users) and/or histories (raw item ids)")
        name = self.config["model"]
        if histories and not self.sequential:
            raise ValueError(f"{name} is a general (non-sequential) model: it scores known users only "
                             f"(user_ids=...); recommending for a raw history needs a sequential model "
                             f"such as SASRec or TIGER")
        if histories and name in NEEDS_KNOWN_USER:
            raise ValueError(f"{name} describes a user by the embedding trained for them: it scores known "
                             f"users only (user_ids=...), not raw histories")
        users = self._codes(self.uid_field, user_ids, "user")
        empty = [j for j, h in enumerate(histories) if not h]
        if empty:
            raise ValueError(f"histories {empty} are empty: give at least one item id each")
        history_codes = [self._codes(self.iid_field, h, "item") for h in histories]

        batch = max(1, int(self.config["eval_batch_size"] or 256))
        results: list[tuple] = []  # (raw user, history codes or None, items, scores)
        if not self.sequential:
            for start in range(0, len(users), batch):
                part = users[start:start + batch]
                from recbole.data.interaction import Interaction

                inter = Interaction({self.uid_field: torch.tensor(part, dtype=torch.long)})
                exclude = [self._seen_by_user(u) for u in part] if exclude_seen else None
                for j, (items, scores) in enumerate(self._top_k(inter, k, exclude)):
                    results.append((user_ids[start + j], None, items, scores))
        else:
            rows = self._user_rows()
            list_field, len_field = self.model.ITEM_SEQ, self.model.ITEM_SEQ_LEN
            queries = []  # (raw user, user code, test row or None, history codes)
            for raw, user in zip(user_ids, users):
                row = rows.get(user)
                if row is None:
                    queries.append((raw, user, None, self._fallback_history(user, raw)))
                else:
                    inter = self.test_data._dataset.inter_feat
                    n = int(inter[len_field][row])
                    queries.append((raw, user, row, inter[list_field][row][:n].tolist()))
            queries += [(None, 0, None, h) for h in history_codes]
            by_index = {}
            with_rows = [q for q in enumerate(queries) if q[1][2] is not None]
            built = [q for q in enumerate(queries) if q[1][2] is None]
            for group in (with_rows, built):
                for start in range(0, len(group), batch):
                    part = group[start:start + batch]
                    if part[0][1][2] is not None:  # the test split's own rows
                        inter = self.test_data._dataset.inter_feat[torch.tensor([q[2] for _, q in part])]
                    else:
                        inter = self._history_interaction([q[1] for _, q in part], [q[3] for _, q in part])
                    width = self.model.max_seq_length
                    exclude = [q[3][-width:] for _, q in part] if exclude_seen else None
                    for (index, q), top in zip(part, self._top_k(inter, k, exclude)):
                        by_index[index] = (q[0], q[3][-self.model.max_seq_length:], *top)
            results = [by_index[j] for j in range(len(queries))]

        titles = self.titles()
        out = []
        for raw_user, history, items, scores in results:
            raw_items = self._raw_items(items)
            out.append({
                "user": None if raw_user is None else str(raw_user),
                "history": None if history is None else self._raw_items(history),
                "items": raw_items,
                "scores": scores,
                "titles": None if titles is None else [titles.get(i, "") for i in raw_items],
            })
        return out


def recommend(model_file: str, user_ids=None, histories=None, k: int = 10, exclude_seen: bool = False) -> list[dict]:
    """Top-``k`` raw item ids for known users (raw ``user_ids``) and for raw ``histories`` (lists of
    raw item ids, oldest first) with the checkpoint ``model_file``; see :meth:`Recommender.recommend`
    for the returned dicts. Unknown user or item ids raise ``ValueError`` naming them."""
    return Recommender.from_checkpoint(model_file).recommend(user_ids, histories, k, exclude_seen)


def format_table(results: list[dict]) -> str:
    """A plain-text table: query, rank, item id, score and title (when known)."""
    with_titles = any(r["titles"] is not None for r in results)
    header = ["user", "rank", "item_id", "score"] + (["title"] if with_titles else [])
    rows, n_histories = [], 0
    for r in results:
        who = r["user"]
        if who is None:
            who, n_histories = f"history#{n_histories}", n_histories + 1
        for rank, (item, score) in enumerate(zip(r["items"], r["scores"]), 1):
            row = [who, str(rank), item, f"{score:.4f}"]
            if with_titles:
                row.append((r["titles"] or [""] * len(r["items"]))[rank - 1])
            rows.append(row)
        if not r["items"]:
            rows.append([who, "-", "(no item)", ""] + ([""] if with_titles else []))
    widths = [max(len(h), *(len(row[c]) for row in rows)) if rows else len(h) for c, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
