"""Entry points mirroring RecBole's ``recbole.quick_start`` (which imports ray; this does not)."""

from __future__ import annotations

import csv
import os
import sys
import time
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_genrec.config import Config
from recbole_genrec.utils import create_dataset, get_model, get_trainer

# Leave-one-out in time order, full ranking: RecBole's sequential protocol, used for every model
# of a comparison unless eval_args is given.
SHARED_EVAL_ARGS = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


def _prepare(model, dataset, config_file_list, config_dict):
    config = Config(
        model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict
    )
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    data = create_dataset(config)
    logger.info(data)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    return config, logger, trainer, train_data, valid_data, test_data


def run_recbole_genrec(
    model=None, dataset=None, config_file_list=None, config_dict=None, saved=True
) -> dict:
    """Train and test ``model`` on ``dataset``; the same result dict as RecBole's ``run_recbole``.

    Besides ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and
    ``test_result``, the dict carries ``train_time_s``, ``test_time_s`` and ``model_file``.
    """
    config, logger, trainer, train_data, valid_data, test_data = _prepare(
        model, dataset, config_file_list, config_dict
    )
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    test_result = trainer.evaluate(
        test_data, load_best_model=saved, show_progress=config["show_progress"]
    )
    test_time = time.perf_counter() - start
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    return {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "train_time_s": train_time,
        "test_time_s": test_time,
        "model_file": trainer.saved_model_file if saved else None,
    }


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
    checkpoint = torch.load(model_file, weights_only=False)  # our own checkpoint (pickled Config)
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


def compare(models, dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None):
    """Run each model on the same dataset, split and seed; write one results table.

    Every model gets the same ``eval_args`` (``SHARED_EVAL_ARGS`` unless the caller sets it).
    Writes ``compare-<dataset>.md`` and ``compare-<dataset>.csv`` (every test metric, training
    and evaluation time per model) under ``output_dir`` (default: ``<checkpoint_dir>/compare``)
    and prints the markdown table. Returns ``{model: result_dict}``.
    """
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not models:
        raise ValueError("compare: give at least one model name (e.g. --compare=SASRec,LightGCN)")
    config_dict = dict(config_dict or {})
    if "eval_args" not in config_dict and not _files_set(config_file_list, "eval_args"):
        # RecBole's general models default to a random 8:1:1 split, its sequential ones to
        # leave-one-out: one protocol for all makes the table comparable.
        config_dict["eval_args"] = dict(SHARED_EVAL_ARGS)
    results = {}
    for name in models:
        results[name] = run_recbole_genrec(
            model=name, dataset=dataset, config_file_list=config_file_list,
            config_dict=dict(config_dict), saved=saved,
        )
    checkpoint_dir = config_dict.get("checkpoint_dir", "saved")
    metric_names = []
    for result in results.values():
        for key in result["test_result"]:
            if key not in metric_names:
                metric_names.append(key)
    header = ["model", *metric_names, "train_time_s", "test_time_s"]
    rows = []
    for name, result in results.items():
        metrics = [result["test_result"].get(m) for m in metric_names]
        rows.append([name, *[("" if v is None else f"{float(v):.4f}") for v in metrics],
                     f"{result['train_time_s']:.1f}", f"{result['test_time_s']:.1f}"])
    output_dir = output_dir or os.path.join(checkpoint_dir, "compare")
    os.makedirs(output_dir, exist_ok=True)
    md_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md_lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(md_lines) + "\n"
    md_path = os.path.join(output_dir, f"compare-{dataset}.md")
    csv_path = os.path.join(output_dir, f"compare-{dataset}.csv")
    _atomic_write_text(md_path, f"# {dataset}: test results\n\n" + table)
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, csv_path)
    print(table)
    print(f"written: {md_path} and {csv_path}")
    getLogger().info("comparison table\n" + table)
    return results


def _files_set(config_file_list, key) -> bool:
    import yaml

    for path in config_file_list or []:
        with open(path) as f:
            if key in (yaml.safe_load(f) or {}):
                return True
    return False


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
