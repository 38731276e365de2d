"""Same seed, same numbers: every model gives bit-identical results for one config (CPU).

For each model two fresh runs (separate ``checkpoint_dir``: every stage trained) and a third run
in the first run's folder (every stage *resumed* from its stage file) must give the same
``best_valid_score``, ``valid_curve`` and full ``test_result`` dict (compared with ``==``, with
``metric_decimal_place: 12`` so that RecBole's 4-digit rounding hides nothing).

What made resumed runs differ, and what keeps them equal:

* A trained stage consumes random draws that a resumed one does not: the global torch / numpy /
  python RNGs (CF model initialisation, dropout, negative sampling) and the shuffling generator of
  the train loader, which a CF stage iterates (``train_cf_model`` trains RecBole's SASRec on the
  caller's loaders). The recommender stage then started from another RNG state: other batch
  orders and dropout masks, another epoch-0 loss. ``StagedTrainer.fit`` reseeds the global RNGs
  (``init_seed(seed + local_rank, reproducibility)``, as ``_prepare`` does before building the
  model) and the loaders' generators (``manual_seed(seed)``, as RecBole's loaders are built) after
  ``run_stages``, so the recommender stage starts from one state whether its stages were trained or
  resumed.
* ``train_cf_model`` reseeds the same way before building the CF model: the CF stage's result no
  longer depends on the draws of the calling model's construction (its LLM backbone, which the
  stage fingerprint does not cover: a stage file written by a ``t5-tiny`` run was reused by a
  ``qwen2-tiny`` run that would have trained another CF model).
* Not a cause: the item text-embedding cache (computing and loading it draw nothing from the
  RNGs, and give the same array), and set iteration order (no set is iterated where order matters).

GPU exceptions (not tested here, the tests force ``use_gpu: False``): RecBole's
``reproducibility: True`` (the default) sets ``cudnn.deterministic`` and turns ``cudnn.benchmark``
off, but does not call ``torch.use_deterministic_algorithms``. CUDA kernels that accumulate
floats with atomics in a run-dependent order: ``index_add_`` (``quantize/kmeans.py`` centroid sums
for LETTER's codeword groups and TwoLevelLLMRec's clusters; ``decoding/two_level_softmax.py``'s
per-cluster partition function), the backward of embedding lookups (every item / code / token
table) and of ``gather`` / advanced indexing (SETRec's ``tokens[items]``, ``index_put_`` with
``accumulate=True``). (``scatter_`` / ``scatter_reduce(amax / amin)`` and ``bincount`` without
weights, also used here, are deterministic.) On CUDA
two runs of one config therefore agree only up to float rounding (differences from about the
7th significant digit that can grow over epochs, and flip ties in a top-k); for bit-identical GPU
runs set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and call ``torch.use_deterministic_algorithms(True)``
(slower; some kernels then raise). CPU runs are bit-identical at one thread. With more threads
they may not be, even at one thread count: on the 2-core AMD EPYC these tests run on (torch's MKL
build), SETRec's resumed run at 2 threads differed from the first in the last bits in 3 runs of 5,
enough to swap two near-tied items inside the top 10 (test ndcg@10 0.08099 vs 0.08042); at
``OMP_NUM_THREADS=1`` 4 runs of 4 were identical. The tests therefore run at one thread.
"""

import glob
import os

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.quick_start import _prepare, run_recbole_genrec
from recbole_genrec.utils import get_model

TTDS_SMALL = {"ttds_levels": 2, "ttds_codebook_size": 8, "ttds_suffix_size": 32, "ttds_code_dim": 16,
              "ttds_tower_hidden": [32], "ttds_text_length": 16, "ttds_text_vocab": 512, "warmup_epochs": 5,
              "ttds_aux_batch": 16}
FAST = {  # each model's fast test settings (tests/test_<model>.py)
    "SASRec": {"epochs": 2},
    "TIGER": {"epochs": 1},
    "LETTER": {"epochs": 1, "cf_epochs": 1, "div_groups": 2},
    "SETRec": {"epochs": 1, "n_sem": 2, "cf_hidden_size": 16, "cf_epochs": 1, "setrec_beta_grid": [0.0, 0.5, 1.0]},
    "TokenRec": {"epochs": 1, "cf_epochs": 2, "mq_book_size": 8, "mq_code_dim": 16, "tokenizer_epochs": 10,
                 "cf_hidden_size": 32},
    "TwoLevelLLMRec": {"epochs": 1, "cf_epochs": 2, "cf_hidden_size": 16, "learning_rate": 0.01},
    "TTDS": {"epochs": 1, **TTDS_SMALL},
}
COMMON = {"use_gpu": False, "metric_decimal_place": 12, "resume_stages": True}


def run(model, folder, **extra):
    return run_recbole_genrec(model, "genrec-tiny", [TINY_YAML],
                              {"checkpoint_dir": str(folder), **COMMON, **FAST[model], **extra}, saved=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identity is a one-thread property on CPU


def numbers(result):
    return result["best_valid_score"], result["valid_curve"], dict(result["test_result"])


def stage_files(model, folder):
    return glob.glob(os.path.join(str(folder), f"{model}-genrec-tiny-*-*.pth"))


@pytest.mark.parametrize("model", list(FAST))
def test_same_seed_same_numbers_whether_stages_are_trained_or_resumed(model, tmp_path, monkeypatch):
    first = run(model, tmp_path / "a")
    fresh = run(model, tmp_path / "b")
    assert numbers(fresh) == numbers(first)
    if model == "SASRec":  # RecBole's own model: no stages
        return
    assert stage_files(model, tmp_path / "a"), "the first run wrote no stage file"

    def refuse(*args, **kwargs):
        raise AssertionError("the stage should have been resumed from its file")

    monkeypatch.setattr(get_model(model), "train_stage", refuse)
    resumed = run(model, tmp_path / "a")
    assert numbers(resumed) == numbers(first)


def test_cf_stage_does_not_depend_on_the_llm_backbone_it_is_not_fingerprinted_by(tmp_path):
    """SETRec's CF stage file is shared by runs with other backbones: its content must not depend on
    the random draws of building them."""
    out = {}
    for preset in ("t5-tiny", "qwen2-tiny"):
        folder = tmp_path / preset
        _, _, trainer, train, valid, _ = _prepare(
            "SETRec", "genrec-tiny", [TINY_YAML],
            {"checkpoint_dir": str(folder), **COMMON, **FAST["SETRec"], "llm_preset": preset})
        trainer.run_stages(train, valid)
        out[preset] = os.path.basename(trainer.stage_files["cf"]), trainer.model.cf_item_emb.clone()
    (name_t5, emb_t5), (name_qwen, emb_qwen) = out["t5-tiny"], out["qwen2-tiny"]
    assert name_t5 == name_qwen  # one fingerprint: a later run resumes the other's file
    assert torch.equal(emb_t5, emb_qwen)


def test_letter_tokenizer_does_not_depend_on_the_backbone_it_is_not_fingerprinted_by(tmp_path):
    """LETTER's tokenizer stage is signed by the seed and its own settings, not by the backbone's
    (LoRA here): its initial weights must not come from the random draws of building that backbone."""
    out = {}
    for use_lora in (False, True):
        _, _, trainer, _, _, _ = _prepare("LETTER", "genrec-tiny", [TINY_YAML],
                                          {"checkpoint_dir": str(tmp_path / str(use_lora)), "use_lora": use_lora})
        out[use_lora] = trainer._fingerprint("tokenizer", []), trainer.model.rq_vae.state_dict()
    (key_full, rq_full), (key_lora, rq_lora) = out[False], out[True]
    assert key_full == key_lora  # one tokenizer stage file for both
    assert rq_full.keys() == rq_lora.keys() and all(torch.equal(rq_full[k], rq_lora[k]) for k in rq_full)
