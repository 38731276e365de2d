"""Per-user inference latency: SETRec, TokenRec and TwoLevelLLMRec (one pass each) vs TIGER (beam
search) vs one bare backbone pass.

    python benchmarks/inference_latency.py [--dataset ml-100k] [--users 512] [--beam 20]

Same dataset, same backbone preset (t5-tiny unless ``--preset``), same test users, same batch
size, CPU threads as configured. TwoLevelLLMRec needs a decoder-only backbone: it runs on
``--decoder_preset`` (qwen2-tiny: the same width and depth as t5-tiny's encoder), untrained, so its
cluster distribution is flat and structure pruning visits more clusters than a trained model would.
Latency does not depend on training quality, so the models are
built and their tokenizer stages run briefly (TIGER's RQ-VAE for ``--tokenizer_epochs``;
SETRec's CF token from random vectors; TokenRec's LightGCN and codes from random vectors).
Prints per-user milliseconds and ratios in one table.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.quick_start import _prepare  # noqa: E402


def test_batches(test_data, users, batch):
    out, n = [], 0
    for item in test_data:
        inter = item[0]
        take = min(len(inter), users - n)
        for start in range(0, take, batch):
            out.append(inter[torch.arange(start, min(start + batch, take))])
        n += take
        if n >= users:
            break
    return out


def timed(fn, batches, repeats=1):
    with torch.no_grad():
        fn(batches[0])  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for b in batches:
                fn(b)
    return (time.perf_counter() - start) / repeats


def common_arguments(parser):
    """The data and batch options shared with ``setrec_single_pass.py``."""
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default=None)
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokenizer_epochs", type=int, default=30)
    return parser


def main():
    parser = common_arguments(argparse.ArgumentParser())
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--preset", default="t5-tiny")
    parser.add_argument("--decoder_preset", default="qwen2-tiny")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    files = args.config_files.split() if args.config_files else None
    common = {"llm_preset": args.preset, "state": "WARNING", "show_progress": False, "eval_batch_size": args.batch}

    _, _, tiger_trainer, _, _, test_data = _prepare(
        "TIGER", args.dataset, files, {**common, "beam_size": args.beam, "tokenizer_epochs": args.tokenizer_epochs})
    tiger = tiger_trainer.model.eval()
    tiger_trainer.run_stages(None)
    _, _, setrec_trainer, _, _, _ = _prepare("SETRec", args.dataset, files, common)
    setrec = setrec_trainer.model.eval()
    setrec.cf_item_emb.normal_()
    _, _, tokenrec_trainer, _, _, _ = _prepare("TokenRec", args.dataset, files, common)
    tokenrec = tokenrec_trainer.model.eval()
    tokenrec.item_emb.normal_(), tokenrec.user_emb.normal_()
    tokenrec.item_codes.random_(0, tokenrec.book_size), tokenrec.user_codes.random_(0, tokenrec.book_size)
    two_level = {}
    for inference in ("exact", "structure", "ann"):
        _, _, trainer, _, _, _ = _prepare("TwoLevelLLMRec", args.dataset, files, {
            **common, "llm_preset": args.decoder_preset, "cluster_source": "text", "twolevel_inference": inference})
        two_level[inference] = trainer.model.eval()
    batches = test_batches(test_data, args.users, args.batch)
    users = sum(len(b) for b in batches)

    def bare(batch):  # one encoder pass + one decoder step of the same T5 on TIGER's inputs
        ids, mask = tiger.model_inputs(batch)
        start = torch.zeros(len(ids), 1, dtype=torch.long)
        tiger.llm(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=False)

    t_bare = timed(bare, batches)
    t_setrec = timed(setrec.full_sort_predict, batches)
    t_tokenrec = timed(tokenrec.full_sort_predict, batches)
    t_tiger = timed(tiger.full_sort_predict, batches)
    t_two = {name: timed(model.full_sort_predict, batches) for name, model in two_level.items()}
    per_user = {k: 1000 * v / users for k, v in
                {"bare": t_bare, "setrec": t_setrec, "tokenrec": t_tokenrec, "tiger": t_tiger}.items()}
    print(f"{args.dataset}: {users} test users, batch {args.batch}, preset {args.preset}, "
          f"{tiger.n_items - 1} items, {torch.get_num_threads()} threads")
    print("| method | ms / user | x bare pass |")
    print("|---|---|---|")
    print(f"| one bare backbone pass (encoder + 1 decoder step) | {per_user['bare']:.2f} | 1.00 |")
    print(f"| SETRec (one pass, all items scored) | {per_user['setrec']:.2f} | {t_setrec / t_bare:.2f} |")
    print(f"| TokenRec (one pass, cosine over all items) | {per_user['tokenrec']:.2f} | {t_tokenrec / t_bare:.2f} |")
    print(f"| TIGER (trie beam search, beam {args.beam}) | {per_user['tiger']:.2f} | {t_tiger / t_bare:.2f} |")
    for name, seconds in t_two.items():
        print(f"| TwoLevelLLMRec ({name}, {args.decoder_preset}) | {1000 * seconds / users:.2f} | {seconds / t_bare:.2f} |")
    print(f"speed-up over TIGER: SETRec {t_tiger / t_setrec:.2f}x, TokenRec {t_tiger / t_tokenrec:.2f}x, "
          + ", ".join(f"TwoLevelLLMRec {name} {t_tiger / seconds:.2f}x" for name, seconds in t_two.items()))


if __name__ == "__main__":
    main()
