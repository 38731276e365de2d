"""The foundation: RecBole on today's stack, entry points, item text, encoder cache, backbones."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import recbole_genrec  # noqa: F401  (applies the compat shims)
from conftest import RENAMED_YAML, ROOT, TINY_YAML
from recbole_genrec.config import Config
from recbole_genrec.quick_start import compare, run_recbole_genrec
from recbole_genrec.utils import create_dataset

RESULT_KEYS = {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}


# ----- compat ------------------------------------------------------------------------------
def test_numpy_aliases_restored_and_config_compatibility_settings_runs():
    assert np.float is float and np.int is int and np.bool is not None
    Config("SASRec", "genrec-tiny", [TINY_YAML]).compatibility_settings()


def test_importing_recbole_models_leaves_autograd_anomaly_detection_off():
    from recbole_genrec.utils import get_model

    get_model("SINE"), get_model("SASRec")  # RecBole's sine.py switches it on at import
    assert not torch.is_anomaly_enabled()


def test_dok_matrix_update_shim_builds_the_matrix():
    a = sp.dok_matrix((3, 4), dtype=np.float32)
    a._update({(0, 1): 1, (2, 3): 1})
    assert a.toarray().tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    with pytest.raises(IndexError):
        a._update({(5, 0): 1})


def test_empty_token_seq_cell_loads_under_pandas3():
    # item 48 of genrec-tiny has an empty genre cell: RecBole's in-place fillna is a no-op there
    config = Config("SASRec", "genrec-tiny", [TINY_YAML],
                    {"load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "class"]}})
    data = create_dataset(config)
    row = data.field2token_id["item_id"]["48"]
    genres = np.asarray(data.item_feat["class"][row])
    assert genres.sum() == 0  # an empty genre list (all padding), not a crash
    assert np.asarray(data.item_feat["class"][data.field2token_id["item_id"]["1"]]).sum() > 0


@pytest.mark.parametrize("setting", [
    {"normalize_all": True},
    {"numerical_features": ["vec"]},
    {"numerical_features": ["vec"], "discretization": {"vec": {"method": "ED", "bucket": 2}}},
])
def test_float_seq_fields_normalize_and_discretize_under_pandas3(tmp_path, setting):
    folder = tmp_path / "fseq"
    folder.mkdir()
    (folder / "fseq.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                       + "".join(f"{u}\t{i}\t{u * 10 + i}\n" for u in range(1, 4) for i in range(1, 4)))
    (folder / "fseq.item").write_text("item_id:token\tvec:float_seq\n1\t1 3\n2\t5\n3\t2 4 9\n")
    config = Config("SASRec", "fseq", config_dict={
        "data_path": str(tmp_path), "normalize_all": False, **setting,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "vec"]}})
    data = create_dataset(config)  # pandas 3 without the shim: a length mismatch while splitting
    rows = {raw: data.item_feat["vec"][data.field2token_id["item_id"][raw]] for raw in "123"}
    if "numerical_features" in setting:  # (ones, values) or (values, buckets) pairs per item
        assert {raw: len(np.asarray(pair[0])) for raw, pair in rows.items()} == {"1": 2, "2": 1, "3": 3}
    else:  # min-max scaled over all elements, each item keeps its own values
        assert np.allclose(rows["3"], [1 / 8, 3 / 8, 1.0]) and np.allclose(rows["2"], [0.5])


def test_checkpoint_reload_weights_only(ckpt):
    """torch >= 2.6 defaults to weights_only=True; RecBole's reload must still work (#2215)."""
    result = run_recbole_genrec("SASRec", "genrec-tiny", [TINY_YAML], {**ckpt, "epochs": 1}, saved=True)
    assert os.path.isfile(result["model_file"])
    assert set(result) >= RESULT_KEYS and "ndcg@10" in result["test_result"]


@pytest.mark.parametrize("model", ["BERT4Rec", "LightGCN"])
def test_recbole_models_run_with_saved_checkpoints(model, ckpt):
    result = run_recbole_genrec(model, "genrec-tiny", [TINY_YAML], {**ckpt, "epochs": 1}, saved=True)
    assert set(result) >= RESULT_KEYS
    assert 0.0 <= result["test_result"]["recall@10"] <= 1.0


def test_lightgcn_on_ml100k_one_epoch(ckpt):
    """ml-100k resolves from RecBole's wheel; LightGCN needs the dok_matrix shim."""
    result = run_recbole_genrec("LightGCN", "ml-100k", config_dict={**ckpt, "epochs": 1, "show_progress": False,
                                                                     "state": "WARNING"})
    assert result["test_result"]["recall@10"] > 0.05  # far above random (10 / 1682)


def test_renamed_fields_configured_by_yaml(ckpt):
    result = run_recbole_genrec("SASRec", "genrec-tiny-renamed", [TINY_YAML, RENAMED_YAML], {**ckpt, "epochs": 1})
    assert "recall@10" in result["test_result"]


# ----- entry points ------------------------------------------------------------------------
def test_plugin_yaml_defaults_win_over_recbole_quick_start(ckpt):
    config = Config("TIGER", "genrec-tiny", [TINY_YAML], ckpt)
    assert config["MAX_ITEM_LIST_LENGTH"] == 20
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE: no sampler
    assert config["item_text_fields"] == ["movie_title", "class"]  # tiny.yaml beats defaults


def test_data_path_override_and_clear_error(tmp_path):
    copy = tmp_path / "mydata"
    shutil.copytree(ROOT / "dataset_atomic" / "genrec-tiny", copy / "genrec-tiny")
    config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"data_path": str(copy)})
    assert config["data_path"] == str(copy / "genrec-tiny")
    with pytest.raises(FileNotFoundError, match="data_path"):
        Config("SASRec", "genrec-tiny", [TINY_YAML], {"data_path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="data_path"):
        Config("SASRec", "no-such-dataset", [TINY_YAML])


def test_ml100k_data_path_is_honoured(tmp_path):
    import recbole

    src = os.path.join(os.path.dirname(recbole.__file__), "dataset_example", "ml-100k")
    shutil.copytree(src, tmp_path / "d" / "ml-100k")
    config = Config("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path / "d")})
    assert config["data_path"] == str(tmp_path / "d" / "ml-100k")


def test_unknown_model_is_a_clear_error():
    from recbole_genrec.utils import get_model

    with pytest.raises(ValueError, match="NoSuchModel"):
        get_model("NoSuchModel")


def test_compare_writes_one_table(tmp_path, ckpt, capsys):
    results = compare("SASRec,LightGCN", "genrec-tiny", [TINY_YAML], {**ckpt, "epochs": 1}, saved=False)
    assert set(results) == {"SASRec", "LightGCN"}
    out_dir = os.path.join(ckpt["checkpoint_dir"], "compare")
    md = open(os.path.join(out_dir, "compare-genrec-tiny.md")).read()
    csv_text = open(os.path.join(out_dir, "compare-genrec-tiny.csv")).read().splitlines()
    assert "| SASRec |" in md and "| LightGCN |" in md and "train_time_s" in md
    assert csv_text[0].startswith("model,") and len(csv_text) == 3
    assert "| LightGCN |" in capsys.readouterr().out


def test_cli_runs_with_overrides(tmp_path):
    cmd = [sys.executable, str(ROOT / "run_recbole_genrec.py"), "--model=LightGCN", "--dataset=genrec-tiny",
           f"--config_files={TINY_YAML}", "--epochs=1", f"--checkpoint_dir={tmp_path / 'cli'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(name.startswith("LightGCN") for name in os.listdir(tmp_path / "cli"))


# ----- item text ---------------------------------------------------------------------------
def _tiny(config_dict=None, yaml=TINY_YAML, name="genrec-tiny"):
    config = Config("SASRec", name, [yaml] if isinstance(yaml, str) else yaml, config_dict or {})
    return config, create_dataset(config)


def test_item_texts_are_raw_strings_keyed_by_internal_id():
    from recbole_genrec.data import load_item_texts

    config, data = _tiny()
    texts = load_item_texts(config, data)
    assert texts[0] == "" and len(texts) == data.item_num
    item = data.field2token_id["item_id"]["1"]
    assert texts[item] == "movie_title: The Star Story; class: Sci-Fi"
    assert texts[data.field2token_id["item_id"]["48"]] == "movie_title: The Demon Chronicles"


def test_item_text_errors_name_the_field_and_file(tmp_path):
    from recbole_genrec.data import load_item_texts

    config, data = _tiny()
    with pytest.raises(KeyError, match="no_such_col"):
        load_item_texts(config, data, fields=["no_such_col"])
    with pytest.raises(ValueError, match="item_text_fields"):
        load_item_texts(config, data, fields=[])
    folder = tmp_path / "d" / "genrec-tiny"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "dataset_atomic" / "genrec-tiny" / "genrec-tiny.inter", folder)
    config, data = _tiny({"data_path": str(tmp_path / "d")})
    with pytest.raises(FileNotFoundError, match="genrec-tiny.item"):
        load_item_texts(config, data)


def test_items_without_text_fall_back_to_their_id(tmp_path):
    from recbole_genrec.data import load_item_texts

    folder = tmp_path / "d" / "genrec-tiny"
    shutil.copytree(ROOT / "dataset_atomic" / "genrec-tiny", folder)
    lines = (folder / "genrec-tiny.item").read_text().splitlines()
    lines = [lines[0]] + [line.split("\t")[0] + "\t\t\t" if line.startswith("3\t") else line for line in lines[1:]]
    (folder / "genrec-tiny.item").write_text("\n".join(lines) + "\n")
    config, data = _tiny({"data_path": str(tmp_path / "d")})
    texts = load_item_texts(config, data)
    assert texts[data.field2token_id["item_id"]["3"]] == "item_id 3"
    (folder / "genrec-tiny.item").write_text(lines[0] + "\n" + "\n".join(f"{i}\t\t\t" for i in range(1, 49)) + "\n")
    with pytest.raises(ValueError, match="no item has text"):
        load_item_texts(config, data)


# ----- text encoder ------------------------------------------------------------------------
def test_ml100k_text_embeddings_computed_once_then_cached(tmp_path, monkeypatch):
    from recbole_genrec.data import TextEncoder, item_text_embeddings, load_item_texts

    config = Config("SASRec", "ml-100k", config_dict={"item_text_fields": ["movie_title", "class"]})
    data = create_dataset(config)
    texts = load_item_texts(config, data)
    emb = item_text_embeddings(texts, str(tmp_path / "cache"), TextEncoder())
    assert emb.shape == (1683, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb[1:], axis=1), 1.0, atol=1e-4) and not emb[0].any()
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".npy")  # no temporary file left behind

    def boom(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(TextEncoder, "encode", boom)
    again = item_text_embeddings(texts, str(tmp_path / "cache"), TextEncoder())
    assert np.array_equal(emb, again)
    # a different text set is a different key, and a failed write leaves nothing behind
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    monkeypatch.setattr(TextEncoder, "encode", lambda self, t, show_progress=False: np.ones((len(t), 4), np.float32))
    with pytest.raises(OSError):
        item_text_embeddings(texts[:10], str(tmp_path / "cache"), TextEncoder())
    assert os.listdir(tmp_path / "cache") == files


def test_text_encoder_path_must_exist(tmp_path):
    from recbole_genrec.data import TextEncoder

    with pytest.raises(FileNotFoundError, match="text_encoder_path"):
        TextEncoder(str(tmp_path / "missing"))


# ----- backbone factory --------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["t5-tiny", "qwen2-tiny", "llama-tiny"])
def test_saved_backbone_loads_back_through_llm_path(preset, tmp_path):
    from recbole_genrec.llm import build_backbone, load_backbone

    torch.manual_seed(0)
    built = build_backbone(preset, vocab_size=64)
    built.model.save_pretrained(tmp_path / preset)
    loaded = load_backbone(str(tmp_path / preset))
    assert loaded.family == built.family
    ids = torch.randint(2, 64, (2, 7))
    kwargs = {"decoder_input_ids": ids[:, :3]} if built.is_encoder_decoder else {}
    built.model.eval(), loaded.model.eval()
    assert torch.allclose(built.model(input_ids=ids, **kwargs).logits, loaded.model(input_ids=ids, **kwargs).logits)


def test_bad_llm_path_is_a_clear_error(tmp_path):
    from transformers import BertConfig, BertModel

    from recbole_genrec.llm import load_backbone

    with pytest.raises(FileNotFoundError, match="llm_path"):
        load_backbone(str(tmp_path / "missing"))
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="supported families"):
        load_backbone(str(tmp_path / "bert"))


@pytest.mark.parametrize("preset", ["t5-tiny", "qwen2-tiny"])
def test_lora_freezes_base_and_trains_new_token_rows(preset):
    from recbole_genrec.llm import add_new_tokens, apply_lora, build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(preset, vocab_size=40)
    start = add_new_tokens(backbone, 8)
    assert start == 40 and backbone.model.get_input_embeddings().weight.shape[0] == 48
    backbone = apply_lora(backbone, trainable_token_ids=range(start, start + 8))
    model = backbone.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    embed = model.get_input_embeddings()
    all_ids = torch.arange(48)
    before = embed(all_ids).detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 48, (4, 6))
    ids[:, 0] = torch.arange(start, start + 4)
    kwargs = {"labels": ids[:, :3].contiguous()} if backbone.is_encoder_decoder else {"labels": ids}
    model(input_ids=ids, **kwargs).loss.backward()
    opt.step()
    after = embed(all_ids).detach()
    changed = (after - before).abs().sum(1) > 0
    assert changed[start:start + 4].all()  # new rows that were used moved
    assert not changed[:start].any()  # base rows are frozen


# ----- distributed (RecBole's DDP path, gloo on CPU) ---------------------------------------------
def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("model, extra", [
    ("SASRec", {}),
    ("TwoLevelLLMRec", {"cf_epochs": 2, "cf_hidden_size": 16}),  # a CF stage each rank trains alone
    ("SETRec", {"cf_epochs": 1, "cf_hidden_size": 16, "n_sem": 2, "setrec_beta_grid": [0.0, 1.0]}),  # DDP CF stage
    ("TIGER", {"tokenizer_epochs": 5}),  # parameters frozen by a stage leave the DDP reducer
])
def test_two_process_ddp_on_cpu(tmp_path, model, extra):
    result = run_recbole_genrec(model, "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1, **extra},
                                nproc=2, port=_free_port())
    assert result is not None and "ndcg@10" in result["test_result"]
    assert os.path.isfile(result["model_file"])  # written by rank 0, read back by both ranks
    assert not list((tmp_path / "saved").glob("*.tmp*"))  # no temporary file left behind
