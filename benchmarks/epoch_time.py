"""Training-step time of the recommender stage of every model, and its extrapolated epoch time.

    python benchmarks/epoch_time.py [--dataset ml-100k] [--steps 30] [--repeats 1] [--models SASRec,SETRec-t5,...]
    python benchmarks/epoch_time.py --models SETRec-t5,SETRec-t5-hf-sdpa,SETRec-t5-nodropout,SETRec-qwen2 --repeats 5

Every model is built through ``recbole_genrec.quick_start._prepare`` on the same data and split
(``--config_files``, default ``properties/ml-100k.yaml``) with its own YAML defaults (batch size
included). Only the recommender stage is timed: RecBole's own ``Trainer._train_epoch`` (forward,
backward, optimizer step, its AMP/grad-clip plumbing) on the first ``--steps`` batches of the
model's train loader, after ``--warmup`` untimed steps; data loading is part of a step, as in a
real epoch. All models are built first, then ``--repeats`` rounds time one block of every model in
turn and each model keeps its fastest block (the machine is shared: a change of load hits all
models of a round alike).

Pre-training stages do not change the cost of a recommender step, so they are replaced by the
cheapest state of the right shape: random CF / LightGCN vectors (SETRec, LETTER, TokenRec) and
random MQ codes (TokenRec), a one-epoch RQ-VAE for the item codes (TIGER, LETTER), text k-means
clusters (TwoLevelLLMRec), a warm-up without training epochs (TTDS: k-means codebooks and a first
Sid refresh). What the stages freeze stays frozen, and the optimizer covers what the staged
trainer's covers (the parameters that require gradients). TTDS recomputes every Sid at the start
of each joint epoch: that refresh is timed once and added to its epoch.

Prints one table (ms / step, steps in a full epoch at the default batch size, extrapolated epoch
time, ratio to SASRec's epoch) and the T5 vs decoder-only ratio of the models that run on both
(``t5-tiny``: 2 encoder + 2 decoder layers; ``qwen2-tiny``: 2 decoder-only layers; same width 64,
FFN 256, 4 heads).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_genrec.quick_start import _prepare  # noqa: E402

# label -> (model, config overrides)
MODELS = {
    "SASRec": ("SASRec", {}),
    "TIGER": ("TIGER", {"llm_preset": "t5-tiny"}),
    "LETTER": ("LETTER", {"llm_preset": "t5-tiny"}),
    "SETRec-t5": ("SETRec", {"llm_preset": "t5-tiny"}),
    "SETRec-qwen2": ("SETRec", {"llm_preset": "qwen2-tiny"}),
    "TokenRec": ("TokenRec", {"llm_preset": "t5-tiny"}),
    "TwoLevelLLMRec": ("TwoLevelLLMRec", {"llm_preset": "qwen2-tiny", "cluster_source": "text"}),
    "TTDS-t5": ("TTDS", {"llm_preset": "t5-tiny"}),
    "TTDS-qwen2": ("TTDS", {"llm_preset": "qwen2-tiny"}),
}
# selectable with --models, not run by default: where the T5 / decoder-only gap comes from
# (``-hf-sdpa``: the T5 on transformers' own "sdpa" attention instead of ours, i.e. as before
# recbole_genrec.llm.backbone.use_t5_attention; ``-nodropout``: T5 with dropout_rate 0, which is
# not the preset's numerics)
DIAGNOSTIC = {
    "SETRec-t5-hf-sdpa": ("SETRec", {"llm_preset": "t5-tiny"}),
    "TTDS-t5-hf-sdpa": ("TTDS", {"llm_preset": "t5-tiny"}),
    "SETRec-t5-nodropout": ("SETRec", {"llm_preset": "t5-tiny", "llm_config": {"dropout_rate": 0.0}}),
    "TTDS-t5-nodropout": ("TTDS", {"llm_preset": "t5-tiny", "llm_config": {"dropout_rate": 0.0}}),
}
PAIRS = [("SETRec", "SETRec-t5", "SETRec-qwen2"), ("TTDS", "TTDS-t5", "TTDS-qwen2"),
         ("SETRec, T5 on HF sdpa (before)", "SETRec-t5-hf-sdpa", "SETRec-qwen2"),
         ("TTDS, T5 on HF sdpa (before)", "TTDS-t5-hf-sdpa", "TTDS-qwen2"),
         ("SETRec, T5 without dropout", "SETRec-t5-nodropout", "SETRec-qwen2"),
         ("TTDS, T5 without dropout", "TTDS-t5-nodropout", "TTDS-qwen2")]
STAGE = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 256}


class FirstBatches:
    """The first ``n`` batches of a RecBole train loader (a fresh shuffled pass each time)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n
        self.shuffle = getattr(loader, "shuffle", False)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __len__(self):
        return min(self.n, len(self.loader))


def skip_stages(name, model, train_data, valid_data):
    """Cheapest stand-in for the model's pre-training stages (module docstring); returns a
    function to call at the start of every epoch, or None."""
    g = torch.Generator().manual_seed(0)
    if name in ("TIGER", "LETTER"):
        if name == "LETTER":
            model.cf_item_emb.copy_(torch.randn(model.cf_item_emb.shape, generator=g))
        model.train_stage("tokenizer", train_data, valid_data, STAGE)  # one RQ-VAE epoch, then codes (frozen)
    elif name == "SETRec":
        model.cf_item_emb.copy_(torch.randn(model.cf_item_emb.shape, generator=g))
    elif name == "TokenRec":
        model.item_emb.copy_(torch.randn(model.item_emb.shape, generator=g))
        model.user_emb.copy_(torch.randn(model.user_emb.shape, generator=g))
        model.item_codes.copy_(torch.randint(0, model.book_size, model.item_codes.shape, generator=g))
        model.user_codes.copy_(torch.randint(0, model.book_size, model.user_codes.shape, generator=g))
        for p in list(model.item_tokenizer.parameters()) + list(model.user_tokenizer.parameters()):
            p.requires_grad_(False)  # as the tokenizer stage leaves them
    elif name == "TTDS":
        model.train_stage("warmup", train_data, valid_data, {**STAGE, "epochs": 0})
        if model.dynamic:
            return model.refresh_ids
    return None


def step_block(trainer, train_data, steps):
    """``(wall seconds, process CPU seconds)`` of ``steps`` training steps."""
    wall, cpu = time.perf_counter(), time.process_time()
    Trainer._train_epoch(trainer, FirstBatches(train_data, steps), 0)  # RecBole's loop, no per-epoch hooks
    return time.perf_counter() - wall, time.process_time() - cpu


def prepare(label, args, files):
    """Build one model and its trainer; return its row (without timings) and its step block."""
    name, overrides = {**MODELS, **DIAGNOSTIC}[label]
    config, _, trainer, train_data, valid_data, _ = _prepare(
        name, args.dataset, files, {"state": "WARNING", "show_progress": False, **overrides})
    model = trainer.model
    if label.endswith("-hf-sdpa"):
        model.llm.set_attn_implementation("sdpa")
    per_epoch = skip_stages(name, model, train_data, valid_data)
    init_seed(config["seed"], config["reproducibility"])
    trainer.optimizer = trainer._build_optimizer(params=[p for p in model.parameters() if p.requires_grad])
    refresh_s = 0.0
    if per_epoch is not None:
        start = time.perf_counter() if args.clock == "wall" else time.process_time()
        per_epoch()
        refresh_s = (time.perf_counter() if args.clock == "wall" else time.process_time()) - start
    step_block(trainer, train_data, args.warmup)
    row = {"label": label, "model": name, "batch": config["train_batch_size"], "epoch_steps": len(train_data),
           "steps": min(args.steps, len(train_data)), "refresh_s": refresh_s, "seconds": [],
           "backbone": overrides.get("llm_preset", "-") + (", HF sdpa" if label.endswith("-hf-sdpa") else "") + "".join(
               f", {k} {v}" for k, v in (overrides.get("llm_config") or {}).items())}
    return row, lambda: step_block(trainer, train_data, args.steps)


def measure(labels, args, files):
    """Every model built first, then ``--repeats`` rounds that time one block of each model in turn
    (so that a change in the load of a shared machine hits every model alike); the fastest block."""
    built = {label: prepare(label, args, files) for label in labels}
    for _ in range(args.repeats):
        for row, block in built.values():
            row["seconds"].append(block())
    rows = {}
    for label, (row, _) in built.items():
        row["wall_ms"] = 1000 * min(wall for wall, _ in row["seconds"]) / row["steps"]
        row["cpu_ms"] = 1000 * min(cpu for _, cpu in row["seconds"]) / row["steps"]
        row["ms"] = row[f"{args.clock}_ms"]
        row["epoch_s"] = row["ms"] * row["epoch_steps"] / 1000 + row["refresh_s"]
        rows[label] = row
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default="properties/ml-100k.yaml")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {list(MODELS)} (default: all) and {list(DIAGNOSTIC)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the epoch and the ratios use: wall time, or this process's CPU time (steadier "
                             "on a shared machine, where other jobs take turns on the cores; one thread)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    labels = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in labels if m not in MODELS and m not in DIAGNOSTIC]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {list(MODELS) + list(DIAGNOSTIC)}")
    files = args.config_files.split() if args.config_files else None
    rows = measure(labels, args, files)
    base = rows.get("SASRec")
    print(f"{args.dataset}: {args.steps} timed steps per model (best of {args.repeats}), {args.warmup} warm-up steps, "
          f"{torch.get_num_threads()} threads; epochs and ratios from {args.clock} time")
    print("| model | backbone | batch | ms / step (wall) | ms / step (CPU) | steps / epoch | per-epoch extra (s) "
          "| epoch (s, extrapolated) | x SASRec epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        ratio = f"{r['epoch_s'] / base['epoch_s']:.2f}" if base else "-"
        extra = f"{r['refresh_s']:.1f} (Sid refresh)" if r["refresh_s"] else "-"
        print(f"| {r['label']} | {r['backbone']} | {r['batch']} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | "
              f"{r['epoch_steps']} | {extra} | {r['epoch_s']:.1f} | {ratio} |")
    pairs = [(m, a, b) for m, a, b in PAIRS if a in rows and b in rows]
    if pairs:
        print("\nt5-tiny (2 encoder + 2 decoder layers) vs qwen2-tiny (2 layers), same width 64 / FFN 256 / 4 heads:")
        print(f"| model | t5-tiny ms / step ({args.clock}) | qwen2-tiny ms / step ({args.clock}) | t5 / qwen2 step "
              "| t5 / qwen2 epoch |")
        print("|---|---|---|---|---|")
        for m, a, b in pairs:
            ra, rb = rows[a], rows[b]
            print(f"| {m} | {ra['ms']:.1f} | {rb['ms']:.1f} | {ra['ms'] / rb['ms']:.2f} | "
                  f"{ra['epoch_s'] / rb['epoch_s']:.2f} |")


if __name__ == "__main__":
    main()
