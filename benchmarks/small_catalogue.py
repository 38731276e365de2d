"""The held-back check's setting on public data: a ~1k-item film catalogue with 201 users.

    python benchmarks/small_catalogue.py [--models SASRec,TIGER] [--out DIR] [--checkpoint_dir DIR]

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
    parser.add_argument("--user_seed", type=int, default=0)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config would read our --key=value options as config keys

    name = dataset_name(args.n_users, args.min_item_count, args.user_seed)
    sizes = build(args.out, args.n_users, args.min_item_count, args.user_seed)
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    from recbole_genrec.evaluation.records import best_epoch
    from recbole_genrec.quick_start import compare

    results = compare(args.models, name, [os.path.join(ROOT, "properties", "ml-100k.yaml")],
                      {"data_path": os.path.abspath(args.out), "checkpoint_dir": args.checkpoint_dir,
                       "stopping_step": 5, "epochs": 300, "resume": True, "show_progress": False},
                      output_dir=os.path.join(args.checkpoint_dir, "compare"), reuse_runs=True)
    # the sequential models rank every item, past ones included: a random ranking hits 10 / n_items
    chance = 10 / sizes["items"]
    print(f"\n{name}, leave-one-out, seed 2020, patience 5; chance recall@10 = 10/{sizes['items']} = {chance:.4f}")
    print("| model | test recall@10 | x chance | best epoch | epochs |\n|---|---|---|---|---|")
    for model, result in results.items():
        curve, recall = result["valid_curve"], result["test_result"]["recall@10"]
        print(f"| {model} | {recall:.4f} | {recall / chance:.1f} | {best_epoch(curve, result['best_valid_score'])} "
              f"| {len(curve)} |")


if __name__ == "__main__":
    main()
