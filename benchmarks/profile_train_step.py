"""Operator profile of recommender training steps of one model on two backbones (t5-tiny vs qwen2-tiny).

    python benchmarks/profile_train_step.py [--model SETRec] [--steps 5] [--rows 20]

Builds the model as ``benchmarks/epoch_time.py`` does (same data, stand-ins for the pre-training
stages, RecBole's own training loop) and prints, per backbone, torch.profiler's table of the ops
with the most self CPU time over ``--steps`` steps (after two warm-up steps), grouped by input shape
with ``--shapes``.
"""

import argparse
import os
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from epoch_time import MODELS, skip_stages, step_block  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_genrec.quick_start import _prepare  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="SETRec", help="SETRec or TTDS")
    parser.add_argument("--backbones", default="t5,qwen2")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default="properties/ml-100k.yaml")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--shapes", action="store_true")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    files = args.config_files.split() if args.config_files else None
    for backbone in args.backbones.split(","):
        name, overrides = MODELS[f"{args.model}-{backbone}"]
        config, _, trainer, train_data, valid_data, _ = _prepare(
            name, args.dataset, files, {"state": "WARNING", "show_progress": False, **overrides})
        skip_stages(name, trainer.model, train_data, valid_data)
        init_seed(config["seed"], config["reproducibility"])
        trainer.optimizer = trainer._build_optimizer(params=[p for p in trainer.model.parameters() if p.requires_grad])
        step_block(trainer, train_data, 2)
        with profile(record_shapes=args.shapes) as prof:
            seconds, _ = step_block(trainer, train_data, args.steps)
        ms = 1000 * seconds / args.steps
        print(f"\n{args.model} on {overrides['llm_preset']}: {ms:.1f} ms / step under the profiler")
        table = prof.key_averages(group_by_input_shape=args.shapes).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50, max_shapes_column_width=80)
        print(table)


if __name__ == "__main__":
    main()
