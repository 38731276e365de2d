"""Stage files are a cache: keyed by everything that produced them (data, split, code)."""

import glob
import os
import shutil

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import ROOT, TINY_YAML
from recbole_genrec.config import Config
from recbole_genrec.fingerprint import data_fingerprint
from recbole_genrec.quick_start import run_recbole_genrec, run_warm_cold


def test_leave_one_out_then_warm_cold_leave_two_cf_stage_files(tmp_path):
    """A warm/cold run must not reuse a CF stage trained on the leave-one-out split (which saw
    most of the warm/cold test period)."""
    cfg = {"checkpoint_dir": str(tmp_path), "epochs": 1, "cf_epochs": 1}
    run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML], dict(cfg), saved=False)
    run_warm_cold(["SETRec"], "genrec-tiny", [TINY_YAML], dict(cfg), saved=False)
    files = glob.glob(os.path.join(tmp_path, "SETRec-genrec-tiny-cf-*.pth"))
    assert len(files) == 2, files


def test_data_fingerprint_follows_file_content_and_data_settings(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "dataset_atomic" / "genrec-tiny", data / "genrec-tiny")

    def fingerprint(**extra):
        config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"data_path": str(data), **extra})
        return data_fingerprint(config)

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(user_inter_num_interval="[5,inf)") != base  # a filter
    assert fingerprint(eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "mode": "full"}) != base
    inter = data / "genrec-tiny" / "genrec-tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(lines[:-1]) + "\n")  # one interaction less, same file name
    assert fingerprint() != base


def _collected_scores(model, extra, tmp_path):
    from recbole_genrec.quick_start import _prepare

    config, _, trainer, train, valid, test = _prepare(
        model, "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), "epochs": 1, **extra})
    trainer.fit(train, valid, saved=False)
    captured = []
    collect = trainer.eval_collector.eval_batch_collect

    def spy(scores, interaction, positive_u, positive_i):
        captured.append((interaction[config["USER_ID_FIELD"]].clone(), scores.clone()))
        return collect(scores, interaction, positive_u, positive_i)

    trainer.eval_collector.eval_batch_collect = spy
    trainer.evaluate(test, load_best_model=False)
    users = torch.cat([u for u, _ in captured])
    scores = torch.cat([s for _, s in captured])
    history = torch.zeros(scores.shape, dtype=torch.bool)
    for split in (train, valid):
        inter = split._dataset.inter_feat
        uid = inter[config["USER_ID_FIELD"]]
        for u, i in zip(uid.tolist(), inter[config["ITEM_ID_FIELD"]].tolist()):
            history[(users == u).nonzero().flatten(), i] = True
    return scores, history


@pytest.mark.parametrize("model", ["SASRec", "LightGCN", "TwoLevelLLMRec"])
def test_eval_mask_history_masks_every_earlier_item_for_every_model(model, tmp_path):
    extra = {"eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
             "cf_epochs": 1}
    scores, history = _collected_scores(model, {**extra, "eval_mask_history": True}, tmp_path / "on")
    assert history.any(1).all()
    assert torch.isneginf(scores[history]).all()
    if model == "SASRec":  # off by default: RecBole's sequential scores stay RecBole's
        scores, history = _collected_scores(model, extra, tmp_path / "off")
        assert torch.isfinite(scores[history]).all()


def test_a_cf_stage_is_signed_by_the_trainer_settings_it_trains_with(tmp_path, monkeypatch):
    """SETRec's CF stage (RecBole's SASRec) early-stops on the run's patience and trains on the
    run's loader: another patience or batch size must not reuse it (and does reach its trainer);
    the recommender's learning rate, which the stage does not use, must."""
    from recbole.trainer import Trainer

    from recbole_genrec.quick_start import _prepare

    def prepared(**extra):
        return _prepare("SETRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), "cf_epochs": 1, **extra})

    def cf_key(**extra):
        return prepared(**extra)[2]._fingerprint("cf", [])

    base = cf_key(stopping_step=5)
    assert cf_key(stopping_step=5, learning_rate=0.0123) == base
    assert cf_key(stopping_step=10) != base
    assert cf_key(stopping_step=5, train_batch_size=17) != base
    assert cf_key(stopping_step=5, world_size=2) != base  # a distributed stage splits its batches
    seen = []
    real_init = Trainer.__init__

    def spy(self, config, model):
        seen.append((config["model"], config["stopping_step"], config["train_batch_size"]))
        real_init(self, config, model)

    monkeypatch.setattr(Trainer, "__init__", spy)
    _, _, trainer, train, valid, _ = prepared(stopping_step=7, train_batch_size=17)
    trainer.run_stages(train, valid)
    assert ("SASRec", 7, 17) in seen
    assert trainer.model.stage_signature("cf")["stopping_step"] == 7


def test_a_stage_is_kept_when_another_models_code_changes(tmp_path, monkeypatch):
    """Stage files follow the code the model's run executes: an edit of TTDS keeps TIGER's
    tokenizer stage, an edit of TIGER's or the RQ-VAE's file retrains it."""
    from recbole_genrec import fingerprint
    from recbole_genrec.quick_start import _prepare

    _, _, trainer, *_ = _prepare("TIGER", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path)})
    real, before = fingerprint.file_digest, trainer._fingerprint("tokenizer", [])

    def key_after_editing(name):
        monkeypatch.setattr(fingerprint, "file_digest",
                            lambda path: "edited" if path.replace(os.sep, "/").endswith(name) else real(path))
        return trainer._fingerprint("tokenizer", [])

    assert key_after_editing("model/ttds.py") == before
    assert key_after_editing("model/tiger.py") != before
    assert key_after_editing("quantize/rq_vae.py") != before


def test_a_distributed_run_is_another_run(tmp_path):
    """``world_size`` / ``nproc`` change how each batch is split: they are part of the run's
    fingerprint (resume names, run records), unlike paths and logging options."""
    from recbole_genrec.trainer.staged import run_fingerprint

    def key(**extra):
        return run_fingerprint(Config("SASRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **extra}))

    base = key()
    assert key(checkpoint_dir=str(tmp_path / "elsewhere"), show_progress=True) == base
    assert key(world_size=2, nproc=2) != base
