"""Single-step decoders of TwoLevelLLMRec on synthetic catalogues of growing size (issue 14: million-item
catalogues).

    python benchmarks/two_level_scale.py --sizes 10000,100000,1000000 [--batch 128] [--candidates 100]
        [--ann-index hnsw_sq] [--hnsw-m 64] [--ef-construction 80] [--ef-search 200,300] [--tokenrec flat,hnsw]
        [--plot /tmp/two_level_scale.png]

For each size the model's own item side (``TwoLevelLLMRec.output_layer`` on the synthetic catalogue of
``benchmarks/two_level_softmax.py``: ``sqrt(N)`` clusters, d = 64; the LLM is left out, its cost is the
same for every method) decodes one batch of user states with

- exact: ``log P(item | h)`` of every item (Eq. 4), then its top-k;
- structure: exact top-k by hierarchical pruning (Eq. 6);
- ann: faiss HNSW MIPS over ``e + centroid`` (Sec. 4.3.2, the per-cluster log Z dropped), the model's
  ``ann_index()`` (``--ann-index``: hnsw, or hnsw_sq over 8-bit quantised keys);
- ann_rerank: the top ``--candidates`` of that search re-ranked by their exact Eq. 4 log-probability
  (log Z of the candidates' clusters only);
both at each HNSW search breadth of ``--ef-search``.

The defaults (hnsw_sq, M 64, efConstruction 80, efSearch 200 and 300, m 100) are tuned on this catalogue
for 10^6 items (top-10 overlap >= 0.95 at >= 20x the speed of exact scoring): the keys here are nearly
isotropic in 64 dimensions, hard for HNSW, and the search's memory traffic dominates (the 8-bit keys
search about 1.6x faster at the same recall; ann_rerank does not use the search's scores). The model's own
defaults (hnsw, M 32, faiss' 40 and 16, m 200) build faster but find fewer of the true top items there.

Reported per method: best-of ``--repeats`` time per batch, speed ratio to exact, top-10 overlap with the
exact top-10, and the peak resident set size (VmHWM of /proc/self/status, reset before each method through
/proc/self/clear_refs; it includes everything resident: catalogue, cached item vectors, faiss indexes) with
its rise over the resident size just before the method. HNSW build time (one thread) is in the ``build s``
column. ``--tokenrec`` adds TokenRec's cosine retrieval (``recbole_genrec/model/tokenrec.py``) over the same
item vectors, normalised: its dense ``full_sort_predict`` (every cosine, then top-k), its ``retrieve`` with a
flat index (which builds the index on every call, as the code does), and the HNSW index ``retrieve`` would
build (faiss defaults M 32, efConstruction 40, efSearch 16), prebuilt: search only, build time reported;
their ratio and overlap are against TokenRec's dense cosine. ``--plot PATH`` writes a
log-log PNG of time per batch against catalogue size (matplotlib is imported only then).
"""

import argparse
import os
import resource
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from two_level_softmax import synthetic_catalogue  # noqa: E402

from recbole_genrec.decoding.two_level_softmax import faiss_mips_index, faiss_search  # noqa: E402
from recbole_genrec.model.tokenrec import TokenRec  # noqa: E402


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak():
    """Reset the peak RSS (VmHWM); returns whether that worked (else ru_maxrss, a process-wide peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measured(fn):
    """Run ``fn`` with the resident-set peak reset first: ``(result, peak MiB, rise MiB)``."""
    before = _status_kib("VmRSS")
    per_method = reset_peak()
    result = fn()
    peak = _status_kib("VmHWM") if per_method else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, peak / 1024, (peak - before) / 1024 if before is not None else float("nan")


def overlap(found, reference):
    return sum(len(set(a.tolist()) & set(b.tolist()) - {0}) for a, b in zip(found, reference)) / reference.numel()


def run_size(n, args):
    torch.manual_seed(args.seed)
    K = round(n ** 0.5)
    models, users = synthetic_catalogue(n, K, args.dim, args.dim, 2 * args.dim, args.batch, softmaxes=("two_level",))
    two, k, rows = models["two_level"], args.k, []
    two.eval()
    two.ann_index_type, two.hnsw_m = args.ann_index, args.hnsw_m
    two.hnsw_ef_construction = args.ef_construction
    two.ann_candidates = args.candidates
    with torch.no_grad():
        vectors = two.item_vectors()  # cached in eval mode, as the model's inference uses them

        def timed(name, fn, reference, build=None):
            result, peak, rise = measured(fn)  # also the warm-up
            seconds = float("inf")
            for _ in range(args.repeats):  # best of
                start = time.perf_counter()
                fn()
                seconds = min(seconds, time.perf_counter() - start)
            rows.append({"items": n, "method": name, "seconds": seconds, "overlap": overlap(result, reference),
                         "peak": peak, "rise": rise, "build": build})
            return seconds

        exact_top = two.log_probs(users)[:, 1:].topk(k, dim=1).indices + 1
        timed("exact (Eq. 4, all items)", lambda: two.log_probs(users).topk(k, dim=1).indices, exact_top)
        visited = []

        def structure():
            items, _, seen = two.output.structure_topk(users, vectors, k)
            visited.append(seen.float().mean().item())
            return items
        timed("structure (Eq. 6 pruning)", structure, exact_top)
        start = time.perf_counter()
        two.ann_index()  # the model's HNSW index over e + centroid, built once
        build = time.perf_counter() - start
        for ef in args.ef_search:
            two.hnsw_ef_search = ef
            timed(f"ann {args.ann_index} ef {ef}", lambda: two.ann_topk(users, k)[0], exact_top, build)
            timed(f"ann_rerank {args.ann_index} m {args.candidates} ef {ef}", lambda: two.ann_rerank_topk(users, k)[0],
                  exact_top, build)

        if args.tokenrec:  # TokenRec's own code on a stub holding the (normalised) item table and the users
            stub = SimpleNamespace(item_emb=vectors, user_representation=lambda interaction: users)
            def dense():
                return TokenRec.full_sort_predict(stub, None)[:, 1:].topk(k, dim=1).indices + 1
            dense_top = dense()
            timed("tokenrec: dense cosine", dense, dense_top)
            if "flat" in args.tokenrec:
                timed("tokenrec: retrieve() faiss flat", lambda: TokenRec.retrieve(stub, None, k, "flat")[0], dense_top)
            if "hnsw" in args.tokenrec:
                start = time.perf_counter()
                index = faiss_mips_index(F.normalize(vectors[1:], dim=-1), "hnsw")  # as TokenRec.retrieve
                tok_build = time.perf_counter() - start
                query = F.normalize(users, dim=-1)
                timed("tokenrec: faiss hnsw (prebuilt)", lambda: faiss_search(index, query, k, 1)[0], dense_top,
                      tok_build)
                del index
    structure_visits = sum(visited) / len(visited)
    return rows, f"{n} items: {K} clusters (sizes {two.output.stats()['min_size']}-{two.output.stats()['max_size']}), " \
                 f"structure visited {structure_visits:.1f} clusters per user"


def plot(rows, path, batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = [(r["items"], r["seconds"] * 1e3) for r in rows if r["method"] == method]
        ax.plot(*zip(*points), marker="o", linestyle="--" if method.startswith("tokenrec") else "-", label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue size (items)")
    ax.set_ylabel(f"ms per batch of {batch} users (1 thread)")
    ax.set_title("TwoLevelLLMRec single-step decoding vs catalogue size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated catalogue sizes")
    parser.add_argument("--dim", type=int, default=64, help="LLM width d = item embedding width")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100, help="ann_candidates m of ann_rerank")
    parser.add_argument("--ann-index", default="hnsw_sq", choices=("hnsw", "hnsw_sq"), help="ann_index")
    parser.add_argument("--hnsw-m", type=int, default=64, help="hnsw_m: HNSW graph degree")
    parser.add_argument("--ef-construction", type=int, default=80, help="hnsw_ef_construction")
    parser.add_argument("--ef-search", default="200,300",
                        help="hnsw_ef_search values (comma-separated), ann and ann_rerank (at least m wide)")
    parser.add_argument("--tokenrec", default="flat,hnsw", help="TokenRec rows: '' (none), flat, hnsw or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="write a log-log PNG of time vs catalogue size here")
    args = parser.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    args.ef_search = [int(e) for e in args.ef_search.split(",")]

    rows, notes = [], []
    for n in sizes:
        size_rows, note = run_size(n, args)
        rows += size_rows
        notes.append(note)
    print(f"d {args.dim}, batch {args.batch}, top-{args.k}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS')}, ann_index {args.ann_index}, HNSW M {args.hnsw_m}, "
          f"efConstruction {args.ef_construction}, m {args.candidates}")
    for note in notes:
        print(note)
    print(f"| {'items':>8} | {'method':36} | {'ms/batch':>9} | {'x exact':>8} | {'top-10 overlap':>14} | "
          f"{'peak RSS MiB':>12} | {'rise MiB':>8} | {'build s':>7} |")
    print("|" + "|".join("-" * w for w in (10, 38, 11, 10, 16, 14, 10, 9)) + "|")
    for r in rows:
        base = next(x for x in rows if x["items"] == r["items"] and
                    x["method"].startswith("tokenrec: dense" if r["method"].startswith("tokenrec") else "exact"))
        build = "" if r["build"] is None else f"{r['build']:.1f}"
        print(f"| {r['items']:>8} | {r['method']:36} | {r['seconds'] * 1e3:9.2f} | {base['seconds'] / r['seconds']:7.1f}x"
              f" | {r['overlap']:14.3f} | {r['peak']:12.0f} | {r['rise']:8.0f} | {build:>7} |")
    print("x exact: time of exact two-level scoring / time of the row (tokenrec rows: of TokenRec's dense cosine); "
          "overlap with the exact top-10 (tokenrec rows: with the dense cosine top-10); peak RSS: VmHWM reset "
          "before each method (includes the resident catalogue and indexes), rise: over VmRSS just before; "
          "build s: HNSW construction, one thread (ann and ann_rerank share one index); ann_rerank's first call "
          "also caches the item vectors reordered by cluster")
    if args.plot:
        plot(rows, args.plot, args.batch)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
