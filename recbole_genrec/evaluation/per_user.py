"""Each test user's metrics in a finished run, for paired comparisons between models.

A run record keeps only the mean of each test metric, so a report can compare two models only by
the unpaired standard error over their test users, although both rank the same users (under
leave-one-out, every user once). This module re-evaluates a run's best checkpoint on the test
split through the run's own trainer and RecBole's evaluator (the collector rule of every run
included: an item scored ``-inf`` is never a hit), keeps each user's value of every top-k metric
(RecBole's own ``metric_info``), and refuses the result unless its means equal the record's test
result: the checkpoint must reproduce the record, on this machine and with this code.

    python -m recbole_genrec.evaluation.per_user RUNS_DIR OUT_DIR

writes ``OUT_DIR/<checkpoint name>.json`` for each leave-one-out record in ``RUNS_DIR`` whose
checkpoint is on disk and that has no such file yet (``bash results/lanes.sh report`` does this for
``results/ml-100k/per_user``); :func:`paired_difference` is what the report's "Against SASRec"
lines use (``report.versus_baseline``).

    python -m recbole_genrec.evaluation.per_user RUNS_DIR OUT_DIR --protocol=warm_cold

does the same for warm/cold records (``OUT_DIR/<record name>.json``): a test user has several
targets there, so each test interaction's metrics are kept, on all, warm and cold targets (each
group evaluated as the run was), keyed by user and target item; the paired standard error is then
clustered by user. Only models that rank each test interaction once (sequential ones) have them:
RecBole ranks a general model (LightGCN) once per user with all its targets.
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import math
import os
import sys

FORMAT = 2  # 2: with history_masked
# a record's test result is rounded to RecBole's metric_decimal_place (4): a mean recomputed from the
# per-user values must be within half a unit of it
TOLERANCE = 0.5e-4 + 1e-9


def _per_user_metrics(config, struct) -> dict[str, list[float]]:
    """``{"recall@10": [value per user], ...}`` from a collected ``rec.topk`` data struct, with
    RecBole's own metric classes (the value each user adds to the mean RecBole reports)."""
    from recbole.evaluator import metrics as recbole_metrics
    from recbole.evaluator.base_metric import TopkMetric

    out = {}
    classes = {name.lower(): cls for name, cls in inspect.getmembers(recbole_metrics, inspect.isclass)}
    for name in config["metrics"]:
        cls = classes.get(name.lower())
        if cls is None or not issubclass(cls, TopkMetric):
            continue
        metric = cls(config)
        pos_index, pos_len = metric.used_info(struct)
        takes_len = len(inspect.signature(metric.metric_info).parameters) == 2
        info = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
        for k in metric.topk:
            out[f"{name.lower()}@{k}"] = [float(v) for v in info[:, k - 1]]
    return out


def user_outcomes(model_file: str, recorded: dict | None = None) -> dict:
    """Re-evaluate ``model_file`` (a best checkpoint written by a run) on its test split; return
    ``{"format", "model", "seed", "model_file", "users": [user token per test user], "metrics":
    {metric@k: [value per user]}, "test_result", "history_masked"}``. With ``recorded`` (the run's
    recorded result, ``records.read_record``), a ValueError unless the recomputed means equal its test
    result. ``history_masked`` (``{"metrics", "test_result"}``, for a run that did not mask history):
    the same checkpoint evaluated again with every user's earlier items scored ``-inf``
    (``eval_mask_history``, :mod:`recbole_genrec.evaluation.history_mask`)."""
    import torch

    from recbole_genrec.evaluation.history_mask import install_history_mask
    from recbole_genrec.evaluation.runs import unscored_items_are_misses
    from recbole_genrec.quick_start import load_data_and_model
    from recbole_genrec.trainer.staged import resumable
    from recbole_genrec.utils import get_trainer

    config, model, data, train_data, valid_data, test_data = load_data_and_model(model_file)
    mode = config["eval_args"]["mode"]
    if (mode.get("test") if isinstance(mode, dict) else mode) != "full":
        raise ValueError(f"{model_file}: per-user outcomes need full ranking (eval_args mode 'full'), got {mode!r}")
    for key, off in (("resume", False), ("resume_checkpoint", None)):  # evaluation only: no run lock, no resume
        if key in config:
            config[key] = off
    trainer = resumable(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model)
    masked_as_run = bool(config["eval_mask_history"])
    if masked_as_run:
        install_history_mask(trainer, train_data, valid_data, test_data)
    collector, uid_field, users, items, kept = trainer.eval_collector, config["USER_ID_FIELD"], [], [], []
    collect, get_struct = collector.eval_batch_collect, collector.get_data_struct

    def capture(scores_tensor, interaction, positive_u, positive_i):  # the rows, in RecBole's order
        users.append(interaction[uid_field].cpu())
        rows = len(users[-1])
        one_target = len(positive_u) == rows and torch.equal(positive_u.cpu().sort().values, torch.arange(rows))
        items.append(positive_i.cpu()[positive_u.cpu().argsort()] if one_target else None)
        return collect(scores_tensor, interaction, positive_u, positive_i)

    def keep_struct():
        struct = get_struct()
        kept.append(struct)
        return struct

    collector.eval_batch_collect, collector.get_data_struct = capture, keep_struct
    unscored_items_are_misses(collector)  # outermost, as in every run (runs.prepare)

    def evaluate(loader=test_data, per_interaction=False):
        users.clear(), items.clear()
        with torch.no_grad():
            result = trainer.evaluate(loader, load_best_model=False, show_progress=False)
        metrics, ids = _per_user_metrics(config, kept[-1]), torch.cat(users).tolist()
        if per_interaction and any(batch is None for batch in items):
            raise ValueError(f"{model_file}: {config['model']} ranks some test users once with all their targets; "
                             "per-interaction outcomes need one target per ranked row (a sequential model)")
        if not per_interaction and len(set(ids)) != len(ids):
            raise ValueError(f"{model_file}: several test rows per user; per-user outcomes need one (leave-one-out)")
        for name, values in metrics.items():
            if len(values) != len(ids):
                raise ValueError(f"{model_file}: {name} has {len(values)} values for {len(ids)} test rows")
        means = {name: sum(values) / len(values) for name, values in metrics.items()}
        for name, mean in means.items():
            if abs(mean - result[name]) > TOLERANCE:
                raise ValueError(f"{model_file}: per-user {name} averages {mean:.6f}, RecBole reports {result[name]}")
        targets = torch.cat(items).tolist() if per_interaction else None
        return ids, metrics, means, {k: float(v) for k, v in result.items()}, targets

    tokens = data.field2id_token[uid_field]
    outcome = {"format": FORMAT, "model": config["model"], "seed": config["seed"],
               "model_file": os.path.basename(model_file)}
    if recorded is not None and "groups" in recorded:  # warm/cold: every test interaction, per group
        outcome["groups"] = _warm_cold_outcomes(trainer, train_data, test_data, evaluate, tokens,
                                                data.field2id_token[config["ITEM_ID_FIELD"]])
        for group, part in recorded["groups"].items():
            _check_reproduced(model_file, outcome["groups"].get(group, {}).get("test_result", {}), part["metrics"],
                              f"{group} targets")
        return outcome
    ids, metrics, means, result, _ = evaluate()
    outcome.update({"users": [str(tokens[i]) for i in ids], "metrics": metrics, "test_result": result})
    if recorded is not None:
        _check_reproduced(model_file, means, recorded["test_result"], "test")
    if not masked_as_run:
        install_history_mask(trainer, train_data, valid_data, test_data)
        masked_ids, masked, _, masked_result, _ = evaluate()
        if masked_ids != ids:
            raise ValueError(f"{model_file}: the masked evaluation ranked other test rows")
        outcome["history_masked"] = {"metrics": masked, "test_result": masked_result}
    return outcome


def _check_reproduced(model_file, means: dict, recorded: dict, what: str) -> None:
    for name, value in recorded.items():
        if name in means and abs(means[name] - value) > TOLERANCE:
            raise ValueError(f"{model_file} does not reproduce its record: {what} {name} "
                             f"{means[name]:.4f} here, {value} in the record")


def _warm_cold_outcomes(trainer, train_data, test_data, evaluate, user_tokens, item_tokens) -> dict:
    """``{group: {"users", "items", "metrics", "test_result"}}`` for all, warm and cold targets, each
    evaluated as :func:`recbole_genrec.evaluation.runs.warm_cold_metrics` does (a group's targets
    ranked among that group's items only)."""
    from recbole_genrec.evaluation.runs import restricted_catalogue, subset_loader, warm_items

    warm = warm_items(train_data._dataset)
    cold = ~warm
    cold[0] = False
    targets = test_data._dataset.inter_feat[test_data._dataset.iid_field]
    groups = {}
    for group, allowed in (("all", None), ("warm", warm), ("cold", cold)):
        if allowed is None:
            ids, metrics, _, result, target_ids = evaluate(test_data, per_interaction=True)
        elif not allowed[targets].any():
            continue
        else:
            with restricted_catalogue(trainer.model, allowed):
                ids, metrics, _, result, target_ids = evaluate(subset_loader(test_data, allowed[targets]),
                                                               per_interaction=True)
        groups[group] = {"users": [str(user_tokens[i]) for i in ids], "items": [str(item_tokens[i]) for i in target_ids],
                         "metrics": metrics, "test_result": result}
    return groups


def warm_cold_checkpoint(record_file: str) -> str | None:
    """The best checkpoint of a warm/cold run: the one its record names (records from before
    2026-12-08 name none), else the name a run with ``resume`` gives it,
    ``<model>-<dataset>-<run fingerprint>.pth`` in the checkpoint folder above ``runs/``, the
    fingerprint its record's name ends with (not the checkpoint's when a data transform, BERT4Rec's
    masking, added keys to the run's config). None when the record is unreadable."""
    try:
        with open(record_file, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    named = (record.get("result") or {}).get("model_file")
    if named:
        return named
    fingerprint = os.path.splitext(os.path.basename(record_file))[0].rsplit("-", 1)[-1]
    folder = os.path.dirname(os.path.dirname(os.path.abspath(record_file)))
    return os.path.join(folder, f"{record.get('model')}-{record.get('dataset')}-{fingerprint}.pth")


def outcome_path(out_dir: str, model_file: str) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(model_file))[0] + ".json")


def write_outcomes(runs_dir: str, out_dir: str, log=print, protocol: str = "leave_one_out") -> list[str]:
    """:func:`user_outcomes` for every ``protocol`` record (``leave_one_out`` or ``warm_cold``) in
    ``runs_dir`` whose checkpoint exists and has no file in ``out_dir`` yet; each written to a
    temporary file and renamed. Returns the paths written. A checkpoint that does not reproduce its
    record (or cannot give these outcomes) is reported and skipped."""
    from recbole_genrec.atomic import atomic_write_text
    from recbole_genrec.evaluation.records import read_record, record_protocol

    written = []
    os.makedirs(out_dir, exist_ok=True)

    def write(target, outcome):
        atomic_write_text(target, json.dumps(outcome))

    if protocol not in ("leave_one_out", "warm_cold"):
        raise ValueError(f"protocol: leave_one_out or warm_cold, got {protocol!r}")
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        if record_protocol(path) != protocol or "-last_epoch-" in os.path.basename(path):
            continue
        recorded = read_record(path)
        if recorded is None:
            continue
        if protocol == "warm_cold":
            model_file, target = warm_cold_checkpoint(path), os.path.join(out_dir, os.path.basename(path))
        else:
            model_file = recorded.get("model_file")
            target = outcome_path(out_dir, model_file) if model_file else None
        if not model_file or not os.path.isfile(model_file):
            if protocol == "warm_cold":  # (a leave-one-out record names its checkpoint; this one is derived)
                log(f"skipped {os.path.basename(path)}: no checkpoint {model_file} (a run without --resume=True, "
                    "on another machine, or whose data transform changes its config names it otherwise)")
            continue
        done = _read(target)
        if done is not None and _same_result(_result_of(done), _result_of(recorded)):
            continue  # this record's outcomes (or its refusal) are there
        try:
            outcome = user_outcomes(model_file, recorded)
        except ValueError as error:  # not reproduced, or not one row per user: refused, not tried again
            log(f"skipped {os.path.basename(path)}: {error}")
            write(target, {"format": FORMAT, "refused": str(error), "record": os.path.basename(path),
                           "test_result": dict(_result_of(recorded))})
            continue
        except Exception as error:  # noqa: BLE001 - one record's failure (device, lock, old code) must not stop the rest
            log(f"skipped {os.path.basename(path)}: {type(error).__name__}: {error}")
            continue
        outcome["record"] = os.path.basename(path)
        write(target, outcome)
        written.append(target)
        log(f"wrote {target}")
    return written


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            outcome = json.load(f)
    except (OSError, ValueError):
        return None
    return outcome if outcome.get("format") == FORMAT else None


def _result_of(result: dict) -> dict:
    """The test metrics that identify a run's result: its test result, or (warm/cold) those on all
    targets, whether ``result`` is a run record's result or an outcome file's."""
    if "groups" in result:
        part = result["groups"].get("all", {})
        return part.get("test_result", part.get("metrics", {}))
    return result.get("test_result") or {}


def _same_result(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and all(name in a and abs(a[name] - value) <= TOLERANCE for name, value in b.items())


def read_outcomes(out_dir: str, run: dict) -> dict | None:
    """The outcomes :func:`write_outcomes` wrote for ``run`` (a run's result: ``model_file``,
    ``test_result``), or None: none there, refused, or of another run with the same checkpoint name
    (their test results differ)."""
    if "groups" in run:  # warm/cold: named after the run's record
        path = (run.get("record") or {}).get("path")
        outcome = _read(os.path.join(out_dir, os.path.basename(path))) if path else None
    else:
        outcome = _read(outcome_path(out_dir, run["model_file"])) if run.get("model_file") else None
    if outcome is None or "refused" in outcome or not _same_result(_result_of(outcome), _result_of(run)):
        return None
    return outcome


def row_keys(outcome: dict) -> list:
    """Each ranked row's key: the user (leave-one-out), or where the outcome keeps the items
    (warm/cold: several targets per user) (user, target item, how many earlier rows had that pair:
    a user may rate an item again; every model's test rows come in the split's order)."""
    if "items" not in outcome:
        return list(outcome["users"])
    seen: dict = {}
    keys = []
    for pair in zip(outcome["users"], outcome["items"]):
        keys.append((*pair, seen.get(pair, 0)))
        seen[pair] = keys[-1][2] + 1
    return keys


def paired_difference(a: dict, b: dict, metric: str) -> tuple[float, float] | None:
    """Mean and standard error of ``a``'s minus ``b``'s ``metric`` over the rows both ranked (matched
    by :func:`row_keys`), or None unless both ranked the same rows (each once) and have the metric,
    or when the differences have no spread. The standard error is clustered by user: with ``G``
    users, ``N`` rows and ``S_g`` the sum of user ``g``'s deviations ``d - mean``,
    ``sqrt(G / (G - 1) * sum_g S_g^2) / N``; with one row per user (leave-one-out) that is the
    plain paired ``sd(d) / sqrt(N)``."""
    if metric not in a.get("metrics", {}) or metric not in b.get("metrics", {}):
        return None
    keys, other_keys = row_keys(a), row_keys(b)
    other = dict(zip(other_keys, b["metrics"][metric]))
    if len(other) != len(other_keys) or set(keys) != set(other) or len(keys) != len(other):
        return None
    diffs = [value - other[key] for key, value in zip(keys, a["metrics"][metric])]
    n = len(diffs)
    mean = sum(diffs) / max(n, 1)
    sums: dict = {}
    for user, d in zip(a["users"], diffs):
        sums[user] = sums.get(user, 0.0) + d - mean
    g = len(sums)
    if g < 2:
        return None
    se = math.sqrt(g / (g - 1) * sum(v * v for v in sums.values())) / n
    return (mean, se) if se > 1e-15 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a folder of run records (<checkpoint_dir>/runs)")
    parser.add_argument("out_dir", help="where the per-user files go (e.g. results/ml-100k/per_user)")
    parser.add_argument("--protocol", default="leave_one_out", choices=("leave_one_out", "warm_cold"),
                        help="which records (warm_cold: per test interaction, see above)")
    args = parser.parse_args(argv)
    write_outcomes(args.runs_dir, args.out_dir, protocol=args.protocol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
