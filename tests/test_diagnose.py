"""benchmarks/diagnose.py: its recall agrees with RecBole's evaluator, its masked recall with
``eval_mask_history``, and its NLL is a proper likelihood over the catalogue."""

import importlib.util
import math
import os

import pytest
import torch

from conftest import ROOT, TINY_YAML

LOO = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}}


def _diagnose_module():
    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "benchmarks" / "diagnose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(model, tmp_path, **extra):
    from recbole_genrec.quick_start import run_recbole_genrec

    return run_recbole_genrec(model=model, dataset="genrec-tiny", config_file_list=[TINY_YAML],
                              config_dict={"checkpoint_dir": str(tmp_path), "epochs": 1, **LOO, **extra})


def test_diagnose_recall_matches_the_evaluator_with_and_without_history_masking(tmp_path, one_thread):
    plain = _run("SASRec", tmp_path / "plain")
    # one epoch: the same trained weights (same seed; history masking acts at evaluation only, and
    # with one epoch it cannot change which epoch is kept)
    masked = _run("SASRec", tmp_path / "masked", eval_mask_history=True)
    diagnose = _diagnose_module()
    rows = {row["split"]: row for row in diagnose.diagnose(plain["model_file"], train_rows=40)}
    for split, result in (("valid", "best_valid_result"), ("test", "test_result")):
        assert rows[split]["recall@10"] == pytest.approx(plain[result]["recall@10"], abs=6e-5)
        assert rows[split]["recall@10 seen masked"] == pytest.approx(masked[result]["recall@10"], abs=6e-5)
        assert rows[split]["recall@10 seen masked"] != rows[split]["recall@10"]  # the mask matters here
        assert 0 < rows[split]["seen in top-10"] < 1
    assert rows["test"]["rows"] == plain["n_test_users"]
    assert rows["train"]["rows"] == 40
    assert rows["test"]["checkpoint"] == os.path.basename(plain["model_file"])
    # SASRec's NLL: its softmax over the items (padding excluded) at the target
    from recbole_genrec.quick_start import load_data_and_model

    _, model, _, _, _, test_data = load_data_and_model(plain["model_file"])
    model.eval()
    nll = []
    for interaction, *_ in test_data:
        with torch.no_grad():
            logits = model.full_sort_predict(interaction).view(len(interaction), -1)[:, 1:]
        nll.append(-torch.log_softmax(logits, 1).gather(1, interaction["item_id"].unsqueeze(1) - 1))
    assert rows["test"]["NLL"] == pytest.approx(torch.cat(nll).mean().item(), abs=1e-4)


def test_diagnose_nll_is_a_likelihood_over_the_catalogue(tmp_path, one_thread):
    """TIGER's code-sequence likelihoods are renormalised over the items; popularity's NLL is
    that of the training targets' add-one smoothed frequencies, a distribution over the items."""
    result = _run("TIGER", tmp_path, tokenizer_epochs=2)
    diagnose = _diagnose_module()
    rows = {row["split"]: row for row in diagnose.diagnose(result["model_file"], train_rows=30)}
    from recbole_genrec.quick_start import load_data_and_model

    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(result["model_file"])
    model.eval()
    log_probs, targets = [], []
    for interaction, *_ in test_data:
        with torch.no_grad():
            log_probs.append(diagnose._target_log_probs(model, interaction, None))
            every = torch.log_softmax(model.exact_scores(interaction), 1)
        target = interaction[model.ITEM_ID]
        assert log_probs[-1] == pytest.approx(every.gather(1, target.unsqueeze(1)).squeeze(1), abs=1e-5)
        targets.append(target)
    log_probs, targets = torch.cat(log_probs), torch.cat(targets)
    assert rows["test"]["NLL"] == pytest.approx(-log_probs.mean().item(), abs=1e-4)
    pop = diagnose.popularity_log_probs(train_data._dataset, model.n_items)
    assert torch.isneginf(pop[0]) and pop[1:].exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    counts = torch.bincount(train_data._dataset.inter_feat[dataset.iid_field], minlength=model.n_items)[1:]
    assert (pop[1:][counts.argsort()].diff() >= -1e-6).all()  # more frequent, more likely
    assert rows["test"]["pop NLL"] == pytest.approx(-pop[targets].mean().item(), abs=1e-4)
    assert rows["test"]["log n_items"] == pytest.approx(math.log(model.n_items - 1))


def test_diagnose_names_a_general_model_it_cannot_read(tmp_path):
    result = _run("Pop", tmp_path)
    with pytest.raises(ValueError, match="Pop .* is not a sequential model"):
        _diagnose_module().diagnose(result["model_file"])
