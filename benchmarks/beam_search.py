"""Our batched trie-constrained beam search (uncached and KV-cached) vs transformers ``generate``
on the same TIGER.

    python benchmarks/beam_search.py --model_file saved/TIGER-....pth [--users 256 --beam 20 --repeats 3]

Without ``--model_file`` a TIGER is first trained for one epoch on ``--dataset`` (default the
tiny test dataset). The three decoders run on the same model, the same test users and the same
beam width: ours re-running the decoder over the whole prefix each step (``use_cache=False``),
ours with the KV cache reordered by the chosen beams (``use_cache=True``, the default), and
``generate`` (KV-cached too) constrained with ``prefix_allowed_tokens_fn`` over a dict trie of the
same code table (``do_sample=False``). Prints users/second of each and the ratios side by side
(best of ``--repeats`` timed runs, after one warm-up), whether the two searches of ours agree
(items, max score difference), and the mean overlap of our top-10 with generate's.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec  # noqa: E402


def dict_trie(sequences):
    trie = {}
    for row in sequences.tolist():
        node = trie
        for token in row:
            node = node.setdefault(token, {})
    return trie


def hf_generate(model, batch, beam, trie, start):
    ids, mask = model.model_inputs(batch)

    def allowed(_, prefix):
        node = trie
        for token in prefix.tolist()[1:]:  # skip the decoder start token
            node = node.get(token, {})
        return list(node) or [model.pad_id]

    out = model.llm.generate(
        input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=beam, do_sample=False,
        max_new_tokens=model.depth, min_new_tokens=model.depth, prefix_allowed_tokens_fn=allowed,
        decoder_start_token_id=start, output_scores=True, return_dict_in_generate=True,
        early_stopping=True, length_penalty=0.0,
    )
    seqs = out.sequences[:, 1 : 1 + model.depth].reshape(ids.shape[0], beam, model.depth)
    return seqs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_file", default=None)
    parser.add_argument("--dataset", default="genrec-tiny")
    parser.add_argument("--config_files", default=os.path.join(os.path.dirname(__file__), "..", "tests", "tiny.yaml"))
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--beam", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per decoder; the best is kept")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config would read our flags as overrides
    if args.model_file is None:
        files = args.config_files.split() if args.dataset == "genrec-tiny" else None
        result = run_recbole_genrec("TIGER", args.dataset, files, {"epochs": 1, "beam_size": args.beam}, saved=True)
        args.model_file = result["model_file"]
    config, model, data, train_data, valid_data, test_data = load_data_and_model(args.model_file)
    model.eval()
    batches, n = [], 0
    for batch in test_data:
        inter = batch[0]
        take = min(len(inter), args.users - n)
        for start in range(0, take, args.batch):
            batches.append(inter[torch.arange(start, min(start + args.batch, take))])
        n += take
        if n >= args.users:
            break
    trie = dict_trie(model.item_codes[1:])
    code2item = {tuple(row): i + 1 for i, row in enumerate(model.item_codes[1:].tolist())}
    start = model.llm.config.decoder_start_token_id or 0

    def timed(decode):
        decode(batches[0])  # warm-up
        best, out = float("inf"), None
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            out = [decode(b) for b in batches]
            best = min(best, time.perf_counter() - t0)
        return out, best

    with torch.no_grad():
        uncached, t_uncached = timed(lambda b: model.beam_search(b, args.beam, use_cache=False))
        cached, t_ours = timed(lambda b: model.beam_search(b, args.beam, use_cache=True))
        theirs, t_hf = timed(lambda b: hf_generate(model, b, args.beam, trie, start))
    ours = [items for items, _ in cached]
    same_items = all(torch.equal(a[0], c[0]) for a, c in zip(uncached, cached))
    max_diff = max(float((a[1] - c[1]).abs().nan_to_num(0.0).max()) for a, c in zip(uncached, cached))

    overlaps, invalid = [], 0
    for mine, seqs in zip(ours, theirs):
        for row_items, row_seqs in zip(mine, seqs):
            hf_items = []
            for seq in row_seqs.tolist():
                item = code2item.get(tuple(seq))
                invalid += item is None
                if item is not None and item not in hf_items:
                    hf_items.append(item)
            overlaps.append(len(set(row_items[:10].tolist()) & set(hf_items[:10])) / 10)
    users = sum(len(b) for b in batches)
    print(f"TIGER {args.model_file}: {users} test users, beam {args.beam}, batch {args.batch}, "
          f"{model.n_items - 1} items, {torch.get_num_threads()} threads")
    print("| decoder | users/s | time (s) | vs generate | vs uncached |")
    print("|---|---|---|---|---|")
    rows = [("recbole_genrec trie beam search, uncached (re-runs the prefix)", t_uncached),
            ("recbole_genrec trie beam search, KV-cached", t_ours),
            ("transformers generate + prefix_allowed_tokens_fn", t_hf)]
    for name, t in rows:
        print(f"| {name} | {users / t:.1f} | {t:.2f} | {t_hf / t:.2f}x | {t_uncached / t:.2f}x |")
    print(f"cached vs uncached: same items {same_items}, max |score difference| {max_diff:.2e}")
    print(f"top-10 overlap: {sum(overlaps) / len(overlaps):.3f}; invalid sequences from generate: {invalid}")


if __name__ == "__main__":
    main()
