"""Evaluation protocols run on top of RecBole's trainer: warm/cold targets (SETRec, Sec. 4.1),
unseen users (TokenRec, Sec. III-C), and the per-seed machinery that ``compare`` shares with them.

Every runner takes ``seeds`` (each model is trained once per seed, config key ``seed``; the table
shows mean ± std over seeds) and ``report_dir`` (PNG plots and ``report.md`` beside the table, see
:mod:`recbole_genrec.evaluation.report`). ``recbole_genrec.quick_start`` re-exports every name.
"""

from __future__ import annotations

import os

from recbole_genrec.evaluation import runs
from recbole_genrec.evaluation.records import (  # noqa: F401 - read_record, record_path: re-exported
    checkpoint_dir, find_record, format_missing, log_missing, log_reused, note_missing, read_record, record_path,
    require_some,
    write_record)
from recbole_genrec.evaluation.report import build_report, git_commit, require_matplotlib, write_seed_table
from recbole_genrec.evaluation.runs import (  # noqa: F401 - re-exported: their former home
    done,
    fit_recording,
    n_users,
    restricted_catalogue,
    started,
    subset_loader,
    warm_cold_metrics,
    warm_items,
)

# SETRec's protocol (Sec. 4.1): a global time-ordered 8:1:1 split of the (augmented) interactions.
WARM_COLD_EVAL_ARGS = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}


# ----- seeds, progress, one run ----------------------------------------------------------------
def parse_seeds(seeds) -> list[int] | None:
    """``"2020,2021"``, ``[2020, 2021]`` or ``2020`` as a list of distinct ints; ``None`` stays ``None``
    (one run with the config's ``seed``)."""
    if seeds is None:
        return None
    if isinstance(seeds, str):
        parts = [p.strip() for p in seeds.split(",") if p.strip()]
    elif isinstance(seeds, int):
        parts = [seeds]
    else:
        parts = list(seeds)
    try:
        out = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"seeds: comma-separated integers expected (e.g. 2020,2021,2022), got {seeds!r}") from None
    if not out:
        raise ValueError("seeds: give at least one seed (e.g. --seeds=2020,2021,2022)")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: each seed once, got {out}")
    return out


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas that are not inside brackets, braces or quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            depth += char in "[({"
            depth -= char in "])}"
        if char == "," and depth == 0 and not quote:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in [*parts, current] if p.strip()]


def model_list(models) -> list[str]:
    """``"SASRec,SETRec[llm_preset=qwen2-tiny]"`` (or a list) as a list of model specs."""
    if isinstance(models, str):
        return _split_top_level(models)
    return list(models)


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"SETRec[llm_preset=qwen2-tiny,n_sem=2]"`` -> ``("SETRec", {"llm_preset": "qwen2-tiny", "n_sem": 2})``:
    a model with config keys of its own (values read as YAML), so one table can hold variants of a
    model (a row is labelled by its spec). A plain name has no overrides."""
    import re

    import yaml

    match = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\[(.*)\])?\s*", spec)
    if match is None:
        raise ValueError(f"compare: {spec!r} is not a model name or MODEL[key=value,...]")
    overrides = {}
    for item in _split_top_level(match.group(2) or ""):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"compare: {spec!r}: {item!r} is not key=value")
        try:
            parsed = yaml.safe_load(value.strip())
        except yaml.YAMLError as error:
            raise ValueError(f"compare: {spec!r}: {value.strip()!r} is not a YAML value ({error})") from None
        if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string; RecBole's loader as a float
        overrides[key.strip()] = parsed
    return match.group(1), overrides


def _command_line_keys() -> set[str]:
    """Config keys given as ``--key=value`` on the command line (RecBole's Config reads them last)."""
    import sys

    return {arg[2:].partition("=")[0] for arg in sys.argv[1:] if arg.startswith("--") and "=" in arg}


def each_run(models: list[str], config_dict: dict, seeds: list[int] | None):
    """``(label, spec, model, config_dict)`` for every model spec (see :func:`parse_model_spec`) and
    seed, models outermost; the spec's own keys override ``config_dict``."""
    for i, spec in enumerate(models, 1):
        name, overrides = parse_model_spec(spec)
        clash = sorted(set(overrides) & _command_line_keys())
        if clash:  # RecBole's Config would let the command line win over the variant's own keys
            raise ValueError(f"compare: {spec!r} sets {clash}, which the command line also sets; give them in one place")
        for j, seed in enumerate(seeds or [None], 1):
            label = f"model {i}/{len(models)}: {spec}"
            if seeds is None:
                yield label, spec, name, {**config_dict, **overrides}
            else:
                yield f"{label} (seed {seed}, {j}/{len(seeds)})", spec, name, {**config_dict, **overrides, "seed": seed}


def store(results: dict, key, seeds, seed, value) -> None:
    """``results[key] = value`` without seeds, ``results[key][seed] = value`` with them."""
    if seeds is None:
        results[key] = value
    else:
        results.setdefault(key, {})[seed] = value


def train_and_test(model, dataset, config_file_list=None, config_dict=None, saved=True, label=None,
                   reuse_runs=False, records_only=False) -> dict | None:
    """One single-process run (what ``run_recbole_genrec`` and ``compare`` call): train, test and
    return the result of :func:`~recbole_genrec.evaluation.runs.train_and_test_once` plus ``record``
    (command, commit, date and path of the run record written to ``<checkpoint_dir>/runs/``).
    ``reuse_runs``: return the record of an earlier run with the same config, data and code
    (:func:`~recbole_genrec.evaluation.records.record_path`) instead of training again;
    ``records_only``: return ``None`` when there is no such record."""
    return _recorded(runs.train_and_test_once, "leave_one_out", model, dataset, config_file_list,
                     dict(config_dict or {}), saved, label or f"model {model}", reuse_runs, records_only)


def _recorded(run_once, protocol, model, dataset, config_file_list, config_dict, saved, label, reuse_runs,
              records_only):
    """``run_once(model, dataset, config_file_list, config_dict, saved=, label=) -> (config, result)``
    behind its run record: the record's result when reusing, ``None`` for a missing one with
    ``records_only``, else the run's result, recorded. The record's name and commit are taken before
    training: the code may be edited while the run trains."""
    config, path, result = find_record(model, dataset, config_file_list, config_dict, protocol=protocol, saved=saved)
    if reuse_runs or records_only:
        if result is not None:
            log_reused(config, label, path, result)
            return result
        if records_only:
            log_missing(label, path)
            return None
    commit = git_commit()
    config, result = run_once(model, dataset, config_file_list, config_dict, saved=saved, label=label)
    result["eval_mask_history"] = bool(config["eval_mask_history"])
    if saved and (config["resume"] or config["resume_checkpoint"]) and not result.get("model_file"):
        # a warm/cold run returns no checkpoint name; a resumable one has the run's deterministic name,
        # from the run's own config (a data transform, BERT4Rec's masking, adds keys to it)
        from recbole_genrec.trainer.staged import run_checkpoint_file

        model_file = run_checkpoint_file(config)[0]
        if os.path.isfile(model_file):
            result["model_file"] = model_file
    if config["single_spec"] or config["local_rank"] == 0:
        result["record"] = write_record(path, config, result, commit)
    return result


def run_warm_cold(models, dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None,
                  seeds=None, report_dir=None, reuse_runs=False, records_only=False):
    """Train each model on the warm/cold protocol; report test metrics on all, warm and cold targets.

    Warm targets are items seen in the training split, cold ones are not (see
    :func:`warm_cold_metrics`). Every model (RecBole's and ours) gets the same split, seed and
    evaluator; the table goes to ``warm_cold-<dataset>.{md,csv}`` under ``output_dir`` (default
    ``report_dir``, else ``<checkpoint_dir>/compare``). Returns ``{model: {group: metrics}}``, or
    ``{model: {seed: {group: metrics}}}`` when ``seeds`` is given. ``report_dir`` adds the
    all/warm/cold panels, validation curves, inference time per user and ``report.md``. Every run
    leaves a record (``<checkpoint_dir>/runs/<model>-<dataset>-warm_cold-seed<seed>-*.json``);
    ``reuse_runs`` / ``records_only`` as in :func:`train_and_test`.
    """
    models, seeds = model_list(models), parse_seeds(seeds)
    if report_dir:
        require_matplotlib()
    config_dict = {"eval_args": dict(WARM_COLD_EVAL_ARGS), "topk": [5, 10], "metrics": ["Recall", "NDCG"],
                   "valid_metric": "NDCG@10", **dict(config_dict or {})}
    rows, run_list, results, missing, in_training, folder = [], [], {}, [], [], None
    for label, spec, name, run_config in each_run(models, config_dict, seeds):
        folder = folder or checkpoint_dir(name, dataset, config_file_list, run_config)  # as the runs resolve it
        run = _recorded(runs.warm_cold_once, "warm_cold", name, dataset, config_file_list, run_config, saved, label,
                        reuse_runs, records_only)
        if run is None:
            note_missing(missing, in_training, spec, name, dataset, config_file_list, run_config)
            continue
        store(results, spec, seeds, run["seed"], {group: g["metrics"] for group, g in run["groups"].items()})
        for group, g in run["groups"].items():
            rows.append({"model": spec, "targets": group, "n": g["n"], "seed": run["seed"], **g["metrics"],
                         "train_time_s": run["train_time_s"]})
        run_list.append({"model": spec, **run})
    require_some(rows, missing, folder, in_training)
    _write_outputs(rows, run_list, "targets", folder, output_dir, report_dir, f"warm_cold-{dataset}",
                   f"{dataset}: warm/cold protocol (global time-ordered 8:1:1)", f"{dataset} warm/cold", missing,
                   in_training, per_user_targets=config_dict["eval_args"].get("group_by", "user") != "user")
    return results


def _write_outputs(rows, run_list, group_key, folder, output_dir, report_dir, stem, title, label, missing=(),
                   in_training=(), per_user_targets=False):
    """A protocol's per-group table (mean ± std over seeds) and, with ``report_dir``, its report
    (``per_user_targets``: the split is not grouped by user, see ``history_masking_note``); by default
    in ``<folder>/compare`` (``folder``: the runs' checkpoint_dir)."""
    output_dir = output_dir or report_dir or os.path.join(folder, "compare")
    table, summaries = write_seed_table(rows, ("model", group_key), output_dir, stem, title)
    if report_dir:
        build_report(report_dir, title, table, stem, summaries, run_list, group_key=group_key, label=label,
                     missing=missing, in_training=in_training, per_user_targets=per_user_targets)


# ----- unseen users ----------------------------------------------------------------------------
def run_unseen_users(dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None, ratio=0.05,
                     seeds=None, report_dir=None):
    """TokenRec's unseen-user protocol (Sec. III-C): the ``ratio`` share of users with the fewest
    interactions is kept out of every training stage; afterwards only their LightGCN embeddings are
    refreshed from their interactions and they are evaluated with the frozen tokenizers and LLM.
    Sec. III-C: "exclude the 5% of users ... with the least interaction history from the training data
    split ... Consequently, all items interacted with by these users are also excluded from the training
    set": all their training interactions are withheld, and their validation interactions are removed
    from the early-stopping data of the LightGCN stage and of the recommender (only seen users steer it).
    Writes ``unseen_users-<dataset>.{md,csv}`` (seen vs unseen rows) under ``output_dir`` (default
    ``report_dir``, else ``<checkpoint_dir>/compare``). Returns ``{group: metrics}``, or
    ``{seed: {group: metrics}}`` when ``seeds`` is given."""
    seeds = parse_seeds(seeds)
    if report_dir:
        require_matplotlib()
    config_dict = {"unseen_user_ratio": ratio, "topk": [10, 20], "metrics": ["Hit", "NDCG"], **dict(config_dict or {})}
    rows, run_list, results = [], [], {}
    for label, _, name, run_config in each_run(["TokenRec"], config_dict, seeds):
        config, run = runs.unseen_users_once(name, dataset, config_file_list, run_config, saved=saved, label=label)
        for group, g in run["groups"].items():
            rows.append({"model": name, "users": group, "n": g["n"], "seed": run["seed"], **g["metrics"],
                         "train_time_s": run["train_time_s"]})
        store(results, "groups", seeds, run["seed"], {group: g["metrics"] for group, g in run["groups"].items()})
        run_list.append({"model": name, **run})
    _write_outputs(rows, run_list, "users", config["checkpoint_dir"], output_dir, report_dir, f"unseen_users-{dataset}",
                   f"{dataset}: TokenRec on seen vs unseen users", f"{dataset} TokenRec")
    return results["groups"]
