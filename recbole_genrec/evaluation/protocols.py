"""Evaluation protocols run on top of RecBole's trainer: warm/cold targets (SETRec, Sec. 4.1),
unseen users (TokenRec, Sec. III-C), and the per-seed machinery that ``compare`` shares with them.

Every runner takes ``seeds`` (each model is trained once per seed, config key ``seed``; the table
shows mean ± std over seeds) and ``report_dir`` (PNG plots and ``report.md`` beside the table, see
:mod:`recbole_genrec.evaluation.report`). ``recbole_genrec.quick_start`` re-exports every name.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time

import torch
from recbole.utils import get_environment, set_color

from recbole_genrec.evaluation.records import (  # noqa: F401 - read_record: re-exported
    find_record, log_reused, read_record, record_path, require_some, write_record)
from recbole_genrec.evaluation.report import build_report, require_matplotlib, write_seed_table

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


def model_list(models) -> list[str]:
    if isinstance(models, str):
        return [m.strip() for m in models.split(",") if m.strip()]
    return list(models)


def each_run(models: list[str], config_dict: dict, seeds: list[int] | None):
    """``(label, model, config_dict)`` for every model and seed, models outermost."""
    for i, name in enumerate(models, 1):
        for j, seed in enumerate(seeds or [None], 1):
            label = f"model {i}/{len(models)}: {name}"
            if seeds is None:
                yield label, name, dict(config_dict)
            else:
                yield f"{label} (seed {seed}, {j}/{len(seeds)})", name, {**config_dict, "seed": seed}


def store(results: dict, key, seeds, seed, value) -> None:
    """``results[key] = value`` without seeds, ``results[key][seed] = value`` with them."""
    if seeds is None:
        results[key] = value
    else:
        results.setdefault(key, {})[seed] = value


def _started(logger, label: str) -> None:
    logger.info(set_color(label, "green") + " ... started")


def _done(logger, label: str, start: float, detail: str = "") -> None:
    logger.info(set_color(label, "green") + f" ... done in {time.perf_counter() - start:.1f} s{detail}")


def fit_recording(trainer, train_data, valid_data, saved=True, show_progress=False):
    """``trainer.fit`` that also returns the validation curve ``[(epoch, valid_score)]``, taken
    through RecBole's ``callback_fn(epoch_idx, valid_score)`` (called after each evaluation)."""
    curve = []
    params = inspect.signature(trainer.fit).parameters
    kwargs = {}
    if "callback_fn" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["callback_fn"] = lambda epoch, score: curve.append((int(epoch), float(score)))
    best = trainer.fit(train_data, valid_data, saved=saved, show_progress=show_progress, **kwargs)
    return best, curve


def n_users(loader) -> int:
    """Number of distinct users in an evaluation loader (the rows a full-sort evaluation scores)."""
    dataset = loader._dataset
    return int(torch.unique(dataset.inter_feat[dataset.uid_field]).numel())


def train_and_test(model, dataset, config_file_list=None, config_dict=None, saved=True, label=None,
                   reuse_runs=False, records_only=False) -> dict | None:
    """One single-process run (what ``run_recbole_genrec`` and ``compare`` call): train, test and
    return RecBole's result dict plus times, ``seed``, ``valid_curve`` (``[(epoch, valid_score)]``),
    ``valid_metric``, ``n_test_users`` and ``record`` (command, commit, date and path of the run
    record written to ``<checkpoint_dir>/runs/``). ``reuse_runs``: return the record of an earlier
    run with the same config, data and code (:func:`~recbole_genrec.evaluation.records.record_path`)
    instead of training again; ``records_only``: return ``None`` when there is no such record."""
    from recbole_genrec.quick_start import _prepare  # quick_start imports this package

    start = time.perf_counter()
    label = label or f"model {model}"
    config_dict = dict(config_dict or {})
    if reuse_runs or records_only:
        config, path, result = find_record(model, dataset, config_file_list, config_dict)
        if result is not None:
            log_reused(config, label, path, result)
            return result
        if records_only:
            return None
    config, logger, trainer, train_data, valid_data, test_data = _prepare(
        model, dataset, config_file_list, config_dict)
    _started(logger, label)
    t = time.perf_counter()
    (best_valid_score, best_valid_result), curve = fit_recording(
        trainer, train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    train_time = time.perf_counter() - t
    t = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_time = time.perf_counter() - t
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    _done(logger, label, start, f" (train {train_time:.1f} s, test {test_time:.1f} s)")
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "train_time_s": train_time,
        "test_time_s": test_time,
        "model_file": trainer.saved_model_file if saved else None,
        "seed": config["seed"],
        "valid_curve": curve,
        "valid_metric": config["valid_metric"],
        "n_test_users": n_users(test_data),
    }
    if not config["single_spec"] and config["local_rank"] != 0:
        return result
    result["record"] = write_record(record_path(config), config, result)
    return result


# ----- warm / cold targets ---------------------------------------------------------------------
def warm_items(train_dataset) -> torch.Tensor:
    """``[n_items]`` bool: items seen in the training split (as a target or in a history)."""
    seen = torch.zeros(train_dataset.item_num, dtype=torch.bool)
    inter = train_dataset.inter_feat
    seen[inter[train_dataset.iid_field]] = True
    list_field = train_dataset.iid_field + train_dataset.config["LIST_SUFFIX"]
    if list_field in inter:
        seen[inter[list_field].flatten()] = True
    seen[0] = False
    return seen


def subset_loader(loader, rows: torch.Tensor):
    """The evaluation loader restricted to the interactions ``rows`` (a bool mask)."""
    dataset = loader._dataset.copy(loader._dataset.inter_feat[rows.nonzero().flatten()])
    subset = type(loader)(loader.config, dataset, loader._sampler, shuffle=False)
    subset.history_split = getattr(loader, "history_split", None)  # eval_mask_history applies to it too
    return subset


@contextlib.contextmanager
def restricted_catalogue(model, allowed: torch.Tensor):
    """Within the block, ``model.full_sort_predict`` scores only ``allowed`` items (others -inf)."""
    original = model.full_sort_predict

    def masked(interaction):
        scores = original(interaction).view(-1, len(allowed)).clone()
        scores[:, ~allowed.to(scores.device)] = float("-inf")
        return scores

    model.full_sort_predict = masked
    try:
        yield
    finally:
        del model.full_sort_predict


def warm_cold_metrics(trainer, train_data, test_data, load_best_model=False, timings: dict | None = None) -> dict:
    """Test metrics on all, warm and cold targets. As in SETRec's evaluation, warm targets are
    ranked among warm items and cold targets among cold items (the other group is masked).
    ``timings``, when given, receives ``test_time_s`` (the evaluation on all targets)."""
    warm = warm_items(train_data._dataset)
    cold = ~warm
    cold[0] = False
    targets = test_data._dataset.inter_feat[test_data._dataset.iid_field]
    start = time.perf_counter()
    results = {"all": (dict(trainer.evaluate(test_data, load_best_model=load_best_model, show_progress=False)),
                       len(targets))}
    if timings is not None:
        timings["test_time_s"] = time.perf_counter() - start
    for group, items in (("warm", warm), ("cold", cold)):
        rows = items[targets]
        n = int(rows.sum())
        metrics = {}
        if n:
            with restricted_catalogue(trainer.model, items):
                metrics = dict(trainer.evaluate(subset_loader(test_data, rows), load_best_model=False,
                                                show_progress=False))
        results[group] = (metrics, n)
    return results


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
    rows, runs, results, missing = [], [], {}, []
    for label, name, run_config in each_run(models, config_dict, seeds):
        run = _warm_cold_run(name, dataset, config_file_list, run_config, saved, label, reuse_runs, records_only)
        if run is None:
            missing.append(f"{name} (seed {run_config.get('seed', 'default')})")
            continue
        store(results, name, seeds, run["seed"], {group: g["metrics"] for group, g in run["groups"].items()})
        for group, g in run["groups"].items():
            rows.append({"model": name, "targets": group, "n": g["n"], "seed": run["seed"], **g["metrics"],
                         "train_time_s": run["train_time_s"]})
        runs.append({"model": name, **run})
    require_some(rows, missing, config_dict)
    _write_outputs(rows, runs, "targets", config_dict, output_dir, report_dir, f"warm_cold-{dataset}",
                   f"{dataset}: warm/cold protocol (global time-ordered 8:1:1)", f"{dataset} warm/cold", missing)
    return results


def _warm_cold_run(name, dataset, config_file_list, run_config, saved, label, reuse_runs, records_only):
    """One model and seed of :func:`run_warm_cold`: its record, or a trained and tested run (recorded)."""
    from recbole_genrec.quick_start import _prepare  # quick_start imports this package

    if reuse_runs or records_only:
        config, path, run = find_record(name, dataset, config_file_list, run_config, protocol="warm_cold")
        if run is not None:
            log_reused(config, label, path, run)
            return run
        if records_only:
            return None
    start = time.perf_counter()
    config, logger, trainer, train_data, valid_data, test_data = _prepare(name, dataset, config_file_list, run_config)
    _started(logger, label)
    t = time.perf_counter()
    _, curve = fit_recording(trainer, train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    train_time = time.perf_counter() - t
    timings = {}
    groups = warm_cold_metrics(trainer, train_data, test_data, load_best_model=saved, timings=timings)
    for group, (metrics, n) in groups.items():
        logger.info(f"{name} {group} targets ({n}): {metrics}")
    run = {"seed": config["seed"], "groups": {group: {"metrics": metrics, "n": n} for group, (metrics, n) in groups.items()},
           "train_time_s": train_time, "valid_curve": curve, "valid_metric": config["valid_metric"],
           "test_time_s": timings["test_time_s"], "n_test_users": n_users(test_data)}
    _done(logger, label, start, f" (train {train_time:.1f} s)")
    if config["single_spec"] or config["local_rank"] == 0:
        run["record"] = write_record(record_path(config, "warm_cold"), config, run)
    return run


def _write_outputs(rows, runs, group_key, config_dict, output_dir, report_dir, stem, title, label, missing=()):
    """A protocol's per-group table (mean ± std over seeds) and, with ``report_dir``, its report."""
    output_dir = output_dir or report_dir or os.path.join(config_dict.get("checkpoint_dir", "saved"), "compare")
    table, summaries = write_seed_table(rows, ("model", group_key), output_dir, stem, title)
    if report_dir:
        build_report(report_dir, title, table, stem, summaries, runs, group_key=group_key, label=label,
                     missing=missing)


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
    from recbole_genrec.quick_start import _prepare  # quick_start imports this package

    seeds = parse_seeds(seeds)
    if report_dir:
        require_matplotlib()
    config_dict = {"unseen_user_ratio": ratio, "topk": [10, 20], "metrics": ["Hit", "NDCG"], **dict(config_dict or {})}
    rows, runs, results = [], [], {}
    for label, name, run_config in each_run(["TokenRec"], config_dict, seeds):
        start = time.perf_counter()
        config, logger, trainer, train_data, valid_data, test_data = _prepare(
            name, dataset, config_file_list, run_config)
        _started(logger, label)
        unseen = trainer.model.unseen_users.cpu()
        valid_users = valid_data._dataset.inter_feat[valid_data._dataset.uid_field]
        valid_data = subset_loader(valid_data, ~unseen[valid_users])  # early stopping on seen users only
        t = time.perf_counter()
        _, curve = fit_recording(trainer, train_data, valid_data, saved=saved, show_progress=config["show_progress"])
        train_time = time.perf_counter() - t
        users = test_data._dataset.inter_feat[test_data._dataset.uid_field]
        groups, test_time = {}, 0.0
        for i, (group, mask) in enumerate({"seen": ~unseen[users], "unseen": unseen[users]}.items()):
            n = int(mask.sum())
            if saved and i == 0:
                trainer.evaluate(test_data, load_best_model=True, show_progress=False)  # loads the best checkpoint
            t = time.perf_counter()
            metrics = dict(trainer.evaluate(subset_loader(test_data, mask), load_best_model=False,
                                            show_progress=False)) if n else {}
            test_time += time.perf_counter() - t
            groups[group] = metrics
            rows.append({"model": name, "users": group, "n": n, "seed": config["seed"], **metrics,
                         "train_time_s": train_time})
        if seeds is None:
            results = groups
        else:
            results[config["seed"]] = groups
        runs.append({"model": name, "seed": config["seed"], "valid_curve": curve, "valid_metric": config["valid_metric"],
                     "test_time_s": test_time, "n_test_users": n_users(test_data)})
        _done(logger, label, start, f" (train {train_time:.1f} s)")
    _write_outputs(rows, runs, "users", config_dict, output_dir, report_dir, f"unseen_users-{dataset}",
                   f"{dataset}: TokenRec on seen vs unseen users", f"{dataset} TokenRec")
    return results
