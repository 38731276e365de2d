"""The single-step decoders of one trained TwoLevelLLMRec, side by side on its test set.

    python benchmarks/two_level_inference.py --model_file saved/TwoLevelLLMRec-....pth

Loads the checkpoint once and evaluates the same test users through RecBole's full-ranking
evaluator with ``twolevel_inference`` = exact (Eq. 4 for every item), structure (exact top-k by
Eq. 6 pruning) and ann (faiss over ``e + centroid``, flat and HNSW). Prints each method's test
metrics, evaluation time, its speed ratio to exact scoring, and for structure the mean number of
clusters visited per user.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.quick_start import load_data_and_model  # noqa: E402
from recbole_genrec.utils import get_trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_file", required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    config, model, _, _, _, test_data = load_data_and_model(args.model_file)
    if config["model"] != "TwoLevelLLMRec":
        raise SystemExit(f"--model_file holds a {config['model']}, not a TwoLevelLLMRec")
    config["state"] = "WARNING"
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    model.eval()

    visited = []
    structure_topk = model.output.structure_topk

    def counting(*a, **kw):
        out = structure_topk(*a, **kw)
        visited.append(out[2].float())
        return out

    model.output.structure_topk = counting
    rows = []
    for name, inference, index in [("exact", "exact", "flat"), ("structure", "structure", "flat"),
                                   ("ann flat", "ann", "flat"), ("ann hnsw", "ann", "hnsw")]:
        model.inference, model.ann_index_type = inference, index
        model.train(False)  # drops cached item vectors and faiss index
        with torch.no_grad():
            start = time.perf_counter()
            result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            rows.append((name, dict(result), time.perf_counter() - start))
    model.output.structure_topk = structure_topk
    metrics = list(rows[0][1])
    print(f"{config['dataset']}: {model.n_items - 1} items, {model.output.stats()}, "
          f"structure visited {torch.cat(visited).mean():.1f} clusters per user")
    print("| inference | " + " | ".join(metrics) + " | eval s | x exact |")
    print("|---" * (len(metrics) + 3) + "|")
    for name, result, seconds in rows:
        values = " | ".join(f"{result[m]:.4f}" for m in metrics)
        print(f"| {name} | {values} | {seconds:.2f} | {rows[0][2] / seconds:.2f} |")


if __name__ == "__main__":
    main()
