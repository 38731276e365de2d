"""Peak memory and time of the Amazon converter on a synthetic 2018-format dump.

    python benchmarks/convert_memory.py [--mb 1024] [--dir DIR] [--keep] [--kcore 5]

Writes a gzip'd (level 6, as the released dumps) JSON-lines reviews file of about ``--mb`` MB in
the 2018 format (``reviewerID asin reviewerName verified reviewText summary overall
unixReviewTime reviewTime vote style``; skewed user and item popularity, so the k-core keeps a
realistic share) plus a meta file for the items, then runs ``python -m
recbole_genrec.data.convert amazon`` on them in a child process and prints the child's peak RSS
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``) next to the RSS of the import alone (torch
and RecBole come with the package), its wall time and the converter's summary.
The files go to a temporary folder (removed afterwards unless ``--keep``) or to ``--dir``.
"""

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("good great product quality price works fine love it would recommend again bought this for my "
         "daughter son wife husband and the size fits well color was not as expected but overall happy with "
         "purchase shipping fast item arrived broken returned easy to use battery life excellent poor value "
         "money cheap sturdy durable comfortable small large perfect gift disappointed five stars").split()


def review_texts(rng, n=4096):
    texts = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(8, 160)))
        texts.append(json.dumps(" ".join(words).capitalize() + "."))
    return texts


def write_reviews(path, target_bytes, rng, chunk=50_000):
    """Append chunks of reviews until the compressed file reaches ``target_bytes``; returns
    (lines, users, items)."""
    texts = review_texts(rng)
    summaries = [json.dumps(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7))))) for _ in range(512)]
    # a first guess of the scale, grown as we go: ~180 compressed bytes per review
    expected = max(chunk, target_bytes // 180)
    n_users, n_items = max(100, expected // 7), max(50, expected // 25)
    lines = 0
    raw = open(path, "wb")
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as f:
        while raw.tell() < target_bytes:
            users = (n_users * rng.random(chunk) ** 1.6).astype(np.int64)
            items = (n_items * rng.random(chunk) ** 2.2).astype(np.int64)
            stamps = rng.integers(1_000_000_000, 1_540_000_000, size=chunk)
            ratings = rng.integers(1, 6, size=chunk)
            text_ids = rng.integers(0, len(texts), size=chunk)
            summary_ids = rng.integers(0, len(summaries), size=chunk)
            out = []
            for u, i, t, r, x, s in zip(users.tolist(), items.tolist(), stamps.tolist(), ratings.tolist(),
                                        text_ids.tolist(), summary_ids.tolist()):
                out.append(
                    f'{{"overall": {r}.0, "vote": "2", "verified": true, "reviewTime": "01 1, 2015", '
                    f'"reviewerID": "A{u:013d}", "asin": "B{i:09d}", "style": {{"Size:": " Large"}}, '
                    f'"reviewerName": "Reviewer {u}", "reviewText": {texts[x]}, "summary": {summaries[s]}, '
                    f'"unixReviewTime": {t}}}\n')
            f.write("".join(out).encode())
            lines += chunk
    raw.close()
    return lines, n_users, n_items


def write_meta(path, n_items, rng):
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as f:
        for i in range(n_items):
            if i % 50 == 7:
                continue  # some items have no metadata
            desc = [" ".join(rng.choice(WORDS, size=40)) + " <br/>", "Second &amp; last paragraph"]
            record = {"category": ["Clothing, Shoes & Jewelry", "Women", "Shoes"], "description": desc,
                      "title": f"Item {i} &amp; <b>friends</b>", "brand": f"Brand{i % 300}",
                      "also_buy": [f"B{(i + 1) % n_items:09d}"], "price": f"${(i % 9000) / 100 + 1:.2f}",
                      "asin": f"B{i:09d}"}
            f.write(json.dumps(record) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1024, help="size of the gzip'd reviews dump, MB")
    parser.add_argument("--dir", default=None, help="folder for the dumps and the output (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--kcore", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = args.dir or tempfile.mkdtemp(prefix="convert_memory_")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    reviews, meta = os.path.join(folder, "reviews_Synthetic.json.gz"), os.path.join(folder, "meta_Synthetic.json.gz")
    try:
        start = time.perf_counter()
        lines, n_users, n_items = write_reviews(reviews, int(args.mb * 2**20), rng)
        write_meta(meta, n_items, rng)
        gen = time.perf_counter() - start
        print(f"generated {os.path.getsize(reviews) / 2**20:.1f} MB reviews ({lines:,} lines, <= {n_users:,} users, "
              f"<= {n_items:,} items) + {os.path.getsize(meta) / 2**20:.1f} MB meta in {gen:.1f}s")

        out = os.path.join(folder, "synthetic")
        cmd = [sys.executable, "-m", "recbole_genrec.data.convert", "amazon", "--reviews", reviews, "--meta", meta,
               "--out", out, "--kcore", str(args.kcore), "--no-progress"]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # the package imports torch and RecBole (compat shims): measure that floor on its own
        probe = ("import resource, recbole_genrec.data.convert; "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        base_mb = float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                       check=True).stdout.split()[-1])
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KB on Linux
        print(proc.stdout.rstrip())
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            sys.exit(proc.returncode)
        sizes = {name: os.path.getsize(os.path.join(out, name)) / 2**20 for name in sorted(os.listdir(out))}
        print("output: " + ", ".join(f"{name} {mb:.1f} MB" for name, mb in sizes.items()))
        print(f"convert: peak RSS {peak_mb:.0f} MB (import alone {base_mb:.0f} MB: +{peak_mb - base_mb:.0f} MB for "
              f"the data), wall {wall:.1f}s "
              f"({lines / wall:,.0f} lines/s, {os.path.getsize(reviews) / 2**20 / wall:.1f} MB gz/s)")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif args.keep:
            print(f"files kept in {folder}")


if __name__ == "__main__":
    main()
