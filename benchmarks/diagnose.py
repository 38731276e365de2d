"""Why a model trails: how well it fits its own training rows, and where its top-10 goes.

    python benchmarks/diagnose.py CHECKPOINT [CHECKPOINT ...] [--train_rows 1000]
    python benchmarks/diagnose.py --records DIR          # every run record in DIR (a ``runs`` folder)

For each checkpoint of a sequential model (written by ``run_recbole_genrec`` / ``--compare``; data,
split and seed are the checkpoint's own) and each of a sample of training rows (``--train_rows``,
seeded), the validation rows and the test rows, it prints

- ``recall@10``: as RecBole's full-ranking evaluator counts it for this model (sequential models:
  nothing masked),
- ``seen in top-10``: the share of the top 10 that the user had already interacted with before
  the row's target (on data without repeat consumption these slots cannot hit),
- ``recall@10 seen masked``: recall@10 when those items are left out of the ranking (for a model
  that scores only its beam, TIGER and LETTER, fewer than 10 items may remain: a lower bound; an
  item scored ``-inf`` never counts as a hit here, where RecBole's evaluator can count a target
  that ``topk`` draws among tied ``-inf`` scores),
- ``NLL``: the mean negative log-likelihood of the target item, in nats, where the model defines
  one (a softmax over items: SASRec, ...; a code sequence: TIGER, LETTER, whose item likelihoods
  ``exact_scores`` are renormalised over the catalogue's items), beside two references
  computed on the same rows: the item frequencies among the training split's targets, add-one
  smoothed over the catalogue (``pop NLL``), and the uniform distribution (``log n_items``).

Rows are labelled by the checkpoint's file name (one model may have several runs in a folder).

A model whose training NLL is no better than popularity's has not learned the data yet
(under-fitting: more optimisation steps, a higher learning rate); one whose training recall is
far above its validation recall has memorised it (over-fitting: regularise).
"""

import argparse
import collections
import glob
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _histories(dataset):
    """``{user: [items in time order]}`` over every split. A sequential dataset holds one row per
    target, oldest first, with the items before it (a user's first item is only in a list)."""
    inter = dataset.inter_feat
    list_field = dataset.iid_field + dataset.config["LIST_SUFFIX"]
    lengths = inter[dataset.config["ITEM_LIST_LENGTH_FIELD"]].tolist()
    by_user = collections.defaultdict(list)
    for u, i, listed, n in zip(inter[dataset.uid_field].tolist(), inter[dataset.iid_field].tolist(),
                               inter[list_field].tolist(), lengths):
        if not by_user[u]:
            by_user[u].extend(listed[:n])
        by_user[u].append(i)
    return by_user


def popularity_log_probs(train_set, n_items: int):
    """``[n_items]`` log-probabilities of the items' frequencies among the training targets, add-one
    smoothed over items ``1..n_items-1`` (they sum to one); the padding item 0 gets ``-inf``."""
    import torch

    counts = torch.bincount(train_set.inter_feat[train_set.iid_field], minlength=n_items)[1:].float() + 1
    return torch.cat([torch.tensor([float("-inf")]), torch.log(counts / counts.sum())])


def _items_before(history, target, interaction, row, model):
    """The user's items before this row's target. Where the target repeats, the occurrence whose
    preceding items are the row's history list (sequential rows) is the row's."""
    places = [p for p, item in enumerate(history) if item == target]
    if len(places) > 1:
        length = int(interaction[model.ITEM_SEQ_LEN][row])
        listed = interaction[model.ITEM_SEQ][row, :length].tolist()
        places = [p for p in places if history[max(0, p - length):p] == listed] or places
    return history[:places[0]]


def _target_log_probs(model, interaction, scores):
    """Log-probability of each row's target, or ``None`` where the model defines none."""
    import torch

    target = interaction[model.POS_ITEM_ID]
    if hasattr(model, "exact_scores"):  # TIGER, LETTER: every item's code-sequence log-likelihood
        scores = model.exact_scores(interaction).float().cpu()  # renormalised over the catalogue below
    elif getattr(model, "loss_type", None) != "CE":  # RecBole's sequential softmax models have CE
        return None
    scores = scores.clone()
    scores[:, 0] = float("-inf")
    return torch.log_softmax(scores, 1).gather(1, target.cpu().unsqueeze(1)).squeeze(1)


def diagnose(model_file: str, train_rows: int = 1000) -> list[dict]:
    """One row of measures per split (``train`` sample, ``valid``, ``test``) of ``model_file``."""
    import torch

    from recbole_genrec.quick_start import load_data_and_model

    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(model_file)
    if not hasattr(model, "ITEM_SEQ"):
        raise ValueError(f"{config['model']} ({model_file}) is not a sequential model: diagnose.py reads "
                         "rows with one target and its history")
    model.eval()
    by_user = _histories(dataset)
    iid = dataset.iid_field
    train_set = train_data._dataset
    pop_log_prob = popularity_log_probs(train_set, model.n_items)
    generator = torch.Generator().manual_seed(config["seed"])
    picked = torch.randperm(len(train_set), generator=generator)[:train_rows]
    train_sample = train_set.inter_feat[picked]
    batch = config["eval_batch_size"] or 256
    splits = {"train": [train_sample[i:i + batch] for i in range(0, len(train_sample), batch)],
              "valid": (b[0] for b in valid_data), "test": (b[0] for b in test_data)}
    rows = []
    for split, batches in splits.items():
        total, n, nll_n = collections.Counter(), 0, 0
        for interaction in batches:
            interaction = interaction.to(model.device)
            B = len(interaction)
            users, targets = interaction[dataset.uid_field].tolist(), interaction[iid].tolist()
            seen = torch.zeros(B, model.n_items, dtype=torch.bool)
            for r, (u, t) in enumerate(zip(users, targets)):
                seen[r, _items_before(by_user[u], t, interaction, r, model)] = True
            with torch.no_grad():
                scores = model.full_sort_predict(interaction).view(B, -1).float().cpu()
                log_probs = _target_log_probs(model, interaction, scores)
            scores[:, 0] = float("-inf")
            target = torch.tensor(targets)
            top = scores.topk(10, 1).indices
            total["recall@10"] += (top == target.unsqueeze(1)).any(1).sum().item()
            total["seen in top-10"] += seen.gather(1, top).float().mean(1).sum().item()
            masked = scores.masked_fill(seen, float("-inf"))
            top = masked.topk(10, 1).indices
            hit = (top == target.unsqueeze(1)) & torch.isfinite(masked.gather(1, top))
            total["recall@10 seen masked"] += hit.any(1).sum().item()
            if log_probs is not None:
                total["NLL"] -= log_probs.sum().item()
                nll_n += B
            total["pop NLL"] -= pop_log_prob[target].sum().item()
            n += B
        row = {"model": config["model"], "checkpoint": os.path.basename(model_file), "dataset": config["dataset"],
               "split": split, "rows": n}
        row.update({k: v / (nll_n if k == "NLL" else n) for k, v in total.items() if k != "NLL" or nll_n})
        row["log n_items"] = math.log(model.n_items - 1)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--records", help="a folder of run records (*.json); their model_file is diagnosed")
    parser.add_argument("--train_rows", type=int, default=1000)
    args = parser.parse_args()
    files = list(args.checkpoints)
    if args.records:
        for path in sorted(glob.glob(os.path.join(args.records, "*.json"))):
            with open(path, encoding="utf-8") as f:
                files.append(json.load(f)["result"]["model_file"])
    if not files:
        parser.error("name a CHECKPOINT or --records DIR")
    sys.argv = sys.argv[:1]  # RecBole's Config would read our options as config keys
    import recbole_genrec  # noqa: F401

    columns = ["recall@10", "seen in top-10", "recall@10 seen masked", "NLL", "pop NLL", "log n_items"]
    lines = ["| checkpoint | split | rows | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for path in files:
        try:
            rows = diagnose(path, args.train_rows)
        except (ValueError, FileNotFoundError) as error:
            print(f"skipped: {error}", flush=True)
            continue
        for row in rows:
            cells = [f"{row[c]:.4f}" if c in row else "-" for c in columns]
            lines.append(f"| {row['checkpoint']} | {row['split']} | {row['rows']} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
