"""Fingerprints of what produced a cached artifact: the data files, the settings that decide the
training data (split, filters, columns), and the code that trained it.

A stage file or cache is reused only when its fingerprint matches, so a run on another split
(e.g. the warm/cold protocol after a leave-one-out run), other filters, another copy of the data
or another version of the code never silently picks up an artifact trained on different data.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# config keys that decide which interactions (and which ids) a model trains on
DATA_KEYS = (
    "data_path", "benchmark_filename", "eval_args", "load_col", "unload_col", "unused_col",
    "additional_feat_suffix", "USER_ID_FIELD", "ITEM_ID_FIELD", "RATING_FIELD", "TIME_FIELD",
    "LABEL_FIELD", "threshold", "val_interval", "user_inter_num_interval", "item_inter_num_interval",
    "filter_inter_by_user_or_item", "rm_dup_inter", "field_separator", "seq_separator",
    "normalize_field", "normalize_all", "MAX_ITEM_LIST_LENGTH", "ITEM_LIST_LENGTH_FIELD", "LIST_SUFFIX",
    "alias_of_user_id", "alias_of_item_id", "preload_weight", "encoding",
)

_FILE_CACHE: dict = {}


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (memoised per process on path, size and mtime)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_CACHE[key] = digest.hexdigest()
    return _FILE_CACHE[key]


def dataset_files_digest(data_path: str, dataset: str) -> dict:
    """``{file name: sha256}`` of the dataset's atomic files (``<dataset>.*`` in ``data_path``)."""
    folder = Path(data_path)
    if not folder.is_dir():
        return {}
    return {p.name: file_digest(str(p)) for p in sorted(folder.iterdir())
            if p.is_file() and p.name.startswith(f"{dataset}.")}


def data_fingerprint(config) -> dict:
    """Everything that decides a run's training data: file contents and the data settings."""
    settings = {key: config[key] for key in DATA_KEYS if config[key] is not None}
    return {"files": dataset_files_digest(config["data_path"], config["dataset"]), "settings": settings}


def code_fingerprint() -> str:
    """sha256 over this package's model-building source files and RecBole's version."""
    import recbole

    root = Path(__file__).resolve().parent
    digest = hashlib.sha256(recbole.__version__.encode())
    for sub in ("model", "quantize", "trainer", "data", "llm", "decoding"):
        for path in sorted((root / sub).glob("*.py")):
            digest.update(path.name.encode())
            digest.update(file_digest(str(path)).encode())
    return digest.hexdigest()


def digest(obj) -> str:
    """Short sha256 of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_code_fingerprint(model: str) -> str:
    """The code a run of ``model`` executes: RecBole's version and our shared run code (trainer,
    evaluation, config, compat, utils), plus every model-building file of this package when
    ``model`` is one of ours. RecBole's own models (SASRec, LightGCN, ...) run none of our model
    code, so editing a generative model keeps their resumable runs and run records valid."""
    import recbole

    from recbole_genrec.utils import MODEL_MODULES  # utils imports RecBole: not at module load

    root = Path(__file__).resolve().parent
    files = [root / name for name in ("compat.py", "config.py", "utils.py")]
    for sub in ("trainer", "evaluation"):  # report.py only draws tables and plots: left out
        files += sorted(p for p in (root / sub).glob("*.py") if p.name != "report.py")
    digest_ = hashlib.sha256(recbole.__version__.encode())
    for path in files:
        digest_.update(path.name.encode())
        digest_.update(file_digest(str(path)).encode())
    if model in MODEL_MODULES:
        digest_.update(code_fingerprint().encode())
    return digest_.hexdigest()
