"""Output-layer cost of TwoLevelLLMRec on a large synthetic catalogue: full vs two-level softmax.

    python benchmarks/two_level_softmax.py [--items 200000] [--dim 64] [--batch 256]

Training: one forward + backward of the output layer for a batch (full softmax over every item,
Eq. 1, vs the two-level loss over the clusters and the target's cluster, Eq. 2-4). Inference: the
top-k of the same two-level model by exact scoring of every item (Eq. 4), by hierarchical pruning
(Eq. 6, exact) and by faiss MIPS over ``e + centroid`` (flat and HNSW). The catalogue is synthetic:
items scattered around ``sqrt(N)`` true centres, users near one centre, centroids at the centres;
the LLM is left out (its cost is the same for every method). Prints times and ratios side by side,
and each method's top-k overlap with the exact top-k.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.decoding.two_level_softmax import TwoLevelSoftmax, faiss_mips_index, faiss_search  # noqa: E402


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=None, help="default round(sqrt(items))")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    N, d, B = args.items + 1, args.dim, args.batch  # row 0 is the padding item, as in RecBole
    K = args.clusters or round(args.items ** 0.5)

    centres = F.normalize(torch.randn(K, d), dim=-1) * 3
    true_cluster = torch.randint(0, K, (N,))
    items = torch.nn.Parameter(centres[true_cluster] + torch.randn(N, d))
    head = TwoLevelSoftmax(N, K, d)
    head.set_clusters(true_cluster[1:])
    with torch.no_grad():
        head.cluster_emb.weight.copy_(centres)
    users = centres[torch.randint(0, K, (B,))] + 0.5 * torch.randn(B, d)
    h = torch.nn.Parameter(users.clone())
    target = torch.randint(1, N, (B,))

    def full_step():
        loss = F.cross_entropy(h @ items[1:].T, target - 1)
        loss.backward()

    def two_level_step():
        sum(head.loss(h, target, lambda ids: items[ids])).backward()

    with torch.no_grad():
        exact_top = head.log_probs(users, items)[:, 1:].topk(args.k, dim=1).indices + 1
        struct_items, _, visited = head.structure_topk(users, items, args.k)
    flat = faiss_mips_index(head.ann_keys(items.detach())[1:], "flat")
    start = time.perf_counter()
    hnsw = faiss_mips_index(head.ann_keys(items.detach())[1:], "hnsw")
    hnsw_build = time.perf_counter() - start

    def overlap(found):
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact_top)) / exact_top.numel()

    rows = [
        ("train: full softmax", best_of(full_step, args.repeats), None),
        ("train: two-level softmax", best_of(two_level_step, args.repeats), None),
    ]
    with torch.no_grad():
        rows += [
            ("infer: exact two-level (all items)",
             best_of(lambda: head.log_probs(users, items).topk(args.k, dim=1), args.repeats), 1.0),
            ("infer: structure (Eq. 6 pruning)",
             best_of(lambda: head.structure_topk(users, items, args.k), args.repeats), overlap(struct_items)),
            ("infer: ANN faiss flat", best_of(lambda: faiss_search(flat, users, args.k, 1), args.repeats),
             overlap(faiss_search(flat, users, args.k, 1)[0])),
            ("infer: ANN faiss HNSW", best_of(lambda: faiss_search(hnsw, users, args.k, 1), args.repeats),
             overlap(faiss_search(hnsw, users, args.k, 1)[0])),
        ]
    print(f"items {args.items}, clusters {K} (sizes {head.stats()['min_size']}-{head.stats()['max_size']}), "
          f"dim {d}, batch {B}, top-{args.k}, torch threads {torch.get_num_threads()}")
    print(f"structure visited {visited.float().mean():.1f} of {K} clusters per user on average; "
          f"HNSW build {hnsw_build:.1f} s")
    print(f"{'method':38s} {'ms/batch':>10s} {'ratio':>8s} {'top-k overlap':>14s}")
    base = {"train": rows[0][1], "infer": rows[2][1]}
    for name, seconds, ov in rows:
        ratio = base[name.split(":")[0]] / seconds
        print(f"{name:38s} {seconds * 1e3:10.2f} {ratio:7.2f}x {'' if ov is None else f'{ov:14.3f}'}")
    print("ratio = time of the full softmax (train) or of exact scoring (infer) / time of the row")


if __name__ == "__main__":
    main()
