"""Entry points mirroring RecBole's ``recbole.quick_start`` (which imports ray; this does not)."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_genrec.config import Config
from recbole_genrec.atomic import atomic_write_text
from recbole_genrec.evaluation import install_history_mask
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
    if config["eval_mask_history"]:
        install_history_mask(trainer, train_data, valid_data, test_data)
    return config, logger, trainer, train_data, valid_data, test_data


def run_recbole_genrec(
    model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
    nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0, queue=None,
) -> dict:
    """Train and test ``model`` on ``dataset``; the same result dict as RecBole's ``run_recbole``.

    Besides ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result`` and
    ``test_result``, the dict carries ``train_time_s``, ``test_time_s`` and ``model_file``.
    ``nproc`` / ``world_size`` / ``ip`` / ``port`` / ``group_offset`` are RecBole's distributed
    arguments: with ``nproc > 1`` that many processes train one model with RecBole's DDP path
    (NCCL on GPUs, gloo on CPUs) and rank 0's result is returned.
    """
    if nproc > 1 or world_size > 0:
        return _run_distributed(model, dataset, config_file_list, config_dict, saved, nproc,
                                nproc if world_size <= 0 else world_size, ip, port, group_offset)
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
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "train_time_s": train_time,
        "test_time_s": test_time,
        "model_file": trainer.saved_model_file if saved else None,
    }
    if queue is not None and config["local_rank"] == 0:
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
    rows = [{"model": name, **result["test_result"], "train_time_s": result["train_time_s"],
             "test_time_s": result["test_time_s"]} for name, result in results.items()]
    output_dir = output_dir or os.path.join(config_dict.get("checkpoint_dir", "saved"), "compare")
    write_table(rows, output_dir, f"compare-{dataset}", f"{dataset}: test results")
    return results


def write_table(rows: list[dict], output_dir: str, stem: str, title: str) -> str:
    """Write ``rows`` (dicts sharing keys) as ``<stem>.md`` and ``<stem>.csv`` (atomically) and print."""
    header = []
    for row in rows:
        header += [key for key in row if key not in header]
    cells = [[_cell(key, row.get(key)) for key in header] for row in rows]
    md_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md_lines += ["| " + " | ".join(line) + " |" for line in cells]
    table = "\n".join(md_lines) + "\n"
    os.makedirs(output_dir, exist_ok=True)
    md_path, csv_path = os.path.join(output_dir, f"{stem}.md"), os.path.join(output_dir, f"{stem}.csv")
    atomic_write_text(md_path, f"# {title}\n\n" + table)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *cells])
    atomic_write_text(csv_path, buffer.getvalue())
    print(table)
    print(f"written: {md_path} and {csv_path}")
    getLogger().info(f"{title}\n" + table)
    return table


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value)
    return f"{float(value):.1f}" if key.endswith("_s") else f"{float(value):.4f}"


def _files_set(config_file_list, key) -> bool:
    import yaml

    for path in config_file_list or []:
        with open(path) as f:
            if key in (yaml.safe_load(f) or {}):
                return True
    return False


# SETRec's protocol (Sec. 4.1): a global time-ordered 8:1:1 split of the (augmented) interactions.
WARM_COLD_EVAL_ARGS = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}


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


def warm_cold_metrics(trainer, train_data, test_data, load_best_model=False) -> dict:
    """Test metrics on all, warm and cold targets. As in SETRec's evaluation, warm targets are
    ranked among warm items and cold targets among cold items (the other group is masked)."""
    warm = warm_items(train_data._dataset)
    cold = ~warm
    cold[0] = False
    targets = test_data._dataset.inter_feat[test_data._dataset.iid_field]
    results = {"all": (dict(trainer.evaluate(test_data, load_best_model=load_best_model, show_progress=False)),
                       len(targets))}
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


def run_warm_cold(models, dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None):
    """Train each model on the warm/cold protocol; report test metrics on all, warm and cold targets.

    Warm targets are items seen in the training split, cold ones are not (see
    :func:`warm_cold_metrics`). Every model (RecBole's and ours) gets the same split, seed and
    evaluator; the table goes to ``<checkpoint_dir>/compare/warm_cold-<dataset>.{md,csv}``.
    Returns ``{model: {group: metrics}}``.
    """
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    config_dict = {"eval_args": dict(WARM_COLD_EVAL_ARGS), "topk": [5, 10], "metrics": ["Recall", "NDCG"],
                   "valid_metric": "NDCG@10", **dict(config_dict or {})}
    rows, results = [], {}
    for name in models:
        config, logger, trainer, train_data, valid_data, test_data = _prepare(
            name, dataset, config_file_list, dict(config_dict))
        start = time.perf_counter()
        trainer.fit(train_data, valid_data, saved=saved, show_progress=config["show_progress"])
        train_time = time.perf_counter() - start
        groups = warm_cold_metrics(trainer, train_data, test_data, load_best_model=saved)
        results[name] = {group: metrics for group, (metrics, _) in groups.items()}
        for group, (metrics, n) in groups.items():
            rows.append({"model": name, "targets": group, "n": n, **metrics, "train_time_s": train_time})
            logger.info(f"{name} {group} targets ({n}): {metrics}")
    output_dir = output_dir or os.path.join(config_dict.get("checkpoint_dir", "saved"), "compare")
    write_table(rows, output_dir, f"warm_cold-{dataset}", f"{dataset}: warm/cold protocol (global time-ordered 8:1:1)")
    return results


def run_unseen_users(dataset, config_file_list=None, config_dict=None, saved=True, output_dir=None, ratio=0.05):
    """TokenRec's unseen-user protocol (Sec. III-C): the ``ratio`` share of users with the fewest
    interactions is kept out of every training stage; afterwards only their LightGCN embeddings are
    refreshed from their interactions and they are evaluated with the frozen tokenizers and LLM.
    Sec. III-C: "exclude the 5% of users ... with the least interaction history from the training data
    split ... Consequently, all items interacted with by these users are also excluded from the training
    set": all their training interactions are withheld, and their validation interactions are removed
    from the early-stopping data of the LightGCN stage and of the recommender (only seen users steer it).
    Writes ``<checkpoint_dir>/compare/unseen_users-<dataset>.{md,csv}`` (seen vs unseen rows)."""
    config_dict = {"unseen_user_ratio": ratio, "topk": [10, 20], "metrics": ["Hit", "NDCG"], **dict(config_dict or {})}
    config, logger, trainer, train_data, valid_data, test_data = _prepare("TokenRec", dataset, config_file_list,
                                                                          dict(config_dict))
    unseen = trainer.model.unseen_users.cpu()
    valid_users = valid_data._dataset.inter_feat[valid_data._dataset.uid_field]
    valid_data = subset_loader(valid_data, ~unseen[valid_users])  # early stopping on seen users only
    start = time.perf_counter()
    trainer.fit(train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    train_time = time.perf_counter() - start
    users = test_data._dataset.inter_feat[test_data._dataset.uid_field]
    rows, results = [], {}
    for i, (group, mask) in enumerate({"seen": ~unseen[users], "unseen": unseen[users]}.items()):
        n = int(mask.sum())
        if saved and i == 0:
            trainer.evaluate(test_data, load_best_model=True, show_progress=False)  # loads the best checkpoint
        metrics = dict(trainer.evaluate(subset_loader(test_data, mask), load_best_model=False,
                                        show_progress=False)) if n else {}
        results[group] = metrics
        rows.append({"model": "TokenRec", "users": group, "n": n, **metrics, "train_time_s": train_time})
    output_dir = output_dir or os.path.join(config_dict.get("checkpoint_dir", "saved"), "compare")
    write_table(rows, output_dir, f"unseen_users-{dataset}", f"{dataset}: TokenRec on seen vs unseen users")
    return results
