"""Output-layer cost of TwoLevelLLMRec on a large synthetic catalogue: full vs two-level softmax.

    python benchmarks/two_level_softmax.py [--items 200000] [--dim 64] [--batch 256]

Times the model's own item side (``TwoLevelLLMRec.output_layer``: ``E_I``, projection head, output
layer; the LLM is left out, its cost is the same for every method). Training: one forward + backward
of :meth:`output_loss` for a batch, projection included: the full softmax projects every item (Eq. 1),
the two-level loss the members of the batch's target clusters once (Eq. 2-4, Sec. 4.3.1). Inference
(eval mode, projected items cached as in the model): exact scoring of every item (Eq. 4), hierarchical
pruning (Eq. 6, exact) and faiss MIPS over ``e + centroid`` (flat, HNSW). The catalogue is synthetic:
item embeddings scattered around ``sqrt(N)`` true centres, centroids at the centres' projections, users
near one of them. Prints times and ratios side by side from one run, and top-k overlap with exact.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.decoding.two_level_softmax import faiss_mips_index, faiss_search  # noqa: E402
from recbole_genrec.model.two_level import TwoLevelLLMRec  # noqa: E402


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_catalogue(n_real, n_clusters, d, item_dim, proj_hidden, batch, softmaxes=("full", "two_level")):
    """Output layers (one per ``softmaxes``, sharing the two-level one's weights) over ``n_real`` items
    scattered around ``n_clusters`` true centres (their clusters), centroids at the centres' projections,
    and ``batch`` user states near one of them. Returns ``(models, users)``."""
    N, K = n_real + 1, n_clusters  # row 0 is the padding item, as in RecBole
    models = {s: TwoLevelLLMRec.output_layer(N, K, d, item_dim, proj_hidden, softmax=s) for s in softmaxes}
    two = models["two_level"]
    centres = F.normalize(torch.randn(K, item_dim), dim=-1) * 3
    true_cluster = torch.randint(0, K, (N,))
    with torch.no_grad():
        two.item_embedding.weight.copy_(centres[true_cluster] + torch.randn(N, item_dim))
        two.output.set_clusters(true_cluster[1:])
        last = two.item_proj[-1]  # scale the projection so projected centres have norm ~3
        scale = 3 / two.item_proj(centres).norm(dim=-1).mean()
        last.weight.mul_(scale), last.bias.mul_(scale)
        two.output.cluster_emb.weight.copy_(two.item_proj(centres))
        for s in softmaxes:
            if s != "two_level":
                models[s].load_state_dict(two.state_dict())  # the same item side in all
        users = two.item_proj(centres[torch.randint(0, K, (batch,))]) + 0.5 * torch.randn(batch, d)
    return models, users


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64, help="LLM width d")
    parser.add_argument("--item-dim", type=int, default=64, help="item embedding width (E_I)")
    parser.add_argument("--proj-hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=None, help="default round(sqrt(items))")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    N, d, B = args.items + 1, args.dim, args.batch  # row 0 is the padding item, as in RecBole
    K = args.clusters or round(args.items ** 0.5)

    models, users = synthetic_catalogue(args.items, K, d, args.item_dim, args.proj_hidden, B)
    two = models["two_level"]
    h = torch.nn.Parameter(users.clone())
    target = torch.randint(1, N, (B,))
    touched = int(torch.isin(two.output.cluster_of[1:], two.output.cluster_of[target].unique()).sum())

    def step(model):
        loss = model.output_loss(h, target)
        (sum(loss) if isinstance(loss, tuple) else loss).backward()

    rows = [("train: full softmax (Eq. 1)", best_of(lambda: step(models["full"]), args.repeats), None),
            ("train: two-level softmax (Eq. 4)", best_of(lambda: step(two), args.repeats), None)]

    two.eval()
    with torch.no_grad():
        vectors = two.item_vectors()  # cached in eval mode, as the model's inference uses them
        exact_top = two.log_probs(users)[:, 1:].topk(args.k, dim=1).indices + 1
        struct_items, _, visited = two.output.structure_topk(users, vectors, args.k)
        two.ann_index()  # the model's faiss flat index, built once
        start = time.perf_counter()
        hnsw = faiss_mips_index(two.output.ann_keys(vectors)[1:], "hnsw")
        hnsw_build = time.perf_counter() - start

        def overlap(found):
            return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact_top)) / exact_top.numel()

        rows += [
            ("infer: exact two-level (all items)",
             best_of(lambda: two.log_probs(users).topk(args.k, dim=1), args.repeats), 1.0),
            ("infer: structure (Eq. 6 pruning)",
             best_of(lambda: two.output.structure_topk(users, vectors, args.k), args.repeats), overlap(struct_items)),
            ("infer: ANN faiss flat", best_of(lambda: two.ann_topk(users, args.k), args.repeats),
             overlap(two.ann_topk(users, args.k)[0])),
            ("infer: ANN faiss HNSW", best_of(lambda: faiss_search(hnsw, users, args.k, 1), args.repeats),
             overlap(faiss_search(hnsw, users, args.k, 1)[0])),
        ]
    stats = two.output.stats()
    print(f"items {args.items}, clusters {K} (sizes {stats['min_size']}-{stats['max_size']}), d {d}, "
          f"E_I {args.item_dim} -> {args.proj_hidden} -> {d}, batch {B}, top-{args.k}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"rows projected per training step: full {N}, two-level {touched} (the batch's target clusters); "
          f"structure visited {visited.float().mean():.1f} of {K} clusters per user; HNSW build {hnsw_build:.1f} s")
    print(f"{'method':38s} {'ms/batch':>10s} {'ratio':>8s} {'top-k overlap':>14s}")
    base = {"train": rows[0][1], "infer": rows[2][1]}
    for name, seconds, ov in rows:
        ratio = base[name.split(":")[0]] / seconds
        print(f"{name:38s} {seconds * 1e3:10.2f} {ratio:7.2f}x {'' if ov is None else f'{ov:14.3f}'}")
    print("ratio = time of the full softmax (train) or of exact scoring (infer) / time of the row; "
          "training times include the item projection")


if __name__ == "__main__":
    main()
