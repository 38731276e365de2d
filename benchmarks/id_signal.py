"""How much an item's semantic ID says about what comes next: the mutual information between the
first-level codes of consecutive training items (last history item -> target), for TIGER's
tokenizer and for TTDS's warm-up under each X source.

    python benchmarks/id_signal.py [--dataset ml-100k] [--sources warmup,encoder]

The estimate grows with the number of codes and keeps some item-to-item dependence even for a
meaningless grouping, so each row also shows the same codes shuffled across items (the same code
sizes, meaning removed; mean of 5 shuffles): the signal is the gap between the two. Session 9 on
ml-100k (t5-tiny, default YAMLs): see the README's "TTDS in brief" for the numbers.
"""

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recbole_genrec  # noqa: E402,F401
from recbole_genrec.quick_start import _prepare  # noqa: E402


def transitions(config, train):
    """(previous item, next item) of every training row."""
    inter = train._dataset.inter_feat
    item = config["ITEM_ID_FIELD"]
    seq, length = inter[item + config["LIST_SUFFIX"]], inter[config["ITEM_LIST_LENGTH_FIELD"]]
    return seq[torch.arange(len(seq)), length - 1], inter[item]


def signal(codes: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor) -> dict:
    """Mutual information (nats) of ``codes[prev]`` and ``codes[nxt]`` (``codes [n_items]``), the
    number of codes used, the share of rows whose two codes are equal and its chance level."""
    codes = (codes - codes[1:].min()).clamp(min=0)  # token ids -> 0..N-1 (row 0: the padding item)
    a, b = codes[prev], codes[nxt]
    n = int(codes.max()) + 1
    used = len(torch.unique(codes[1:]))
    joint = torch.zeros(n, n, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pa @ pb)[nz]).log()).sum())
    return {"codes": used, "mi": mi, "same": float((a == b).double().mean()),
            "chance": float((pa.flatten() * pb.flatten()).sum())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=os.path.join(ROOT, "properties", "ml-100k.yaml"))
    parser.add_argument("--sources", default="warmup,encoder", help="TTDS ttds_text_source values to compare")
    parser.add_argument("--checkpoint_dir", default="saved-id-signal")
    args = parser.parse_args()
    common = {"checkpoint_dir": args.checkpoint_dir, "show_progress": False}
    rows = []
    config, _, trainer, train, _, _ = _prepare("TIGER", args.dataset, args.config_files.split(), common)
    prev, nxt = transitions(config, train)
    m = trainer.model
    m.train_stage("tokenizer", train, None, trainer.stage_config("tokenizer"))
    rows.append(("TIGER tokenizer", m.item_codes[:, 0]))
    for source in args.sources.split(","):
        _, _, trainer, train, _, _ = _prepare("TTDS", args.dataset, args.config_files.split(),
                                              {**common, "ttds_text_source": source})
        m = trainer.model
        m.train_stage("warmup", train, None, trainer.stage_config("warmup"))
        rows.append((f"TTDS warm-up, X {m.text_source}", m.item_sid[:, 0]))
    print(f"\nFirst-level codes of consecutive training items on {args.dataset} ({len(prev)} rows)")
    print(f"{'IDs':<28} {'codes':>5} {'MI (nats)':>10} {'shuffled':>9} {'same code':>10} {'chance':>7}")
    g = torch.Generator().manual_seed(0)
    for name, codes in rows:
        s = signal(codes, prev, nxt)
        shuffled = []
        for _ in range(5):
            perm = torch.cat([codes[:1], codes[1:][torch.randperm(len(codes) - 1, generator=g)]])
            shuffled.append(signal(perm, prev, nxt)["mi"])
        print(f"{name:<28} {s['codes']:>5} {s['mi']:>10.3f} {sum(shuffled) / 5:>9.3f} {s['same']:>10.3f} "
              f"{s['chance']:>7.3f}")


if __name__ == "__main__":
    main()
