"""Reliability (issue 15): pandas-3 data shims, checkpoints that cannot run code, bad input.

Bad input already covered elsewhere (not repeated here):
unknown model name -> ``test_foundation::test_unknown_model_is_a_clear_error``; missing dataset
folder -> ``test_foundation::test_data_path_override_and_clear_error``; ``.item`` missing, a text
field missing, no text at all -> ``test_foundation::test_item_text_errors_name_the_field_and_file``
and ``::test_items_without_text_fall_back_to_their_id``; ``llm_path`` missing / not a model /
unsupported family -> ``test_foundation::test_bad_llm_path_is_a_clear_error``; beam width below
top-k -> ``test_tiger::test_beam_size_below_topk_is_refused``. The tests below run each of them
through ``run_recbole_genrec`` and check that nothing is written to the checkpoint folder.
"""

import logging
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import recbole_genrec  # noqa: F401  (applies the compat shims)
from conftest import ROOT, TINY_YAML
from recbole_genrec.compat import UntrustedCheckpointError, safe_torch_load
from recbole_genrec.config import Config
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec
from recbole_genrec.utils import create_dataset

TINY_DIR = ROOT / "dataset_atomic" / "genrec-tiny"


def _write(folder, name, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)


# ----- A. pandas 3: RecBole data code ---------------------------------------------------------
BENCHMARK_ROWS = {  # user, history, target: item_length must be each row's history length
    "train": ["1\t1\t2", "1\t1 2\t3", "2\t4\t5", "2\t4 5\t6", "3\t1 2 3 4\t5", "3\t2\t3"],
    "valid": ["1\t1 2 3\t4", "2\t4 5 6\t1"],
    "test": ["1\t1 2 3 4\t5", "2\t4 5 6 1\t2", "3\t1 2 3 4 5\t6"],
}


def test_benchmark_files_get_per_row_item_length(tmp_path):
    """``SequentialDataset._benchmark_presets`` (shim 6): pandas 3 gave every row the row count."""
    from recbole.data import data_preparation

    for split, rows in BENCHMARK_ROWS.items():
        _write(tmp_path / "bm", f"bm.{split}.inter",
               "user_id:token\titem_id_list:token_seq\titem_id:token\n" + "\n".join(rows) + "\n")
    config = Config("SASRec", "bm", config_dict={
        "data_path": str(tmp_path), "benchmark_filename": ["train", "valid", "test"], "load_col": None})
    data = create_dataset(config)
    expected = [len(row.split("\t")[1].split()) for split in BENCHMARK_ROWS for row in BENCHMARK_ROWS[split]]
    assert data.inter_feat["item_length"].tolist() == expected
    train, valid, test = data_preparation(config, data)
    assert test._dataset.inter_feat["item_length"].tolist() == [4, 4, 5]
    # histories and targets share one id space (config.py makes item_id_list an alias of item_id)
    assert config["alias_of_item_id"] == ["item_id_list"]
    tokens = data.field2id_token["item_id"]
    assert list(data.field2id_token["item_id_list"]) == list(tokens)
    assert [tokens[i] for i in test._dataset.inter_feat["item_id_list"][2][:5]] == ["1", "2", "3", "4", "5"]
    assert [tokens[i] for i in test._dataset.inter_feat["item_id"]] == ["5", "2", "6"]


@pytest.mark.parametrize("first_linked", [1, 2])
def test_kg_token_seq_alias_of_item_id_is_remapped_per_row(tmp_path, first_linked):
    """``KnowledgeBasedDataset._reset_ent_remapID`` (shim 6) on a ``token_seq`` alias of item_id."""
    folder = tmp_path / "kgd"
    _write(folder, "kgd.inter", "user_id:token\titem_id:token\ttimestamp:float\tprev:token_seq\n" + "".join(
        f"{u}\t{i}\t{u * 10 + i}\t{' '.join(str(j) for j in range(1, i))}\n" for u in range(1, 5) for i in range(1, 5)))
    _write(folder, "kgd.kg", "head_id:token\trelation_id:token\ttail_id:token\n"
           + "".join(f"e{i}\tr{i % 2}\te{i + 1}\n" for i in range(1, 6)))
    _write(folder, "kgd.link", "item_id:token\tentity_id:token\n" + "".join(f"{i}\te{i}\n" for i in range(first_linked, 5)))
    config = Config("CKE", "kgd", config_dict={
        "data_path": str(tmp_path), "alias_of_item_id": ["prev"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp", "prev"], "kg": ["head_id", "relation_id", "tail_id"],
                     "link": ["item_id", "entity_id"]}})
    # every item linked: _reset_ent_remapID's agg(len) raised "Length of values (1) does not match
    # length of index (16)". Item 1 unlinked: _filter_link drops its rows, leaving a gap in the index
    # where RecBole's agg(np.concatenate) (in _remap) raised KeyError: 0
    data = create_dataset(config)
    tokens = data.field2id_token["item_id"]
    items = [int(tokens[i]) for i in data.inter_feat["item_id"].to_numpy()]
    assert sorted(set(items)) == list(range(first_linked, 5))
    for item, prev in zip(items, data.inter_feat["prev"].to_numpy()):
        assert [tokens[i] for i in np.asarray(prev) if i] == [str(j) for j in range(1, item)]


def test_missing_float_values_are_filled_with_the_mean(tmp_path):
    """``Dataset._fill_nan`` (shim 5): pandas 3's chained in-place ``fillna`` left NaN in float fields."""
    _write(tmp_path / "fl", "fl.inter", "user_id:token\titem_id:token\ttimestamp:float\n"
           + "".join(f"{u}\t{i}\t{u * 10 + i}\n" for u in range(1, 4) for i in range(1, 4)))
    _write(tmp_path / "fl", "fl.item", "item_id:token\tprice:float\n1\t2.0\n2\t\n3\t4.0\n")
    config = Config("SASRec", "fl", config_dict={
        "data_path": str(tmp_path), "normalize_all": False,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "price"]}})
    data = create_dataset(config)
    price = {raw: float(data.item_feat["price"][data.field2token_id["item_id"][raw]]) for raw in "123"}
    assert price == {"1": 2.0, "2": 3.0, "3": 4.0}


# ----- B. checkpoints run no code --------------------------------------------------------------
class Foreign:
    """A class a checkpoint of ours never holds."""


class MakesDirOnLoad:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # what a malicious checkpoint does: call something while unpickling
        return (os.makedirs, (self.marker,))


class CallsAModelClass:
    def __reduce__(self):  # an allowed class, but called with arguments instead of rebuilt
        from recbole.model.sequential_recommender.sasrec import SASRec

        return (SASRec, ({}, None))


@pytest.mark.parametrize("payload, culprit", [
    (lambda marker: Foreign(), "test_reliability.Foreign"),
    (lambda marker: MakesDirOnLoad(marker), "os.makedirs"),
    (lambda marker: CallsAModelClass(), "sasrec.SASRec"),
], ids=["foreign-class", "os-makedirs", "model-class-called"])
def test_checkpoint_with_a_foreign_object_is_refused(tmp_path, payload, culprit):
    from recbole.trainer import trainer as recbole_trainer

    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"config": None, "state_dict": {"w": torch.ones(2)}, "extra": payload(marker)}, path,
               pickle_protocol=4)
    for load in (safe_torch_load, recbole_trainer.torch.load, load_data_and_model):  # ours, RecBole's (shim 2)
        with pytest.raises(UntrustedCheckpointError,
                           match=f"{re.escape(str(path))}.*{culprit}.*RECBOLE_GENREC_TRUST_CHECKPOINTS"):
            load(str(path))
    assert not marker.exists()


def test_pickle_that_modifies_an_allowed_class_is_refused():
    import io

    from recbole_genrec.compat import _restricted_unpickler

    # GLOBAL recbole_genrec.config.Config, then BUILD (None, {"abc": 1}): setattr(Config, "abc", 1)
    data = b"\x80\x02crecbole_genrec.config\nConfig\nN}X\x03\x00\x00\x00abcK\x01s\x86b."
    with pytest.raises(UntrustedCheckpointError, match="modifies .*Config.* \\(BUILD\\)"):
        _restricted_unpickler("'crafted'")(io.BytesIO(data)).load()
    assert not hasattr(Config, "abc")


def test_trust_flag_loads_what_the_allow_list_refuses(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"extra": MakesDirOnLoad(marker)}, path)
    monkeypatch.setenv("RECBOLE_GENREC_TRUST_CHECKPOINTS", "1")
    safe_torch_load(str(path))
    assert marker.is_dir()  # the payload is real: the guard is what kept it from running


SMALL = {"TIGER": {"tokenizer_epochs": 2},
         "SETRec": {"n_sem": 2, "cf_hidden_size": 16, "cf_epochs": 1, "setrec_beta_grid": [0.0, 1.0]},
         "TTDS": {"ttds_levels": 2, "ttds_codebook_size": 8, "ttds_suffix_size": 32, "warmup_epochs": 2}}


@pytest.mark.parametrize("model", [
    "SASRec", "TIGER", "SETRec", "TTDS",
])
def test_own_checkpoints_and_stage_files_load_through_the_allow_list(tmp_path, monkeypatch, model):
    loads = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        loads.append((os.path.basename(str(f)), kwargs.get("weights_only"), kwargs.get("pickle_module")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cfg = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1, **SMALL.get(model, {})}
    result = run_recbole_genrec(model, "genrec-tiny", [TINY_YAML], dict(cfg), saved=True)  # evaluate loads the best
    stages = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".pth") and f != os.path.basename(result["model_file"])]
    if model != "SASRec":
        assert stages  # TIGER's tokenizer / SETRec's cf stage file
        run_recbole_genrec(model, "genrec-tiny", [TINY_YAML], dict(cfg), saved=False)  # resumes the stage file
        assert {name for name, *_ in loads} >= set(stages)
    config, loaded, *_ = load_data_and_model(result["model_file"])
    assert config["model"] == model
    checkpoint = safe_torch_load(result["model_file"])
    for key, value in loaded.state_dict().items():
        assert torch.equal(value.cpu(), checkpoint["state_dict"][key].cpu())
    unsafe = [load for load in loads if load[1] is False and load[2] is None]
    assert loads and not unsafe


# ----- C. bad input: a clear error, nothing written --------------------------------------------
def _copy_tiny(tmp_path, item_lines=None, without_item=False):
    folder = tmp_path / "d" / "genrec-tiny"
    shutil.copytree(TINY_DIR, folder)
    if without_item:
        (folder / "genrec-tiny.item").unlink()
    elif item_lines is not None:
        lines = (folder / "genrec-tiny.item").read_text().splitlines()
        (folder / "genrec-tiny.item").write_text("\n".join(item_lines(lines)) + "\n")
    return str(tmp_path / "d")


def _bert(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


BAD_INPUT = {
    "unknown model": ("NoSuchModel", lambda t: {}, ValueError, "NoSuchModel"),
    "dataset folder missing": ("SASRec", lambda t: {"data_path": str(t / "nowhere")}, FileNotFoundError,
                               "genrec-tiny"),
    ".item missing": ("TIGER", lambda t: {"data_path": _copy_tiny(t, without_item=True)}, FileNotFoundError,
                      "genrec-tiny.item"),
    "text field missing": ("TIGER", lambda t: {"item_text_fields": ["movie_title", "plot"]}, KeyError, "plot"),
    "every text empty": ("TIGER", lambda t: {"data_path": _copy_tiny(
        t, item_lines=lambda lines: [lines[0]] + [line.split("\t")[0] + "\t\t\t" for line in lines[1:]])},
        ValueError, "no item has text"),
    "llm_path missing": ("TIGER", lambda t: {"llm_path": str(t / "no-model")}, FileNotFoundError, "llm_path"),
    "llm_path not a model": ("TIGER", lambda t: {"llm_path": str(t)}, FileNotFoundError, "config.json"),
    "llm_path unsupported": ("TIGER", lambda t: {"llm_path": _bert(t)}, ValueError, "supported families"),
    "beam below top-k": ("TIGER", lambda t: {"beam_size": 5, "topk": [10]}, ValueError, "beam_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, case):
    model, extra, error, match = BAD_INPUT[case]
    saved = tmp_path / "saved"
    with pytest.raises(error, match=match):
        run_recbole_genrec(model, "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(saved), **extra(tmp_path)})
    assert not saved.exists() or not os.listdir(saved), os.listdir(saved)


def test_items_missing_from_the_item_file_fall_back_to_their_id_with_a_count(tmp_path, caplog):
    from recbole_genrec.data import load_item_texts

    data_path = _copy_tiny(tmp_path, item_lines=lambda lines: [l for l in lines if not l.startswith(("3\t", "5\t"))])
    config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"data_path": data_path})
    data = create_dataset(config)
    with caplog.at_level(logging.WARNING):
        texts = load_item_texts(config, data)
    assert texts[data.field2token_id["item_id"]["3"]] == "item_id 3"
    assert any("2 of 48 items" in record.getMessage() for record in caplog.records), caplog.text


def test_misspelled_option_warns_with_the_closest_key(tmp_path, caplog, monkeypatch):
    yaml_file = tmp_path / "typo.yaml"
    yaml_file.write_text("rq_level: 2\n")
    monkeypatch.setattr(sys, "argv", ["run", "--beam_sise=10"])
    with caplog.at_level(logging.WARNING):
        Config("TIGER", "genrec-tiny", [TINY_YAML, str(yaml_file)], {"tokenizer_epoch": 3})
    text = caplog.text
    assert "'tokenizer_epoch' (config_dict)" in text and "did you mean 'tokenizer_epochs'" in text
    assert "'rq_level' (config file)" in text and "did you mean 'rq_levels'" in text
    assert "'beam_sise' (command line)" in text and "did you mean 'beam_size'" in text


def test_recbole_and_plugin_options_do_not_warn(caplog):
    legit = {"stopping_step": 2, "MAX_ITEM_LIST_LENGTH": 10, "n_layers": 1, "hidden_dropout_prob": 0.2,
             "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
             "alias_of_item_id": None, "seq_len": None, "enable_amp": False,
             "tokenizer_epochs": 1, "cf_epochs": 1, "warmup_batch_size": 8, "setrec_beta_grid": [0.0],
             "world_size": -1, "nproc": 1, "train_neg_sample_args": None, "save_dataset": False,
             "eval_mask_history": False, "wandb_project": "x", "log_wandb": False}
    with caplog.at_level(logging.WARNING):
        Config("SASRec", "genrec-tiny", [TINY_YAML], legit)
    assert "not an option" not in caplog.text


def test_nan_loss_names_the_stage_and_epoch(tmp_path, monkeypatch):
    """A NaN loss stops the run with the stage and epoch named, in a pre-training stage and in the
    recommender stage, and no stage file or checkpoint is written for the failing stage."""
    import glob

    from recbole_genrec.model.tiger import TIGER
    from recbole_genrec.quick_start import run_recbole_genrec

    original = TIGER.item_text_embeddings

    def nan_text(config, dataset):
        emb = original(config, dataset)
        emb[1:] = float("nan")
        return emb

    monkeypatch.setattr(TIGER, "item_text_embeddings", staticmethod(nan_text))
    with pytest.raises(FloatingPointError, match=r"epoch 1 of the tokenizer stage"):
        run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                           {"checkpoint_dir": str(tmp_path / "a"), "tokenizer_epochs": 2}, saved=True)
    assert not glob.glob(str(tmp_path / "a" / "TIGER-genrec-tiny-tokenizer-*.pth"))
    monkeypatch.undo()

    monkeypatch.setattr(TIGER, "calculate_loss", lambda self, interaction: self.llm.shared.weight.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match=r"stage 'recommender', epoch 0"):
        run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                           {"checkpoint_dir": str(tmp_path / "b"), "tokenizer_epochs": 2}, saved=True)
