"""Where SETRec's one-pass inference stands against a bare backbone pass, input length separated out.

    python benchmarks/setrec_single_pass.py [--users 512] [--batch 128] [--repeats 7]

``benchmarks/inference_latency.py`` compares SETRec with one bare pass of the same T5 (encoder + one
decoder step) on TIGER's inputs: 20 history items x 4 codes + ``</s>`` = 81 tokens. SETRec's
encoder reads 20 items x (1 CF + ``n_sem`` = 4 semantic) = 100 tokens. This script adds the same
bare pass on inputs as long as SETRec's (the same users, 5 tokens per item, SETRec's padding), so
that SETRec's own overhead (query decoder, grounding against the catalogue) is told apart from the
cost of its longer input. Rows marked "HF sdpa" run the T5 on transformers' stock ``sdpa``
attention (before ``recbole_genrec.llm.backbone.use_t5_attention``); "per-dimension grounding" is
``SETRec.ground`` (``[B, Q, N]`` scores summed) instead of the cached one-product
``ground_catalogue``. Every method is timed once per round, ``--repeats`` rounds, fastest round kept
(shared machine). Models are untrained (latency does not depend on training); TIGER's item codes
come from its tokenizer stage (``--tokenizer_epochs``, cached under ``checkpoint_dir``).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inference_latency import common_arguments, test_batches  # noqa: E402

from recbole_genrec.llm.backbone import T5_ATTENTION  # noqa: E402
from recbole_genrec.quick_start import _prepare  # noqa: E402


def main():
    parser = common_arguments(argparse.ArgumentParser())
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    files = args.config_files.split() if args.config_files else None
    common = {"llm_preset": "t5-tiny", "state": "WARNING", "show_progress": False, "eval_batch_size": args.batch}
    _, _, tiger_trainer, _, _, test_data = _prepare(
        "TIGER", args.dataset, files, {**common, "tokenizer_epochs": args.tokenizer_epochs})
    tiger = tiger_trainer.model.eval()
    tiger_trainer.run_stages(None)
    _, _, setrec_trainer, _, _, _ = _prepare("SETRec", args.dataset, files, common)
    setrec = setrec_trainer.model.eval()
    setrec.cf_item_emb.normal_(generator=torch.Generator().manual_seed(0))
    batches = test_batches(test_data, args.users, args.batch)
    users = sum(len(b) for b in batches)
    q = setrec.n_query

    def bare(batch):  # inference_latency.py's bare pass: encoder + one decoder step on TIGER's inputs
        ids, mask = tiger.model_inputs(batch)
        start = torch.zeros(len(ids), 1, dtype=torch.long)
        tiger.llm(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=False)

    def bare_setrec_length(batch):  # the same pass on 20 items x 5 tokens with SETRec's padding
        items, valid = setrec.last_items(batch[setrec.ITEM_SEQ], batch[setrec.ITEM_SEQ_LEN], setrec.history)
        codes = tiger.item_codes[items]
        ids = torch.cat([codes, codes[:, :, : q - codes.shape[2]]], 2).reshape(len(items), -1)
        mask = valid.repeat_interleave(q, 1).long()
        start = torch.zeros(len(ids), 1, dtype=torch.long)
        tiger.llm(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=False)

    def setrec_before(batch):  # HF sdpa + per-dimension grounding
        scores = setrec.ground(setrec.generate_tokens(batch[setrec.ITEM_SEQ], batch[setrec.ITEM_SEQ_LEN],
                                                      setrec.catalogue_tokens()), setrec.catalogue_tokens())
        scores[:, 0] = float("-inf")
        return scores

    def on(model, attention, fn):
        def run(batch):
            model.llm.set_attn_implementation(attention)
            try:
                return fn(batch)
            finally:
                model.llm.set_attn_implementation(T5_ATTENTION)
        return run

    methods = {
        "bare pass, TIGER's inputs (inference_latency.py)": bare,
        "bare pass, SETRec's input length": bare_setrec_length,
        "SETRec (one pass, all items scored)": setrec.full_sort_predict,
        "bare pass, TIGER's inputs, HF sdpa": on(tiger, "sdpa", bare),
        "bare pass, SETRec's input length, HF sdpa": on(tiger, "sdpa", bare_setrec_length),
        "SETRec, HF sdpa, per-dimension grounding (before)": on(setrec, "sdpa", setrec_before),
    }
    seconds = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():
            fn(batches[0])  # warm-up (and the eval caches)
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                for b in batches:
                    fn(b)
                seconds[name].append(time.perf_counter() - start)
    best = {name: min(v) for name, v in seconds.items()}
    lengths = (tiger.model_inputs(batches[0])[0].shape[1], setrec.history * q)
    print(f"{args.dataset}: {users} test users, batch {args.batch}, t5-tiny, {setrec.n_items - 1} items, "
          f"{torch.get_num_threads()} threads, best of {args.repeats} rounds; input tokens: TIGER {lengths[0]} "
          f"(first batch), SETRec {lengths[1]}")
    print("| method | ms / user | x bare pass (TIGER's inputs) | x bare pass (SETRec's length) |")
    print("|---|---|---|---|")
    pairs = [(name, "bare pass, TIGER's inputs" + (", HF sdpa" if "HF sdpa" in name else " (inference_latency.py)"),
              "bare pass, SETRec's input length" + (", HF sdpa" if "HF sdpa" in name else "")) for name in methods]
    for name, short, long_ in pairs:
        print(f"| {name} | {1000 * best[name] / users:.3f} | {best[name] / best[short]:.2f} | "
              f"{best[name] / best[long_]:.2f} |")


if __name__ == "__main__":
    main()
