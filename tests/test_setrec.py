"""SETRec: set identifiers, sparse mask, simultaneous generation, grounding, ablations."""

import copy
import os

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.config import Config
from recbole_genrec.model.setrec import SETRec
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec
from recbole_genrec.utils import create_dataset

SMALL = {"n_sem": 2, "cf_hidden_size": 16, "cf_epochs": 1, "setrec_beta_grid": [0.0, 0.5, 1.0]}


def build(tmp_path, **overrides):
    config = Config("SETRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, **overrides})
    init_seed(config["seed"], True)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    init_seed(config["seed"], True)
    model = SETRec(config, train._dataset)
    model.cf_item_emb.normal_(generator=torch.Generator().manual_seed(0))  # stands in for the CF stage
    return model, train, test


def first_batch(loader, n=6):
    batch = next(iter(loader))
    inter = batch[0] if isinstance(batch, tuple) else batch
    return inter[torch.arange(n)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sparse_mask_reaches_the_attention_kernels(tmp_path, attn):
    model, train, _ = build(tmp_path, llm_preset="qwen2-tiny")
    model.llm.set_attn_implementation(attn)
    model.eval()
    batch = first_batch(train)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    tokens = model.item_tokens().detach()
    hist, valid, q = model.history_inputs(seq, length, tokens)
    base = model.decoder_only_states(hist, valid, q)
    u = int(length.argmax())  # the user with the longest history
    assert int(valid[u].sum()) >= 2
    row = int(torch.nonzero(valid[u]).flatten()[-2])  # an item with a later item after it
    perturbed = hist.clone()
    perturbed[u, row * q + 1] += 5.0  # the second token (a semantic token) of that item
    out = model.decoder_only_states(perturbed, valid, q)
    same_item_cf = row * q  # the CF token of the same item may not see its semantic token
    assert torch.allclose(out[u, same_item_cf], base[u, same_item_cf], atol=1e-5)
    assert torch.allclose(out[u, : row * q], base[u, : row * q], atol=1e-5)  # earlier items
    assert not torch.allclose(out[u, (row + 1) * q], base[u, (row + 1) * q], atol=1e-4)  # later item sees it
    assert not torch.allclose(out[u, -1], base[u, -1], atol=1e-4)  # and so do the queries
    others = torch.arange(len(valid)) != u
    assert torch.allclose(out[others], base[others], atol=1e-5)  # other users untouched


@pytest.mark.parametrize("preset", ["t5-tiny", "qwen2-tiny"])
def test_one_forward_pass_yields_every_dimension_and_order_does_not_matter(tmp_path, preset):
    model, train, _ = build(tmp_path, llm_preset=preset)
    model.eval()
    batch = first_batch(train)
    calls = []
    handle = model.llm.register_forward_pre_hook(lambda *a, **k: calls.append(1))
    inner = model.llm.get_decoder() if model.is_encoder_decoder else model.llm.model
    handle2 = inner.register_forward_pre_hook(lambda *a, **k: calls.append(2))
    out = model.generate_tokens(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    handle.remove(), handle2.remove()
    assert out.shape == (6, 1 + model.n_sem, model.queries.shape[1])
    assert calls.count(2) == 1  # a single pass through the generating stack, no autoregressive loop
    # the set identifier is order-agnostic: permuting the tokens inside every item changes nothing
    tokens = model.item_tokens().detach()
    permuted = tokens[:, [2, 0, 1]]
    a = model.generate_tokens(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], tokens)
    b = model.generate_tokens(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], permuted)
    assert torch.allclose(a, b, atol=1e-4)


def test_loss_falls_over_a_few_steps(tmp_path):
    model, train, _ = build(tmp_path)
    batch = next(iter(train))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        gen, rec = model.calculate_loss(batch)
        loss = gen + rec
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]


def test_new_item_is_scored_through_its_text(tmp_path):
    model, train, _ = build(tmp_path)
    model.eval()
    batch = first_batch(train)
    new_text = torch.nn.functional.normalize(torch.randn(2, model.item_text_emb.shape[1]), dim=1)
    with torch.no_grad():
        scores = model.score_items(batch, text_emb=new_text)
        known = model.score_items(batch, text_emb=model.item_text_emb[1:3], cf_emb=model.cf_item_emb[1:3])
        full = model.full_sort_predict(batch)
    assert scores.shape == (6, 2) and torch.isfinite(scores).all()
    assert not torch.allclose(scores[:, 0], scores[:, 1])  # different texts, different scores
    assert torch.allclose(known, full[:, 1:3], atol=1e-5)  # the same grounding as the catalogue


@pytest.mark.parametrize("flag", ["setrec_use_cf", "setrec_use_sem", "setrec_learn_queries", "setrec_sparse_mask"])
def test_every_ablation_changes_the_computation(tmp_path, flag):
    model, train, _ = build(tmp_path, llm_preset="qwen2-tiny")
    ablated, _, _ = build(tmp_path, llm_preset="qwen2-tiny", **{flag: False})
    ablated.load_state_dict(model.state_dict())
    batch = first_batch(train)
    model.eval(), ablated.eval()
    with torch.no_grad():
        a, b = model.full_sort_predict(batch), ablated.full_sort_predict(batch)
    if flag == "setrec_learn_queries":
        assert not ablated.queries.requires_grad and model.queries.requires_grad
        model.train(), ablated.train()
        model.calculate_loss(next(iter(train)))[0].backward()
        ablated.calculate_loss(next(iter(train)))[0].backward()
        assert model.queries.grad is not None and ablated.queries.grad is None
    else:
        assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_setrec_end_to_end_save_reload_and_beta_on_validation(tmp_path):
    result = run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 2}, saved=True)
    assert "ndcg@10" in result["test_result"]
    config, model, data, train, valid, test = load_data_and_model(result["model_file"])
    assert float(model.beta) in SMALL["setrec_beta_grid"]
    _, model2, *_ = load_data_and_model(result["model_file"])
    model.eval(), model2.eval()
    batch = first_batch(test, 8)
    assert torch.equal(model.full_sort_predict(batch), model2.full_sort_predict(batch))


def test_setrec_qwen2_end_to_end(tmp_path):
    result = run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 1, "llm_preset": "qwen2-tiny",
                                 "use_lora": True}, saved=True)
    assert "ndcg@10" in result["test_result"]


def test_warm_cold_protocol_side_by_side(tmp_path):
    from recbole_genrec.quick_start import run_warm_cold

    out = run_warm_cold("SASRec,SETRec", "genrec-tiny", [TINY_YAML],
                        {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 1}, saved=True)
    assert set(out) == {"SASRec", "SETRec"}
    table = open(tmp_path / "compare" / "warm_cold-genrec-tiny.md").read()
    for group in ("all", "warm", "cold"):
        assert f"| {group} |" in table
    assert "ndcg@10" in out["SETRec"]["all"] and "recall@5" in out["SETRec"]["all"]


def test_warm_items_and_subset_loader(tmp_path):
    from recbole_genrec.quick_start import WARM_COLD_EVAL_ARGS, subset_loader, warm_items

    config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"eval_args": WARM_COLD_EVAL_ARGS})
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    warm = warm_items(train._dataset)
    assert warm[train._dataset.inter_feat["item_id"]].all() and not warm[0]
    targets = test._dataset.inter_feat["item_id"]
    cold_rows = ~warm[targets]
    loader = subset_loader(test, ~cold_rows)
    assert len(loader._dataset) == int((~cold_rows).sum())
    assert warm[loader._dataset.inter_feat["item_id"]].all()
    # the split is global in time: every training target precedes every test target
    assert train._dataset.inter_feat["timestamp"].max() <= test._dataset.inter_feat["timestamp"].min()
