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
    collector, uid_field, users, kept = trainer.eval_collector, config["USER_ID_FIELD"], [], []
    collect, get_struct = collector.eval_batch_collect, collector.get_data_struct

    def capture(scores_tensor, interaction, positive_u, positive_i):  # the rows, in RecBole's order
        users.append(interaction[uid_field].cpu())
        return collect(scores_tensor, interaction, positive_u, positive_i)

    def keep_struct():
        struct = get_struct()
        kept.append(struct)
        return struct

    collector.eval_batch_collect, collector.get_data_struct = capture, keep_struct
    unscored_items_are_misses(collector)  # outermost, as in every run (runs.prepare)

    def evaluate():
        users.clear()
        with torch.no_grad():
            result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        metrics, ids = _per_user_metrics(config, kept[-1]), torch.cat(users).tolist()
        if len(set(ids)) != len(ids):
            raise ValueError(f"{model_file}: several test rows per user; per-user outcomes need one (leave-one-out)")
        for name, values in metrics.items():
            if len(values) != len(ids):
                raise ValueError(f"{model_file}: {name} has {len(values)} values for {len(ids)} test rows")
        means = {name: sum(values) / len(values) for name, values in metrics.items()}
        for name, mean in means.items():
            if abs(mean - result[name]) > TOLERANCE:
                raise ValueError(f"{model_file}: per-user {name} averages {mean:.6f}, RecBole reports {result[name]}")
        return ids, metrics, means, {k: float(v) for k, v in result.items()}

    ids, metrics, means, result = evaluate()
    tokens = data.field2id_token[uid_field]
    outcome = {"format": FORMAT, "model": config["model"], "seed": config["seed"],
               "model_file": os.path.basename(model_file), "users": [str(tokens[i]) for i in ids],
               "metrics": metrics, "test_result": result}
    if recorded is not None:
        for name, value in recorded["test_result"].items():
            if name in means and abs(means[name] - value) > TOLERANCE:
                raise ValueError(f"{model_file} does not reproduce its record: test {name} "
                                 f"{means[name]:.4f} here, {value} in the record")
    if not masked_as_run:
        install_history_mask(trainer, train_data, valid_data, test_data)
        masked_ids, masked, _, masked_result = evaluate()
        if masked_ids != ids:
            raise ValueError(f"{model_file}: the masked evaluation ranked other test rows")
        outcome["history_masked"] = {"metrics": masked, "test_result": masked_result}
    return outcome


def outcome_path(out_dir: str, model_file: str) -> str:
    return os.path.join(out_dir, os.path.splitext(os.path.basename(model_file))[0] + ".json")


def write_outcomes(runs_dir: str, out_dir: str, log=print) -> list[str]:
    """:func:`user_outcomes` for every leave-one-out record in ``runs_dir`` whose checkpoint exists
    and has no file in ``out_dir`` yet; each written to a temporary file and renamed. Returns the
    paths written. A checkpoint that does not reproduce its record is reported and skipped."""
    from recbole_genrec.atomic import atomic_write_text
    from recbole_genrec.evaluation.records import read_record, record_protocol

    written = []
    os.makedirs(out_dir, exist_ok=True)

    def write(target, outcome):
        atomic_write_text(target, json.dumps(outcome))

    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        if record_protocol(path) != "leave_one_out":
            continue  # their test users are split into groups: not covered
        recorded = read_record(path)
        model_file = (recorded or {}).get("model_file")
        if not model_file or not os.path.isfile(model_file):
            continue
        target = outcome_path(out_dir, model_file)
        done = _read(target)
        if done is not None and _same_result(done.get("test_result"), recorded["test_result"]):
            continue  # this record's outcomes (or its refusal) are there
        try:
            outcome = user_outcomes(model_file, recorded)
        except ValueError as error:  # not reproduced, or not one row per user: refused, not tried again
            log(f"skipped {os.path.basename(path)}: {error}")
            write(target, {"format": FORMAT, "refused": str(error), "record": os.path.basename(path),
                           "test_result": dict(recorded["test_result"])})
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


def _same_result(a: dict | None, b: dict | None) -> bool:
    return bool(a) and bool(b) and all(name in a and abs(a[name] - value) <= TOLERANCE for name, value in b.items())


def read_outcomes(out_dir: str, run: dict) -> dict | None:
    """The outcomes :func:`write_outcomes` wrote for ``run`` (a run's result: ``model_file``,
    ``test_result``), or None: none there, refused, or of another run with the same checkpoint name
    (their test results differ)."""
    if not run.get("model_file"):
        return None
    outcome = _read(outcome_path(out_dir, run["model_file"]))
    if outcome is None or "refused" in outcome or not _same_result(outcome.get("test_result"), run.get("test_result")):
        return None
    return outcome


def paired_difference(a: dict, b: dict, metric: str) -> tuple[float, float] | None:
    """Mean and standard error of ``a``'s minus ``b``'s per-user ``metric`` (the paired standard
    error ``sd(d) / sqrt(n)``), or None unless both ranked the same set of users (each once) and
    have the metric, or when the differences have no spread."""
    if metric not in a.get("metrics", {}) or metric not in b.get("metrics", {}):
        return None
    other = dict(zip(b["users"], b["metrics"][metric]))
    if len(other) != len(b["users"]) or set(a["users"]) != set(other) or len(a["users"]) != len(other):
        return None
    diffs = [value - other[user] for user, value in zip(a["users"], a["metrics"][metric])]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return (mean, sd / math.sqrt(n)) if sd > 0 else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", help="a folder of run records (<checkpoint_dir>/runs)")
    parser.add_argument("out_dir", help="where the per-user files go (e.g. results/ml-100k/per_user)")
    args = parser.parse_args(argv)
    write_outcomes(args.runs_dir, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
