"""Convert public review dumps into RecBole atomic files.

``python -m recbole_genrec.data.convert amazon --reviews R --meta M --out DIR [--name NAME]
[--kcore 5] [--min-rating 0] [--require-meta] [--max-words 100]``

Reads the gzip'd (or plain) JSON-lines dumps of the Amazon review releases 2014, 2018 and 2023;
the format is recognised per line and per field:

============  ==========================================  =========================================
release       reviews                                     meta
============  ==========================================  =========================================
2014          ``reviewerID asin unixReviewTime overall``  Python literals (``ast.literal_eval``):
                                                          ``asin title brand categories`` (list of
                                                          lists) ``description`` ``price``
2018          same as 2014                                JSON: ``asin title brand category`` (list)
                                                          ``description`` (list or str) ``price``
                                                          (``"$12.99"``)
2023          ``user_id parent_asin timestamp`` (ms)      JSON: ``parent_asin title store
              ``rating``                                  categories description`` (list) ``price``
============  ==========================================  =========================================

The dumps are streamed: only integer-coded interactions are kept in memory (``array`` columns;
users and items as ``str -> int`` dicts), and only the metadata of items that survive filtering.
Malformed lines are skipped and counted; a duplicate review (same user and item) keeps the
earliest; users and items are filtered to the ``kcore`` (repeated until stable); items without
metadata are kept with empty text, or dropped with ``require_meta`` (and the k-core applied again).

Written (atomically) into ``DIR``: ``NAME.inter`` (``user_id:token item_id:token rating:float
timestamp:float``, in time order; timestamps in seconds), ``NAME.item`` (``item_id:token
title:token_seq brand:token categories:token_seq description:token_seq price:float``) and
``NAME.yaml`` (``data_path`` = the parent of ``DIR``, ``load_col``, ``item_text_fields``), so
``--dataset=NAME --config_files=DIR/NAME.yaml`` runs as it is (``Config`` resolves
``<data_path>/<dataset>``, so ``DIR`` should be named ``NAME``, the default name).

Text cleaning: HTML entities decoded, tags removed, control characters, tabs and newlines turned
into spaces, runs of whitespace collapsed (RecBole splits ``token_seq`` by ``seq_separator``, a
space); double quotes become single quotes, because RecBole reads atomic files with pandas, whose
CSV parser takes a field that starts with ``"`` for a quoted field spanning lines.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import html
import json
import math
import os
import re
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field

import numpy as np

from recbole_genrec.atomic import atomic_write, atomic_write_text

INTER_COLUMNS = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
ITEM_COLUMNS = ["item_id:token", "title:token_seq", "brand:token", "categories:token_seq",
                "description:token_seq", "price:float"]
TEXT_FIELDS = ["title", "brand", "categories", "description"]

_TAG = re.compile(r"<[^>]*>")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
# Cheap look-ahead at a meta line's id, so lines of items we do not keep are never parsed.
_META_ID = (re.compile(rb"""["']parent_asin["']\s*:\s*["']([^"']+)["']"""),
            re.compile(rb"""["']asin["']\s*:\s*["']([^"']+)["']"""))


# ----- reading ----------------------------------------------------------------------------------
class LineReader:
    """Lines (bytes) of a gzip'd or plain file; ``progress`` shows a tqdm bar over the file's
    (compressed) bytes with the number of lines read."""

    def __init__(self, path: str, desc: str, progress: bool = True):
        self.path, self.desc, self.progress = path, desc, progress
        self.lines = 0

    def __iter__(self):
        raw = open(self.path, "rb")
        try:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            bar = None
            if self.progress:
                from tqdm import tqdm

                bar = tqdm(total=os.path.getsize(self.path), unit="B", unit_scale=True, desc=self.desc,
                           file=sys.stderr, mininterval=1.0)
            done = 0
            try:
                for line in stream:
                    self.lines += 1
                    if bar is not None and self.lines % 20000 == 0:
                        pos = raw.tell()
                        bar.update(pos - done)
                        done = pos
                        bar.set_postfix(lines=self.lines, refresh=False)
                    yield line
            except (OSError, EOFError) as exc:  # truncated or corrupt gzip: keep what was read
                print(f"warning: {self.path}: stopped reading after {self.lines} lines: {exc}", file=sys.stderr)
            finally:
                if bar is not None:
                    bar.update(os.path.getsize(self.path) - done)
                    bar.set_postfix(lines=self.lines, refresh=False)
                    bar.close()
        finally:
            raw.close()


def parse_record(line: bytes):
    """A JSON object (2018/2023 and 2014 reviews) or a Python dict literal (2014 meta); ``None``
    for a line that is neither."""
    try:
        record = json.loads(line)
    except ValueError:
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
        if not text.startswith("{"):
            return None
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return record if isinstance(record, dict) else None


def _identifier(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or any(c.isspace() for c in value):
        return None
    return value


def _number(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def review_fields(record: dict):
    """``(user, item, rating, timestamp_seconds)`` of a review of any release, or ``None``."""
    user = _identifier(record.get("reviewerID", record.get("user_id")))
    item = _identifier(record.get("parent_asin") or record.get("asin"))
    if "unixReviewTime" in record:
        ts = _number(record["unixReviewTime"])
    else:
        ts = _number(record.get("timestamp"))
        if ts is not None and ts > 1e11:  # 2023: milliseconds
            ts /= 1000.0
    rating = _number(record.get("overall", record.get("rating")))
    if user is None or item is None or ts is None or rating is None:
        return None
    return user, item, rating, ts


# ----- text ---------------------------------------------------------------------------------------
def _flatten(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif value is not None and not isinstance(value, dict):
        yield value


def clean_text(value, max_words: int | None = None) -> str:
    """One line of plain text: HTML decoded and stripped, whitespace collapsed, no tabs/newlines."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in _flatten(value))
    text = str(value)
    for _ in range(2):  # dumps hold doubly escaped HTML (``&amp;lt;br&amp;gt;``)
        if "&" not in text:
            break
        text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = _CONTROL.sub(" ", text).replace('"', "'")
    text = _SPACE.sub(" ", text).strip()
    if max_words and max_words > 0:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


def parse_price(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        price = float(value)
    else:
        match = _NUMBER.search(str(value))
        if not match:
            return None
        price = float(match.group().replace(",", ""))
    return price if math.isfinite(price) and price >= 0 else None


def meta_fields(record: dict, max_words: int | None = None):
    """``(item, (title, brand, categories, description, price))`` of a meta line, or ``None``."""
    item = _identifier(record.get("parent_asin") or record.get("asin"))
    if item is None:
        return None
    details = record.get("details") if isinstance(record.get("details"), dict) else {}
    brand = record.get("brand") or record.get("store") or details.get("Brand") or details.get("brand")
    categories, seen = [], set()
    main = record.get("main_category")
    for raw in _flatten([main, record.get("categories"), record.get("category")]):
        cat = clean_text(raw)
        if cat and cat not in seen:
            seen.add(cat)
            categories.append(cat)
    cats = clean_text(" ".join(categories), max_words)
    return item, (clean_text(record.get("title"), max_words), clean_text(brand), cats,
                  clean_text(record.get("description"), max_words), parse_price(record.get("price")))


# ----- filtering ----------------------------------------------------------------------------------
def kcore(users: np.ndarray, items: np.ndarray, k: int, n_users: int, n_items: int) -> np.ndarray:
    """Indices of the rows that survive iterative ``k``-core filtering (users and items)."""
    rows = np.arange(len(users))
    if k <= 1:
        return rows
    while len(rows):
        u, i = users[rows], items[rows]
        keep = (np.bincount(u, minlength=n_users)[u] >= k) & (np.bincount(i, minlength=n_items)[i] >= k)
        if keep.all():
            break
        rows = rows[keep]
    return rows


@dataclass
class Summary:
    name: str
    out: str
    review_lines: int = 0
    malformed_reviews: int = 0
    below_min_rating: int = 0
    duplicates_dropped: int = 0
    meta_lines: int = 0
    malformed_meta: int = 0
    items_without_meta: int = 0
    items_dropped_without_meta: int = 0
    users: int = 0
    items: int = 0
    interactions: int = 0
    density: float = 0.0
    items_with_text: float = 0.0
    seconds: float = 0.0
    files: list = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"dataset '{self.name}' in {self.out}",
            f"  users {self.users:,}  items {self.items:,}  interactions {self.interactions:,}  "
            f"density {self.density:.6f}",
            f"  items with text {self.items_with_text:.1%}  (without metadata: {self.items_without_meta:,} kept "
            f"with empty text, {self.items_dropped_without_meta:,} dropped)",
            f"  review lines {self.review_lines:,}: malformed skipped {self.malformed_reviews:,}, "
            f"duplicates dropped {self.duplicates_dropped:,}, below min rating {self.below_min_rating:,}",
            f"  meta lines {self.meta_lines:,}: malformed skipped {self.malformed_meta:,}",
            f"  {self.seconds:.1f}s",
        ]


def _fmt(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 1e15 else repr(value)


# ----- the converter -----------------------------------------------------------------------------
def convert_amazon(reviews: str, meta: str | None, out: str, name: str | None = None, kcore_k: int = 5,
                   min_rating: float = 0.0, require_meta: bool = False, max_words: int | None = 100,
                   progress: bool = True, verbose: bool = True) -> Summary:
    """Convert one category's Amazon reviews (+ meta) dump; returns the :class:`Summary`."""
    start = time.perf_counter()
    out = os.path.abspath(out)
    name = name or os.path.basename(out.rstrip(os.sep))
    if verbose and name != os.path.basename(out):
        print(f"warning: files are named '{name}' but the folder is '{os.path.basename(out)}'; "
              f"RecBole looks for <data_path>/{name}/{name}.inter", file=sys.stderr)
    summary = Summary(name=name, out=out)

    # 1. reviews -> integer-coded columns
    user_ids: dict[str, int] = {}
    item_ids: dict[str, int] = {}
    users, items, ratings, stamps = array("i"), array("i"), array("f"), array("d")
    reader = LineReader(reviews, "reviews", progress)
    for line in reader:
        if not line.strip():
            continue
        record = parse_record(line)
        fields = review_fields(record) if record is not None else None
        if fields is None:
            summary.malformed_reviews += 1
            continue
        user, item, rating, ts = fields
        if rating < min_rating:
            summary.below_min_rating += 1
            continue
        users.append(user_ids.setdefault(user, len(user_ids)))
        items.append(item_ids.setdefault(item, len(item_ids)))
        ratings.append(rating)
        stamps.append(ts)
    summary.review_lines = reader.lines
    u = np.frombuffer(users, dtype=np.int32)
    i = np.frombuffer(items, dtype=np.int32)
    ts = np.frombuffer(stamps, dtype=np.float64)
    r = np.frombuffer(ratings, dtype=np.float32)

    # 2. duplicates: one row per (user, item), the earliest (first in the file on ties)
    order = np.lexsort((ts, i, u))  # lexsort is stable: file order breaks timestamp ties
    su, si = u[order], i[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (su[1:] != su[:-1]) | (si[1:] != si[:-1])
    rows = np.sort(order[first])
    del order, su, si, first
    summary.duplicates_dropped = len(u) - len(rows)
    rows = rows[np.argsort(ts[rows], kind="stable")]  # time order, file order on ties

    # 3. k-core
    n_users, n_items = len(user_ids), len(item_ids)
    rows = rows[kcore(u[rows], i[rows], kcore_k, n_users, n_items)]

    # 4. metadata of the items that are left
    wanted = np.zeros(n_items, dtype=bool)
    wanted[i[rows]] = True
    item_meta: dict[int, tuple] = {}
    if meta:
        reader = LineReader(meta, "meta", progress)
        for line in reader:
            if not line.strip():
                continue
            for pattern in _META_ID:
                match = pattern.search(line)
                if match:
                    break
            if match:  # skip, unparsed, the lines of items we do not keep
                code = item_ids.get(match.group(1).decode("utf-8", "replace").strip())
                if code is None or not wanted[code] or code in item_meta:
                    continue
            record = parse_record(line)
            parsed = meta_fields(record, max_words) if record is not None else None
            if parsed is None:
                summary.malformed_meta += 1
                continue
            code = item_ids.get(parsed[0])
            if code is not None and wanted[code] and code not in item_meta:
                item_meta[code] = parsed[1]
        summary.meta_lines = reader.lines
    kept_items = np.unique(i[rows])
    has_meta = np.zeros(n_items, dtype=bool)
    if item_meta:
        has_meta[np.fromiter(item_meta.keys(), dtype=np.int64, count=len(item_meta))] = True
    without = kept_items[~has_meta[kept_items]]
    if require_meta and len(without):
        summary.items_dropped_without_meta = len(without)
        rows = rows[has_meta[i[rows]]]
        rows = rows[kcore(u[rows], i[rows], kcore_k, n_users, n_items)]
    else:
        summary.items_without_meta = len(without)

    # 5. write
    os.makedirs(out, exist_ok=True)
    user_names = list(user_ids)
    item_names = list(item_ids)
    del user_ids, item_ids
    final_items = [int(x) for x in np.unique(i[rows])]
    n_rows = len(rows)

    def write_inter(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(INTER_COLUMNS) + "\n")
            for start_row in range(0, n_rows, 100_000):
                chunk = rows[start_row:start_row + 100_000]
                f.write("".join(
                    f"{user_names[a]}\t{item_names[b]}\t{_fmt(float(c))}\t{_fmt(float(d))}\n"
                    for a, b, c, d in zip(u[chunk].tolist(), i[chunk].tolist(), r[chunk].tolist(),
                                          ts[chunk].tolist())))

    with_text = 0
    has_price = False
    for code in final_items:
        values = item_meta.get(code)
        if values is not None:
            with_text += any(values[:4])
            has_price = has_price or values[4] is not None

    def write_item(tmp):
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\t".join(ITEM_COLUMNS) + "\n")
            for code in final_items:
                title, brand, cats, desc, price = item_meta.get(code, ("", "", "", "", None))
                f.write(f"{item_names[code]}\t{title}\t{brand}\t{cats}\t{desc}\t"
                        f"{'' if price is None else _fmt(price)}\n")

    inter_path = os.path.join(out, f"{name}.inter")
    item_path = os.path.join(out, f"{name}.item")
    yaml_path = os.path.join(out, f"{name}.yaml")
    atomic_write(inter_path, write_inter)
    atomic_write(item_path, write_item)
    item_cols = ["item_id", *TEXT_FIELDS] + (["price"] if has_price else [])
    atomic_write_text(yaml_path, (
        f"# Written by `python -m recbole_genrec.data.convert amazon` for dataset '{name}'.\n"
        f"# Run: --dataset={name} --config_files={yaml_path}\n"
        f"data_path: {json.dumps(os.path.dirname(out))}\n"
        "USER_ID_FIELD: user_id\nITEM_ID_FIELD: item_id\nRATING_FIELD: rating\nTIME_FIELD: timestamp\n"
        "load_col:\n"
        "  inter: [user_id, item_id, rating, timestamp]\n"
        f"  item: [{', '.join(item_cols)}]\n"
        f"item_text_fields: [{', '.join(TEXT_FIELDS)}]\n"
    ))

    n_final_users = len(np.unique(u[rows])) if n_rows else 0
    summary.users, summary.items, summary.interactions = n_final_users, len(final_items), n_rows
    summary.density = n_rows / (n_final_users * len(final_items)) if n_rows else 0.0
    summary.items_with_text = with_text / len(final_items) if final_items else 0.0
    summary.seconds = time.perf_counter() - start
    summary.files = [inter_path, item_path, yaml_path]
    if verbose:
        print("\n".join(summary.lines()))
        if summary.items_without_meta:
            print(f"  {summary.items_without_meta:,} items have no metadata: kept with empty text "
                  f"(--require-meta drops them)")
        if not n_rows:
            print("warning: no interaction is left; lower --kcore or --min-rating", file=sys.stderr)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m recbole_genrec.data.convert",
                                     description="Convert review dumps into RecBole atomic files.")
    sub = parser.add_subparsers(dest="source", required=True)
    amazon = sub.add_parser("amazon", help="Amazon reviews 2014 / 2018 / 2023 (gzip'd JSON lines)")
    amazon.add_argument("--reviews", required=True, help="reviews dump (.json.gz / .jsonl.gz / plain)")
    amazon.add_argument("--meta", default=None, help="item metadata dump of the same category")
    amazon.add_argument("--out", required=True, help="dataset folder to write (named like the dataset)")
    amazon.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    amazon.add_argument("--kcore", type=int, default=5, help="min interactions per user and item (<=1: off)")
    amazon.add_argument("--min-rating", type=float, default=0.0, help="drop reviews rated below this")
    amazon.add_argument("--require-meta", action="store_true", help="drop items without metadata")
    amazon.add_argument("--max-words", type=int, default=100,
                        help="words kept per title/categories/description (0: all)")
    amazon.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.meta is None:
        print("warning: no --meta: every item gets empty text", file=sys.stderr)
    summary = convert_amazon(args.reviews, args.meta, args.out, name=args.name, kcore_k=args.kcore,
                             min_rating=args.min_rating, require_meta=args.require_meta,
                             max_words=args.max_words or None, progress=not args.no_progress)
    return asdict(summary)


if __name__ == "__main__":
    main()
