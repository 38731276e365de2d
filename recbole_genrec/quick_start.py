"""Entry points mirroring RecBole's ``recbole.quick_start`` (which imports ray; this does not)."""

from __future__ import annotations

import os
import sys
import time
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed

from recbole_genrec.evaluation.protocols import (  # noqa: F401 - re-exported: the protocols' former home
    WARM_COLD_EVAL_ARGS,
    restricted_catalogue,
    run_unseen_users,
    run_warm_cold,
    subset_loader,
    warm_cold_metrics,
    warm_items,
)
from recbole_genrec.evaluation.report import _cell, write_table  # noqa: F401 - re-exported
from recbole_genrec.evaluation.runs import prepare as _prepare  # noqa: F401 - re-exported: its former home
from recbole_genrec.recommend import recommend  # noqa: F401 - re-exported
from recbole_genrec.utils import create_dataset, get_model

# Leave-one-out in time order, full ranking: RecBole's sequential protocol, used for every model
# of a comparison unless eval_args is given.
SHARED_EVAL_ARGS = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


def run_recbole_genrec(
    model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
    nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0, queue=None,
) -> dict:
    """Train and test ``model`` on ``dataset``; the same result dict as RecBole's ``run_recbole``.

    Besides ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and
    ``test_result``, the dict carries ``train_time_s``, ``test_time_s``, ``model_file``, ``seed``,
    ``valid_curve`` (``[(epoch, valid_score)]``), ``valid_metric`` and ``n_test_users``.
    ``nproc`` / ``world_size`` / ``ip`` / ``port`` / ``group_offset`` are RecBole's distributed
    arguments: with ``nproc > 1`` that many processes train one model with RecBole's DDP path
    (NCCL on GPUs, gloo on CPUs) and rank 0's result is returned.
    """
    if nproc > 1 or world_size > 0:
        return _run_distributed(model, dataset, config_file_list, config_dict, saved, nproc,
                                nproc if world_size <= 0 else world_size, ip, port, group_offset)
    from recbole_genrec.evaluation.protocols import train_and_test

    result = train_and_test(model, dataset, config_file_list, config_dict, saved=saved)
    if queue is not None and (config_dict or {}).get("local_rank", 0) == 0:
        queue.put(result)
    return result


def _run_rank(rank, model, dataset, config_file_list, config_dict, saved, queue):
    run_recbole_genrec(model, dataset, config_file_list, {**config_dict, "local_rank": rank}, saved, queue=queue)


def _run_distributed(model, dataset, config_file_list, config_dict, saved, nproc, world_size, ip, port, offset):
    """RecBole's ``run`` with ``nproc`` spawned processes; returns rank 0's result dict."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    config_dict = {**(config_dict or {}), "world_size": world_size, "ip": ip, "port": str(port),
                   "nproc": nproc, "offset": offset}
    mp.spawn(_run_rank, args=(model, dataset, config_file_list, config_dict, saved, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def objective_function(config_dict=None, config_file_list=None, saved=True) -> dict:
    """RecBole's hyper-parameter objective (same keys as ``recbole.quick_start``)."""
    result = run_recbole_genrec(config_file_list=config_file_list, config_dict=config_dict, saved=saved)
    return {
        "model": (config_dict or {}).get("model"),
        "best_valid_score": result["best_valid_score"],
        "valid_score_bigger": result["valid_score_bigger"],
        "best_valid_result": result["best_valid_result"],
        "test_result": result["test_result"],
    }


def load_data_and_model(model_file):
    """Rebuild config, data and model from a checkpoint written by :func:`run_recbole_genrec`."""
    from recbole_genrec.compat import safe_torch_load

    checkpoint = safe_torch_load(model_file)  # allow-listed classes only (compat shim 2)
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, data, train_data, valid_data, test_data


def compare(models, dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None,
            seeds=None, report_dir=None, reuse_runs=False, records_only=False):
    """Run each model on the same dataset, split and seed(s); write one results table.

    ``models``: names, or ``MODEL[key=value,...]`` specs for variants of a model with keys of their
    own (``"SETRec,SETRec[llm_preset=qwen2-tiny]"``; rows are labelled by the spec).

    Every model gets the same ``eval_args`` (``SHARED_EVAL_ARGS`` unless the caller sets it).
    Writes ``compare-<dataset>.md`` and ``compare-<dataset>.csv`` (every test metric, training
    and evaluation time per model) under ``output_dir`` (default ``report_dir``, else
    ``<checkpoint_dir>/compare``) and prints the markdown table. ``seeds`` (``[2020, 2021]`` or
    ``"2020,2021"``) trains every model once per seed: the markdown shows mean ± std over seeds,
    the CSV every per-seed row plus mean and std rows. ``report_dir`` adds PNG plots (test
    metrics, validation curves, inference time per user) and ``report.md`` (needs the ``report``
    extra). Returns ``{model: result_dict}`` (``run_recbole_genrec``'s keys plus ``seed``,
    ``valid_curve``, ``valid_metric``, ``n_test_users``), or ``{model: {seed: result_dict}}``
    when ``seeds`` is given. Every run leaves a record (result, command, commit, date) in
    ``<checkpoint_dir>/runs/``; ``reuse_runs`` takes a model's result from the record of an earlier
    run with the same config, data and code instead of training it again, so long runs can be done
    one model at a time (in separate processes) and tabulated together. ``records_only`` trains
    nothing: the table holds the runs that have a record, and ``report.md`` lists the ones missing
    (with the validation curve so far of those that are training with ``--resume=True``).
    """
    from recbole_genrec.evaluation.protocols import each_run, model_list, parse_seeds, store, train_and_test
    from recbole_genrec.evaluation.records import checkpoint_dir, note_missing, require_some
    from recbole_genrec.evaluation.report import build_report, require_matplotlib, write_seed_table

    models, seeds = model_list(models), parse_seeds(seeds)
    if not models:
        raise ValueError("compare: give at least one model name (e.g. --compare=SASRec,LightGCN)")
    if report_dir:
        require_matplotlib()  # before any training
    config_dict = dict(config_dict or {})
    if "eval_args" not in config_dict and not _files_set(config_file_list, "eval_args"):
        # RecBole's general models default to a random 8:1:1 split, its sequential ones to
        # leave-one-out: one protocol for all makes the table comparable.
        config_dict["eval_args"] = dict(SHARED_EVAL_ARGS)
    results, rows, runs, missing, in_training, folder = {}, [], [], [], [], None
    for label, spec, name, run_config in each_run(models, config_dict, seeds):
        folder = folder or checkpoint_dir(name, dataset, config_file_list, run_config)  # as the runs resolve it
        result = train_and_test(name, dataset, config_file_list, run_config, saved=saved, label=label,
                                reuse_runs=reuse_runs, records_only=records_only)
        if result is None:
            note_missing(missing, in_training, spec, name, dataset, config_file_list, run_config)
            continue
        store(results, spec, seeds, result["seed"], result)
        rows.append({"model": spec, "seed": result["seed"], **result["test_result"],
                     "train_time_s": result["train_time_s"], "test_time_s": result["test_time_s"]})
        runs.append({"model": spec, **result})
    require_some(rows, missing, folder, in_training)
    output_dir = output_dir or report_dir or os.path.join(folder, "compare")
    title, stem = f"{dataset}: test results", f"compare-{dataset}"
    table, summaries = write_seed_table(rows, ("model",), output_dir, stem, title)
    if report_dir:
        build_report(report_dir, title, table, stem, summaries, runs, label=dataset, missing=missing,
                     in_training=in_training)
    return results


def _files_set(config_file_list, key) -> bool:
    import yaml

    for path in config_file_list or []:
        with open(path) as f:
            if key in (yaml.safe_load(f) or {}):
                return True
    return False
