"""Why TokenRec trails SASRec on leave-one-out: what its retrieval space allows, without the LLM.

    python benchmarks/tokenrec_space.py [--dataset ml-100k] [--epochs 20]

TokenRec scores every item by the cosine between ``z`` and the item's frozen LightGCN vector
(Eq. 19). This script trains TokenRec's own ``cf`` stage (LightGCN, the default YAMLs), then
reports test recall@10 over all items for rankers that live in that space:

- most popular (training counts);
- the user's own LightGCN vector, by cosine (Eq. 19) and by dot product (LightGCN's own score);
- an LLM-free stand-in for TokenRec's recommender stage: ``z`` = the paper's three-layer MLP over
  [user vector, mean of the last ``MAX_ITEM_LIST_LENGTH`` history item vectors], the information
  of prompt 2, trained with Eq. 20 (one uniform negative, margin ``gamma``) or with a softmax
  over cos / tau of all items (a departure from the paper, for comparison).

Each row gives recall@10 as RecBole's sequential evaluator computes it (the user's past items
are ranked too) and with the past items masked (as RecBole does for general models), and the share
of the unmasked top-10 slots that are past items. If the stand-in trained with Eq. 20 lands where
TokenRec lands, its LLM is not what holds it back: the objective and the space are.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import recbole_genrec  # noqa: E402,F401
from recbole_genrec.quick_start import _prepare  # noqa: E402


def rows_of(model, inter, history):
    """``users [N]``, ``items [N, history]`` (the last ``history`` items, 0 where there are fewer),
    ``targets [N]``."""
    items, _ = model.last_items(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN], history)
    return inter[model.USER_ID], items, inter[model.ITEM_ID]


def test_rows(model, test_data, history):
    """The test users' rows: history (train + valid items), and the held-out item."""
    users, items, targets, lists = [], [], [], []
    for interaction, _, positive_u, positive_i in test_data:
        u, h, _ = rows_of(model, interaction, history)
        target = torch.zeros(len(u), dtype=torch.long)
        target[positive_u] = positive_i
        users.append(u), items.append(h), targets.append(target)
        lists.append(interaction[model.ITEM_SEQ])
    return torch.cat(users), torch.cat(items), torch.cat(targets), torch.cat(lists)


def past_items(model, inter, test_users, test_lists, n_users, n_items):
    """``[n_users, n_items]``: every item a user rated before the test item (the training rows'
    lists and targets, which cover the whole training sequence, and the test row's list, which
    ends with the validation item)."""
    seen = torch.zeros(n_users, n_items, dtype=torch.bool)
    users, lists = inter[model.USER_ID], inter[model.ITEM_SEQ]
    seen[users, inter[model.ITEM_ID]] = True
    seen[users.unsqueeze(1).expand_as(lists), lists] = True
    seen[test_users.unsqueeze(1).expand_as(test_lists), test_lists] = True
    seen[:, 0] = False
    return seen


def evaluate(scores, targets, seen):
    """recall@10 unmasked and masked, and the share of past items in the unmasked top-10."""
    scores = scores.clone()
    scores[:, 0] = -float("inf")
    top = scores.topk(10, 1).indices
    hit = (top == targets.unsqueeze(1)).any(1).float().mean().item()
    share = seen.gather(1, top).float().mean().item()
    masked = scores.masked_fill(seen, -float("inf")).topk(10, 1).indices
    return hit, (masked == targets.unsqueeze(1)).any(1).float().mean().item(), share


def stand_in(features, targets, items, loss, epochs, gamma, tau, seed, test_features, dropout):
    """The MLP of Eq. 18 trained on ``features`` with Eq. 20 (``cosine``) or a softmax; test scores."""
    torch.manual_seed(seed)
    width = features.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                              torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, items.shape[1]))
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.01)
    unit = F.normalize(items, dim=-1)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(features)).split(256):
            z, t = net(features[batch]), targets[batch]
            if loss == "cosine":  # Eq. 20
                neg = torch.randint(1, len(items), (len(batch),))
                value = (1 - F.cosine_similarity(z, items[t])).mean() \
                    + (F.cosine_similarity(z, items[neg]) - gamma).clamp(min=0).mean()
            else:
                logits = F.normalize(z, dim=-1) @ unit.T / tau
                logits[:, 0] = -float("inf")
                value = F.cross_entropy(logits, t)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        return F.normalize(net(test_features), dim=-1) @ unit.T


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=os.path.join(ROOT, "properties", "ml-100k.yaml"))
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the LLM-free stand-in")
    parser.add_argument("--tau", type=float, default=0.1, help="temperature of the softmax stand-in")
    parser.add_argument("--checkpoint_dir", default="saved-tokenrec-space")
    args = parser.parse_args()
    config, _, trainer, train, valid, test = _prepare("TokenRec", args.dataset, args.config_files.split(),
                                                      {"checkpoint_dir": args.checkpoint_dir, "show_progress": False})
    m = trainer.model
    m.train_stage("cf", train, valid, trainer.stage_config("cf"))
    users_emb, items_emb = m.user_emb.cpu(), m.item_emb.cpu()
    history, n_items = config["MAX_ITEM_LIST_LENGTH"], items_emb.shape[0]

    def features(users, items):
        valid = (items > 0).float().unsqueeze(-1)
        return torch.cat([users_emb[users], (items_emb[items] * valid).sum(1) / valid.sum(1).clamp(min=1)], -1)

    tr_users, tr_items, tr_targets = rows_of(m, train._dataset.inter_feat, history)
    te_users, te_items, te_targets, te_lists = test_rows(m, test, history)
    seen = past_items(m, train._dataset.inter_feat, te_users, te_lists, users_emb.shape[0], n_items)[te_users]
    popularity = torch.bincount(tr_targets, minlength=n_items).float()
    results = [
        ("most popular", popularity.expand(len(te_users), -1)),
        ("user vector, cosine (Eq. 19)", F.normalize(users_emb[te_users], dim=-1) @ F.normalize(items_emb, dim=-1).T),
        ("user vector, dot (LightGCN)", users_emb[te_users] @ items_emb.T),
    ]
    train_x, test_x = features(tr_users, tr_items), features(te_users, te_items)
    for loss in ("cosine", "softmax"):
        name = "stand-in, Eq. 20" if loss == "cosine" else f"stand-in, softmax tau {args.tau}"
        results.append((f"{name}, {args.epochs} ep", stand_in(
            train_x, tr_targets, items_emb, loss, args.epochs, config["gamma"], args.tau, config["seed"], test_x,
            config["proj_dropout"])))
    print(f"\nTokenRec's retrieval space on {args.dataset}: {len(te_users)} test users, {n_items - 1} items, "
          f"{len(tr_targets)} training rows")
    print(f"{'ranker':<36} {'recall@10':>9} {'masked':>7} {'past items in top-10':>21}")
    for name, scores in results:
        hit, masked, share = evaluate(scores, te_targets, seen)
        print(f"{name:<36} {hit:>9.4f} {masked:>7.4f} {share:>21.2f}")


if __name__ == "__main__":
    main()
