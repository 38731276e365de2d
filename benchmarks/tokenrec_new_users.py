"""How well TokenRec's stand-in for a new user's LightGCN vector matches a trained user's own.

    python benchmarks/tokenrec_new_users.py --cf_stage CKPT/TokenRec-ml-100k-cf-*.pth \
        --tokenizer_stage CKPT/TokenRec-ml-100k-tokenizer-*.pth [--dataset ml-100k]

A user with no training interaction (the warm/cold split) gets the user codes of the mean LightGCN
vector of its prompt's history items (``recbole_genrec.model.tokenrec``). On leave-one-out, where
every user has a trained vector, this script compares each user's own vector with that stand-in,
from all its training items and from the last ``MAX_ITEM_LIST_LENGTH`` of them (the prompt's
window): mean cosine, mean norms, and how often the user MQ-Tokenizer gives the stand-in the user's
own code, per codebook, against another user's vector (a random permutation of the users). Give
the ``cf`` and ``tokenizer`` stage files of a TokenRec run on the same data and split.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cf_stage", required=True, help="a TokenRec 'cf' stage file")
    parser.add_argument("--tokenizer_stage", required=True, help="the 'tokenizer' stage file of the same run")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default="properties/ml-100k.yaml properties/converge.yaml")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config reads the command line
    import recbole_genrec  # noqa: F401
    from recbole_genrec.compat import safe_torch_load
    from recbole_genrec.evaluation.runs import prepare

    files = [os.path.join(ROOT, f) for f in args.config_files.split()]
    config, _, trainer, train, _, _ = prepare("TokenRec", args.dataset, files, {"show_progress": False})
    model = trainer.model
    for stage, path in (("cf", args.cf_stage), ("tokenizer", args.tokenizer_stage)):
        model.load_stage_state_dict(stage, safe_torch_load(path, map_location="cpu")["state"])
    inter = train._dataset.inter_feat
    uid, target = inter[model.USER_ID], inter[model.ITEM_ID]
    seq, length = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    users, items = model.user_emb, model.item_emb
    n = users.shape[0]
    every = torch.zeros_like(users)  # the mean over all training items: each row's target, and each user's first item
    count = torch.zeros(n)
    every.index_add_(0, uid, items[target])
    count.index_add_(0, uid, torch.ones(len(uid)))
    first = torch.full((n,), len(uid), dtype=torch.long)
    first.scatter_reduce_(0, uid, torch.arange(len(uid)), reduce="amin")
    last = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, uid, torch.arange(len(uid)), reduce="amax")
    has = count > 0
    has[0] = False
    rows = first[has]
    every[has] += items[seq[rows, 0]]
    every[has] /= (count[has] + 1).unsqueeze(1)
    window = torch.zeros_like(users)  # the prompt's window: the last row's history and its target
    for u in has.nonzero().flatten().tolist():
        r = int(last[u])
        recent = torch.cat([seq[r, :int(length[r])], target[r:r + 1]])[-model.max_seq_length:]
        window[u] = items[recent].mean(0)
    own = users[has]
    codes = model.user_codes[has]
    tokenize = model.user_tokenizer.eval().tokenize
    generator = torch.Generator().manual_seed(0)
    print(f"{int(has.sum())} users; norm of their own vectors {own.norm(dim=1).mean():.2f}")
    with torch.no_grad():
        for name, stand_in in (("all training items", every[has]), (f"last {model.max_seq_length} items", window[has]),
                               ("another user's vector", own[torch.randperm(len(own), generator=generator)])):
            agree = (tokenize(stand_in) == codes).float().mean(0)
            print(f"{name}: cosine {F.cosine_similarity(own, stand_in).mean():.3f}, norm {stand_in.norm(dim=1).mean():.2f}, "
                  f"own code per codebook " + ", ".join(f"{a:.1%}" for a in agree.tolist()))


if __name__ == "__main__":
    main()
