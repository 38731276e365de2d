"""One text string per item, built from raw ``.item`` columns.

RecBole splits ``token_seq`` fields into words and remaps them to ids, so the original strings
are gone from the Dataset. We read the raw ``.item`` file ourselves and key each row through
``dataset.field2token_id[ITEM_ID_FIELD]`` to RecBole's internal item ids.
"""

from __future__ import annotations

import csv
import os
from logging import getLogger


def _item_file(config) -> str:
    return os.path.join(config["data_path"], f"{config['dataset']}.item")


def load_item_texts(config, dataset, fields=None) -> list[str]:
    """Return ``texts`` with ``texts[i]`` the text of internal item id ``i`` (``texts[0] == ""``).

    ``fields`` (default ``config['item_text_fields']``) are ``.item`` column names; each item's
    text is ``"field: value; field: value"`` over its non-empty values. Items with no text at all
    fall back to ``"<ITEM_ID_FIELD> <raw id>"`` (logged with their count); an error is raised if
    no item has text, if the ``.item`` file is missing or if a field is not one of its columns.
    """
    fields = list(fields if fields is not None else (config["item_text_fields"] or []))
    if not fields:
        raise ValueError(
            "item_text_fields is empty: name the .item columns that describe an item, "
            "e.g. item_text_fields: [movie_title, class]"
        )
    path = _item_file(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"item_text_fields={fields} needs the item file {path}, which does not exist"
        )
    iid_field = dataset.iid_field
    texts = read_entity_texts(config, path, iid_field, dataset.field2token_id[iid_field], dataset.item_num,
                              fields, "item_text_fields")
    id2token = dataset.field2id_token[iid_field]
    empty = [i for i in range(1, dataset.item_num) if not texts[i]]
    if len(empty) == dataset.item_num - 1:
        raise ValueError(f"no item has text in fields {fields} of {path}")
    if empty:
        getLogger().warning(
            f"{len(empty)} of {dataset.item_num - 1} items have no text in {fields}; "
            f"they are described by their raw id ('{iid_field} <id>')"
        )
        for i in empty:
            texts[i] = f"{iid_field} {id2token[i]}"
    return texts


def load_user_texts(config, dataset, fields) -> list[str]:
    """``texts[u]`` = ``"field: value; ..."`` of user ``u`` from the ``.user`` file's ``fields``
    (``""`` for users without a row); errors name the missing file or field."""
    path = os.path.join(config["data_path"], f"{config['dataset']}.user")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"user_text_fields={list(fields)} needs the user file {path}, which does not exist")
    uid_field = dataset.uid_field
    return read_entity_texts(config, path, uid_field, dataset.field2token_id[uid_field], dataset.user_num,
                             list(fields), "user_text_fields")


def read_entity_texts(config, path, id_field, token2id, n, fields, option) -> list[str]:
    """Raw ``"field: value; ..."`` strings from an atomic file, indexed by internal id."""
    separator = config["field_separator"] or "\t"
    encoding = config["encoding"] or "utf-8"
    texts = [""] * n
    iid_field = id_field
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter=separator, quoting=csv.QUOTE_NONE)
        header = [column.split(":")[0] for column in next(reader)]
        if iid_field not in header:
            raise KeyError(f"{path}: no column '{iid_field}' (the id field); columns are {header}")
        missing = [field for field in fields if field not in header]
        if missing:
            raise KeyError(f"{option} {missing} are not columns of {path}; columns are {header}")
        id_col = header.index(iid_field)
        cols = [header.index(field) for field in fields]
        for row in reader:
            if len(row) <= id_col:
                continue
            item = token2id.get(row[id_col])
            if item is None:  # item filtered out or never interacted with
                continue
            parts = [
                f"{field}: {row[col].strip()}"
                for field, col in zip(fields, cols)
                if col < len(row) and row[col].strip()
            ]
            texts[item] = "; ".join(parts)
    return texts
