"""The held-back check's setting on public data: a ~1k-item film catalogue with 201 users.

    python benchmarks/small_catalogue.py [--models SASRec,TIGER] [--out DIR] [--checkpoint_dir DIR]
    python benchmarks/small_catalogue.py --models TIGER,TIGER[train_batch_size=64] --user_seed 0,1,2

Issue 12's held-back catalogue (not in the repo) has about 1k films and 201 test users; there TIGER
with 3 x 256 codes was at chance. This script builds the closest public stand-in, ``ml-100k-201u``:
201 users drawn at random (``--user_seed``, default 0) from ml-100k with all their ratings, and the
films at least ``--min_item_count`` (3) of them rated (1,063 films, 20,676 ratings, every user keeps
18 or more); the ``.item`` rows (title, year, genres) of those films. It then compares ``--models``
on it as the held-back check does: leave-one-out in time order, full ranking, seed 2020, early
stopping on validation NDCG@10 with patience 5, and prints test recall@10 beside chance (10 / the
number of films). Runs are resumable and recorded (``--checkpoint_dir``, default
``saved/small-catalogue``; the data under ``--out``, default ``saved/small-catalogue/data``): run
the same command again to continue or to print the table again.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recbole_genrec  # noqa: E402,F401
from recbole_genrec.atomic import atomic_write_text  # noqa: E402

def dataset_name(n_users: int = 201, min_item_count: int = 3, user_seed: int = 0) -> str:
    """``ml-100k-201u`` for the defaults; other settings are named in full (their own folder)."""
    options = "" if (min_item_count, user_seed) == (3, 0) else f"-min{min_item_count}-s{user_seed}"
    return f"ml-100k-{n_users}u{options}"


def build(out: str, n_users: int = 201, min_item_count: int = 3, user_seed: int = 0) -> dict:
    """Write ``out/<name>/<name>.{inter,item}`` (atomically; :func:`dataset_name`); return their sizes."""
    import numpy as np
    import pandas as pd
    import recbole

    source = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    inter = pd.read_csv(os.path.join(source, "ml-100k.inter"), sep="\t", dtype=str)
    users = np.random.default_rng(user_seed).choice(inter["user_id:token"].unique(), n_users, replace=False)
    inter = inter[inter["user_id:token"].isin(users)]
    counts = inter["item_id:token"].value_counts()
    inter = inter[inter["item_id:token"].isin(counts[counts >= min_item_count].index)]
    items = pd.read_csv(os.path.join(source, "ml-100k.item"), sep="\t", dtype=str, keep_default_na=False)
    items = items[items["item_id:token"].isin(set(inter["item_id:token"]))]
    name = dataset_name(n_users, min_item_count, user_seed)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    for kind, table in (("inter", inter), ("item", items)):
        path, text = os.path.join(out, name, f"{name}.{kind}"), table.to_csv(sep="\t", index=False)
        if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:
            atomic_write_text(path, text)
    return {"users": inter["user_id:token"].nunique(), "items": len(items), "ratings": len(inter),
            "fewest ratings of a user": int(inter.groupby("user_id:token").size().min())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="SASRec,TIGER")
    parser.add_argument("--out", default=os.path.join(ROOT, "saved", "small-catalogue", "data"))
    parser.add_argument("--checkpoint_dir", default=os.path.join(ROOT, "saved", "small-catalogue"))
    parser.add_argument("--n_users", type=int, default=201)
    parser.add_argument("--min_item_count", type=int, default=3)
    parser.add_argument("--user_seed", default="0", help="one draw of users (0) or several (0,1,2)")
    parser.add_argument("--records_only", action="store_true", help="print the recorded runs, train nothing")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config would read our --key=value options as config keys

    from recbole_genrec.evaluation.protocols import parse_seeds

    by_draw = {}
    for user_seed in parse_seeds(args.user_seed):
        try:
            by_draw[user_seed] = run_draw(args, user_seed)
        except ValueError as err:  # records_only and no record on this draw: say so, show the others
            if not args.records_only:
                raise
            print(f"draw {user_seed}: {err}")
    if len(by_draw) > 1:
        print(draws_table(by_draw))


def run_draw(args, user_seed: int) -> tuple:
    """Build one draw's data, compare ``--models`` on it, print its table; ``(n_items, results)``."""
    from recbole_genrec.evaluation.records import best_epoch
    from recbole_genrec.quick_start import compare

    name = dataset_name(args.n_users, args.min_item_count, user_seed)
    sizes = build(args.out, args.n_users, args.min_item_count, user_seed)
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    results = compare(args.models, name, [os.path.join(ROOT, "properties", "ml-100k.yaml")],
                      {"data_path": os.path.abspath(args.out), "checkpoint_dir": args.checkpoint_dir,
                       "stopping_step": 5, "epochs": 300, "resume": True, "show_progress": False},
                      output_dir=os.path.join(args.checkpoint_dir, "compare"), reuse_runs=True,
                      records_only=args.records_only)
    # the sequential models rank every item, past ones included: a random ranking hits 10 / n_items
    chance = 10 / sizes["items"]
    print(f"\n{name}, leave-one-out, seed 2020, patience 5; chance recall@10 = 10/{sizes['items']} = {chance:.4f}")
    print("| model | test recall@10 | x chance | best epoch | epochs |\n|---|---|---|---|---|")
    for model, result in results.items():
        curve, recall = result["valid_curve"], result["test_result"]["recall@10"]
        print(f"| {model} | {recall:.4f} | {recall / chance:.1f} | {best_epoch(curve, result['best_valid_score'])} "
              f"| {len(curve)} |")
    return sizes["items"], results


def draws_table(by_draw: dict) -> str:
    """Markdown: each model's test recall@10 on every draw (``{user_seed: (n_items, results)}``),
    mean and sample std over the draws it has, and its paired comparison with the first model (a
    recipe against the default): the mean difference over the draws both have, and on how many of
    them it is ahead. Chance is 10 / the draw's films."""
    import statistics

    seeds = list(by_draw)
    models = list(dict.fromkeys(m for _, results in by_draw.values() for m in results))
    recall = {m: [by_draw[s][1][m]["test_result"]["recall@10"] if m in by_draw[s][1] else None for s in seeds]
              for m in models}
    head = " | ".join(f"draw {s}" for s in seeds)
    lines = [f"| model | {head} | mean | std | vs {models[0]}: mean difference (ahead on) |",
             "|---" * (len(seeds) + 4) + "|"]
    for model in models:
        values = recall[model]
        got = [v for v in values if v is not None]
        std = f"{statistics.stdev(got):.4f}" if len(got) > 1 else "-"
        cells = " | ".join("-" if v is None else f"{v:.4f}" for v in values)
        pairs = [(v, r) for v, r in zip(values, recall[models[0]]) if v is not None and r is not None]
        paired = "-" if model == models[0] or not pairs else (
            f"{statistics.mean(v - r for v, r in pairs):+.4f} ({sum(v > r for v, r in pairs)} of {len(pairs)} draws)")
        lines.append(f"| {model} | {cells} | {statistics.mean(got):.4f} | {std} | {paired} |")
    chance = " | ".join(f"{10 / by_draw[s][0]:.4f}" for s in seeds)
    lines.append(f"| chance (10 / films) | {chance} | | | |")
    return "\ntest recall@10 over draws of users (--user_seed):\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
