"""What one run computes: set-up (config, data, model, trainer), training with the validation
curve, and the test evaluation (plain, or on warm / cold targets).

This module, with the trainer, config, compatibility shims, the model registry and the model's own
code, is what a run's code fingerprint covers (:func:`recbole_genrec.fingerprint.run_code_files`);
the orchestration around it (seeds, run records, tables, reports, the command line) is not, so
editing those keeps resumable runs and run records valid. Nothing here imports them.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import get_environment, init_logger, init_seed, set_color

from recbole_genrec.config import Config
from recbole_genrec.evaluation.history_mask import install_history_mask
from recbole_genrec.trainer.staged import ResumableTrainer, resumable, unique_checkpoint_file
from recbole_genrec.utils import create_dataset, get_model, get_trainer


def prepare(model, dataset, config_file_list, config_dict):
    """RecBole's run set-up: ``(config, logger, trainer, train_data, valid_data, test_data)``."""
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
    # RecBole's trainers get ours' checkpoint names (unique per process, or deterministic with
    # ``resume``), ``.last`` checkpoints and resuming (recbole_genrec.trainer.staged)
    trainer_class = resumable(get_trainer(config["MODEL_TYPE"], config["model"]))
    trainer = trainer_class(config, model)
    if not isinstance(trainer, ResumableTrainer):
        if config["resume"] or config["resume_checkpoint"]:
            logger.warning(f"{trainer_class.__name__} has a training loop of its own: resume is not supported")
        if hasattr(trainer, "saved_model_file"):
            trainer.saved_model_file = unique_checkpoint_file(config)
    if config["eval_mask_history"]:
        install_history_mask(trainer, train_data, valid_data, test_data)
    if hasattr(trainer, "eval_collector"):
        unscored_items_are_misses(trainer.eval_collector)
    return config, logger, trainer, train_data, valid_data, test_data


def unscored_items_are_misses(collector) -> None:
    """Make RecBole's top-k collector count a target scored ``-inf`` as a miss.

    A beam model scores only the items its beam reached (``-inf`` elsewhere), and a protocol's mask
    or ``eval_mask_history`` sets more items to ``-inf``. Where a row has fewer than k finite
    scores, ``torch.topk`` fills the top-k with ``-inf`` items in an order of its own, and a target
    among them would count as a hit that no model made. Here the other ``-inf`` items get the
    lowest finite score instead, so a ``-inf`` target ranks below every item and is never in the
    top-k (its user's number of targets is unchanged). Rows without ``-inf`` targets keep their
    top-k and ranks as RecBole computes them (a rank-based metric such as GAUC, not used here, sees
    a ``-inf`` target ranked last)."""
    collect = collector.eval_batch_collect

    def eval_batch_collect(scores_tensor, interaction, positive_u, positive_i):
        unscored = torch.isneginf(scores_tensor)
        if scores_tensor.dim() == 2 and unscored.any():  # full ranking (value metrics score 1-d)
            rows, items = positive_u.to(scores_tensor.device), positive_i.to(scores_tensor.device)
            scores_tensor = scores_tensor.masked_fill(unscored, torch.finfo(scores_tensor.dtype).min)
            targets = unscored[rows, items]
            scores_tensor[rows[targets], items[targets]] = float("-inf")
        return collect(scores_tensor, interaction, positive_u, positive_i)

    collector.eval_batch_collect = eval_batch_collect


def started(logger, label: str) -> None:
    logger.info(set_color(label, "green") + " ... started")


def done(logger, label: str, start: float, detail: str = "") -> None:
    logger.info(set_color(label, "green") + f" ... done in {time.perf_counter() - start:.1f} s{detail}")


def fit_recording(trainer, train_data, valid_data, saved=True, show_progress=False):
    """``trainer.fit`` that also returns the validation curve ``[(epoch, valid_score)]``, taken
    through RecBole's ``callback_fn(epoch_idx, valid_score)`` (called after each evaluation), and
    the training time: ``(best, curve, train_time_s)``. A resumable trainer gives the time of the
    whole run (its stages and every process that trained its epochs); other trainers, this call's."""
    curve = []
    params = inspect.signature(trainer.fit).parameters
    kwargs = {}
    if "callback_fn" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["callback_fn"] = lambda epoch, score: curve.append((int(epoch), float(score)))
    start = time.perf_counter()
    best = trainer.fit(train_data, valid_data, saved=saved, show_progress=show_progress, **kwargs)
    train_time = getattr(trainer, "run_train_time_s", None)
    return best, curve, time.perf_counter() - start if train_time is None else train_time


def n_users(loader) -> int:
    """Number of distinct users in an evaluation loader (the rows a full-sort evaluation scores)."""
    dataset = loader._dataset
    return int(torch.unique(dataset.inter_feat[dataset.uid_field]).numel())


def train_and_test_once(model, dataset, config_file_list=None, config_dict=None, saved=True, label=None):
    """Train and test one model: ``(config, result)``, ``result`` being RecBole's result dict plus
    ``train_time_s``, ``test_time_s``, ``model_file``, ``seed``, ``valid_curve`` (``[(epoch,
    valid_score)]``), ``valid_metric`` and ``n_test_users``."""
    start = time.perf_counter()
    label = label or f"model {model}"
    config, logger, trainer, train_data, valid_data, test_data = prepare(
        model, dataset, config_file_list, dict(config_dict or {}))
    started(logger, label)
    (best_valid_score, best_valid_result), curve, train_time = fit_recording(
        trainer, train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    t = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_time = time.perf_counter() - t
    logger.info("The running environment of this training is as follows:\n" + get_environment(config).draw())
    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    done(logger, label, start, f" (train {train_time:.1f} s, test {test_time:.1f} s)")
    return config, {
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
    """Within the block, ``model.full_sort_predict`` scores only ``allowed`` items (others -inf);
    a model that decodes (``restricted_decoding``) decodes among them only."""
    original = model.full_sort_predict

    def masked(interaction):
        scores = original(interaction).view(-1, len(allowed)).clone()
        scores[:, ~allowed.to(scores.device)] = float("-inf")
        return scores

    restrict = getattr(model, "restricted_decoding", None)
    with restrict(allowed) if restrict is not None else contextlib.nullcontext():
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


def warm_cold_once(model, dataset, config_file_list, config_dict, saved=True, label=None):
    """Train one model and test it on all / warm / cold targets: ``(config, run)``, ``run`` holding
    ``seed``, ``groups`` (``{group: {"metrics": ..., "n": targets}}``), ``train_time_s``,
    ``valid_curve``, ``valid_metric``, ``test_time_s`` and ``n_test_users``."""
    start = time.perf_counter()
    label = label or f"model {model}"
    config, logger, trainer, train_data, valid_data, test_data = prepare(model, dataset, config_file_list, config_dict)
    started(logger, label)
    _, curve, train_time = fit_recording(trainer, train_data, valid_data, saved=saved,
                                         show_progress=config["show_progress"])
    timings = {}
    groups = warm_cold_metrics(trainer, train_data, test_data, load_best_model=saved, timings=timings)
    for group, (metrics, n) in groups.items():
        logger.info(f"{model} {group} targets ({n}): {metrics}")
    done(logger, label, start, f" (train {train_time:.1f} s)")
    return config, {"seed": config["seed"], "train_time_s": train_time, "valid_curve": curve,
                    "groups": {group: {"metrics": metrics, "n": n} for group, (metrics, n) in groups.items()},
                    "valid_metric": config["valid_metric"], "test_time_s": timings["test_time_s"],
                    "n_test_users": n_users(test_data)}


# ----- unseen users ----------------------------------------------------------------------------
def unseen_users_once(model, dataset, config_file_list, config_dict, saved=True, label=None):
    """TokenRec on the unseen-user protocol (see :func:`recbole_genrec.evaluation.protocols.run_unseen_users`):
    early stopping on seen users only, then the test on seen and unseen users. ``(config, run)`` with
    ``run`` as in :func:`warm_cold_once` (groups ``seen`` / ``unseen``)."""
    start = time.perf_counter()
    label = label or f"model {model}"
    config, logger, trainer, train_data, valid_data, test_data = prepare(model, dataset, config_file_list, config_dict)
    started(logger, label)
    unseen = trainer.model.unseen_users.cpu()
    valid_users = valid_data._dataset.inter_feat[valid_data._dataset.uid_field]
    valid_data = subset_loader(valid_data, ~unseen[valid_users])  # early stopping on seen users only
    _, curve, train_time = fit_recording(trainer, train_data, valid_data, saved=saved,
                                         show_progress=config["show_progress"])
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
        groups[group] = {"metrics": metrics, "n": n}
    done(logger, label, start, f" (train {train_time:.1f} s)")
    return config, {"seed": config["seed"], "train_time_s": train_time, "valid_curve": curve, "groups": groups,
                    "valid_metric": config["valid_metric"], "test_time_s": test_time,
                    "n_test_users": n_users(test_data)}
