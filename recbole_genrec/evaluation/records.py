"""Run records: one JSON file per finished run (its result, command, commit and date), so long runs
can be trained one model at a time, in separate processes or sessions, and tabulated together.

A record is named by the run fingerprint (:func:`recbole_genrec.trainer.staged.run_fingerprint`:
config less run-only keys, data files and settings, and the code the model runs), so a later
``--reuse_runs`` picks it up only for the same config, data and code. Writing records changes
nothing a run computes, so this module is outside the run fingerprint.
"""

from __future__ import annotations

import os
from collections import OrderedDict

RECORD_FORMAT = "recbole_genrec-run-1"
PROTOCOLS = ("leave_one_out", "warm_cold", "unseen_users")


def record_path(config, protocol: str = "leave_one_out", saved: bool = True) -> str:
    """``<checkpoint_dir>/runs/<model>-<dataset>[-<protocol>][-last_epoch]-seed<seed>-<run fingerprint>.json``
    (the protocol is named unless it is the plain train/test run of ``compare``; ``-last_epoch`` marks
    runs tested on their last epoch's model, ``saved=False``, instead of the best validation epoch's)."""
    from recbole_genrec.trainer.staged import run_fingerprint

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: one of {PROTOCOLS}, got {protocol!r}")
    tag = ("" if protocol == "leave_one_out" else f"-{protocol}") + ("" if saved else "-last_epoch")
    return os.path.join(config["checkpoint_dir"], "runs",
                        f"{config['model']}-{config['dataset']}{tag}-seed{config['seed']}-{run_fingerprint(config)}.json")


def write_record(path: str, config, result: dict, commit: str | None = None) -> dict:
    """Write the run's result with its command, commit (``commit``, else the current one), date and
    seed (atomically); return the ``record`` entry :func:`read_record` gives back (command, commit,
    date, path). Take ``path`` and ``commit`` before training: the files may change during a run."""
    import datetime
    import json
    import shlex
    import sys

    from recbole_genrec.atomic import atomic_write_text
    from recbole_genrec.evaluation.report import git_commit, machine

    record = {
        "format": RECORD_FORMAT, "model": config["model"], "dataset": config["dataset"], "seed": config["seed"],
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]), "commit": commit or git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),  # float results can differ in their last bits between kinds of machine
        "result": {k: (dict(v) if isinstance(v, dict) else v) for k, v in result.items() if k != "record"},
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1, default=float))
    return {k: record[k] for k in ("command", "commit", "date")} | {"path": path}


def read_record(path: str) -> dict | None:
    """The result of a record file (with its ``record``: command, commit, date, path), or ``None``
    when there is none or it is unreadable (then the run is trained again)."""
    import json

    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != RECORD_FORMAT:
            return None
        result = record["result"]
    except (OSError, ValueError, KeyError):
        return None
    for key in ("best_valid_result", "test_result"):
        if isinstance(result.get(key), dict):
            result[key] = OrderedDict(result[key])
    result["valid_curve"] = [tuple(point) for point in result.get("valid_curve", [])]
    result["record"] = {k: record.get(k) for k in ("command", "commit", "date")} | {"path": path}
    return result


def record_protocol(name: str) -> str:
    """The protocol of a record from its file name (:func:`record_path`)."""
    return next((p for p in PROTOCOLS[1:] if f"-{p}-" in os.path.basename(name)), "leave_one_out")


def find_record(model, dataset, config_file_list, config_dict, protocol: str = "leave_one_out", saved=True):
    """``(config, path, result or None)``: the config of a run, the record it would write with the
    code and data as they are now, and that record's result if it exists."""
    from recbole_genrec.config import Config

    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=dict(config_dict))
    path = record_path(config, protocol, saved)
    return config, path, read_record(path)


def best_epoch(curve, best_score) -> int | None:
    """The epoch of ``curve`` (``[(epoch, score), ...]``) whose score is ``best_score``: the last of
    tied ones, as RecBole's ``early_stopping`` keeps the later of equal scores."""
    return next((epoch for epoch, score in reversed(curve) if score == best_score), None)


def training_progress(model, dataset, config_file_list, config_dict) -> dict | None:
    """How far the resumable run (``--resume=True``) of this config, data and code has trained, read
    from its ``.last`` checkpoint: ``{seed, epochs, max_epochs, stopped, valid_metric, valid_curve,
    best_valid_score, best_epoch, updated, path}``, or ``None`` when it has none (or it cannot be
    read). Nothing is written, locked or removed: a report may read the checkpoint of a run that is
    training."""
    import datetime
    from logging import getLogger

    from recbole.data.transform import construct_transform

    from recbole_genrec.compat import safe_torch_load
    from recbole_genrec.config import Config
    from recbole_genrec.trainer.staged import LAST_FORMAT, LAST_SUFFIX, run_checkpoint_file

    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict={**config_dict, "resume": True, "resume_checkpoint": None})
    construct_transform(config)  # as the run's data loaders do: BERT4Rec's masking adds its keys to the config
    path = run_checkpoint_file(config)[0] + LAST_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        state = safe_torch_load(path, map_location="cpu")
        if state.get("format") != LAST_FORMAT:
            raise ValueError(f"format {state.get('format')!r}, not {LAST_FORMAT!r}")
        curve = [(int(e), float(s)) for e, s in state["valid_curve"]]
        best = float(state["best_valid_score"])
        updated = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone()
    except Exception as err:  # noqa: BLE001 - a report lists what it can read and says what it skipped
        getLogger().warning(f"{path}: not read ({err}); the run is only named as missing")
        return None
    return {"seed": config["seed"], "epochs": int(state["epoch"]) + 1, "max_epochs": config["epochs"],
            "stopped": bool(state["stopped"]), "valid_metric": config["valid_metric"], "valid_curve": curve,
            "best_valid_score": best, "best_epoch": best_epoch(curve, best),
            "updated": updated.isoformat(timespec="minutes"), "path": path}


def note_missing(missing: list, in_training: list, spec: str, model, dataset, config_file_list, config_dict) -> None:
    """``records_only``: add a run with no record to ``missing`` (``(spec, seed)``) and, when it is
    training or was stopped mid-way, its :func:`training_progress` to ``in_training``."""
    missing.append((spec, config_dict.get("seed")))
    progress = training_progress(model, dataset, config_file_list, config_dict)
    if progress is not None:
        in_training.append({"model": spec, **progress})


def log_missing(label: str, path: str) -> None:
    """``records_only``: one warning per run that has no record (it is left out of the table)."""
    from logging import getLogger

    getLogger().warning(f"{label}: no run record {path}; left out of the table (records_only)")


def log_reused(config, label: str, path: str, result: dict) -> None:
    """One log line naming the record a run was taken from (RecBole's logger)."""
    from logging import getLogger

    from recbole.utils import init_logger, set_color

    init_logger(config)
    record = result["record"]
    getLogger().info(set_color(label, "green") + f" ... reused {path} (command `{record['command']}`, "
                     f"commit {record['commit']}, {record['date']})")


def format_missing(missing) -> str:
    """``[(spec, seed or None), ...]`` as ``"SASRec (seeds 2021, 2022), TIGER (default seed)"``."""
    seeds: dict = {}
    for spec, seed in missing:
        seeds.setdefault(spec, []).append(seed)
    parts = []
    for spec, values in seeds.items():
        known = [str(s) for s in values if s is not None]
        parts.append(f"{spec} (default seed)" if not known
                     else f"{spec} (seed{'s' if len(known) > 1 else ''} {', '.join(known)})")
    return ", ".join(parts)


def checkpoint_dir(model, dataset, config_file_list, config_dict) -> str:
    """The ``checkpoint_dir`` a run of this config writes to, resolved as RecBole's ``Config`` does
    (config files, ``config_dict``, then the command line's ``--checkpoint_dir=``)."""
    from recbole_genrec.config import Config

    return Config(model=model, dataset=dataset, config_file_list=config_file_list,
                  config_dict=dict(config_dict))["checkpoint_dir"]


def require_some(rows: list, missing: list, checkpoint_folder: str, in_training=()) -> None:
    """``--records_only`` with no record at all is an error that says where records were looked for
    (``<checkpoint_folder>/runs``) and how far the runs in training have got."""
    if not rows:
        folder = os.path.join(checkpoint_folder, "runs")
        training = "".join(f"; {run['model']} (seed {run['seed']}) is training: {progress_line(run)}"
                           for run in in_training)
        raise ValueError(f"records_only: no run record in {folder!r} for {format_missing(missing)} at this config, "
                         f"data and code; train them first (the same command without --records_only){training}")


def progress_line(run: dict) -> str:
    """``"12 of 300 epochs (training or paused), best NDCG@10 0.0389 at epoch 9"`` for a
    :func:`training_progress` entry."""
    if run["stopped"]:
        state = "stopped early, not tested yet"
    elif run["epochs"] >= run["max_epochs"]:
        state = "all epochs done, not tested yet"
    else:
        state = "training or paused"
    best = "" if run["best_epoch"] is None else f", best {run['valid_metric']} {run['best_valid_score']:.4f} " \
                                                f"at epoch {run['best_epoch']}"
    return f"{run['epochs']} of {run['max_epochs']} epochs ({state}){best}"


# ----- did a re-run reproduce its record? --------------------------------------------------------
# command-line options that do not change what a run computes (or are in the key already)
_NOT_SETTINGS = ("--compare", "--seeds", "--protocol", "--checkpoint_dir", "--show_progress", "--resume", "--reuse_runs",
                 "--records_only", "--report", "--state", "--nproc", "--gpu_id")


def _run_key(record: dict, name: str):
    """``(model spec, dataset, protocol, seed, settings)`` of a record: the spec read from its
    command's ``--compare`` (``None`` when the command ran several models: the record cannot be
    attributed), ``settings`` the command's other options that change a run (``--config_files``,
    ``--epochs=5``, ...; sorted), and whether the record is of the last epoch rather than the best.
    Edits inside a config file are not seen: two records of one command are taken as one run."""
    import shlex

    spec, settings = None, []
    try:
        words = shlex.split(record.get("command") or "")
    except ValueError:
        return None
    for word in words:
        if word.startswith("--compare="):
            spec = word.split("=", 1)[1]
        elif word.startswith("--") and word.split("=", 1)[0] not in _NOT_SETTINGS:
            settings.append(word)
    depth, several = 0, False
    for char in spec or "":  # a comma outside brackets separates two models
        depth += (char == "[") - (char == "]")
        several |= char == "," and depth == 0
    if not spec or several:
        return None
    protocol = record_protocol(name)
    if "-last_epoch-" in name:
        protocol += " (last epoch)"
    seed = (record.get("result") or {}).get("seed", record.get("seed"))
    return spec, record.get("dataset"), protocol, seed, tuple(sorted(settings))


def _test_metrics(result: dict) -> dict:
    if "test_result" in result:
        return {k: float(v) for k, v in result["test_result"].items()}
    return {f"{group}/{k}": float(v) for group, g in (result.get("groups") or {}).items()
            for k, v in (g.get("metrics") or {}).items()}


def reproductions(folders) -> list[dict]:
    """Every run with records made by different code (the same model spec, dataset, protocol and
    seed; a new fingerprint): its newest record against each earlier one. Each row: ``run``,
    ``new``/``old`` (commit, date), ``test_equal``, ``curve_equal`` (the validation curves),
    ``max_test_diff`` (the largest absolute difference of a test metric)."""
    import json

    records = {}
    for folder in folders:
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            key = _run_key(record, name) if record.get("format") == RECORD_FORMAT else None
            if key is not None:
                records.setdefault(key, {})[name] = record  # a name in two folders: one record
    rows = []
    for key, by_name in sorted(records.items(), key=lambda item: str(item[0])):
        found = sorted(by_name.values(), key=lambda r: r.get("date") or "")
        new = found[-1]
        for old in found[:-1]:
            a, b = _test_metrics(new["result"]), _test_metrics(old["result"])
            diffs = [abs(a[k] - b[k]) for k in a.keys() & b.keys()]
            rows.append({"run": key, "new": (new.get("commit"), new.get("date")), "old": (old.get("commit"), old.get("date")),
                         "test_equal": a == b, "curve_equal": new["result"].get("valid_curve") == old["result"].get("valid_curve"),
                         "max_test_diff": max(diffs) if diffs else None})
    return rows


def format_reproductions(rows) -> str:
    """:func:`reproductions` as a markdown table."""
    lines = ["| run | seed | new record | earlier record | test results | validation curve | largest test difference |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        spec, dataset, protocol, seed, _ = row["run"]
        diff = "-" if row["max_test_diff"] is None else f"{row['max_test_diff']:.4f}"
        lines.append(f"| {spec} ({dataset}, {protocol}) | {seed} | {str(row['new'][0])[:7]} {str(row['new'][1])[:10]} | "
                     f"{str(row['old'][0])[:7]} {str(row['old'][1])[:10]} | {'equal' if row['test_equal'] else 'DIFFER'} | "
                     f"{'equal' if row['curve_equal'] else 'DIFFERS'} | {diff} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m recbole_genrec.evaluation.records DIR [DIR ...]
    import sys

    print(format_reproductions(reproductions(sys.argv[1:])))
