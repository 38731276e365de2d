"""SETRec: set identifiers, sparse mask, simultaneous generation, grounding, ablations."""

import copy
import os
import time

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


@pytest.mark.parametrize("overrides", [{}, {"setrec_use_cf": False}])
def test_generation_loss_is_the_mean_of_per_dimension_cross_entropy(tmp_path, overrides):
    # Eq. 6 as in the official code (one CrossEntropyLoss(reduction="mean") over all queries' rows)
    model, train, _ = build(tmp_path, alpha=0.0, **overrides)
    model.eval()  # no dropout: both computations see the same generated tokens
    batch = first_batch(train, 16)
    with torch.no_grad():
        gen, rec = model.calculate_loss(batch)
        tokens = model.item_tokens()
        out = model.generate_tokens(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], tokens)
    used = [0, 1, 2] if not overrides else [1, 2]
    target = batch[model.POS_ITEM_ID] - 1
    per_dim = [torch.nn.functional.cross_entropy(out[:, k] @ tokens[1:, k].T, target) for k in used]
    assert float(rec) == 0.0
    assert float(gen) == pytest.approx(float(sum(per_dim)) / len(used), rel=1e-5)


def test_grounding_sums_the_semantic_scores(tmp_path):
    # Eq. 7 as in the official code: weights [1 - beta, beta, ..., beta] on the 1 + n_sem scores
    model, train, _ = build(tmp_path)
    model.eval()
    model.beta.fill_(0.3)
    batch = first_batch(train)
    with torch.no_grad():
        tokens = model.item_tokens()
        out = model.generate_tokens(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], tokens)
        got = model.ground(out, tokens)
    cf = out[:, 0] @ tokens[:, 0].T
    sem = sum(out[:, k] @ tokens[:, k].T for k in range(1, 1 + model.n_sem))
    assert model.n_sem == 2
    assert torch.allclose(got, 0.7 * cf + 0.3 * sem, atol=1e-5)


def test_cold_item_is_scored_through_its_text_alone(tmp_path):
    config = Config("SETRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL})
    init_seed(config["seed"], True)
    train, _, _ = data_preparation(config, create_dataset(config))
    inter = train._dataset.inter_feat
    seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
    in_row = lambda item: (inter["item_id"] == item) | (inter[seq_field] == item).any(1)  # noqa: E731
    counts = torch.stack([in_row(i).sum() for i in range(1, train._dataset.item_num)])
    cold = int(counts.argmin()) + 1  # the rarest item; dropping its rows leaves it unseen in training
    cold_train = train._dataset.copy(inter[(~in_row(cold)).nonzero().flatten()])
    init_seed(config["seed"], True)
    model = SETRec(config, cold_train)
    model.cf_item_emb.normal_(generator=torch.Generator().manual_seed(0))
    warm = int(inter["item_id"][~in_row(cold)][0])
    batch = inter[in_row(cold).nonzero().flatten()[:6]]  # these users' histories contain the cold item
    model.eval()
    with torch.no_grad():
        base = model.full_sort_predict(batch)
        model.cf_item_emb[cold] += 10 * torch.randn(model.cf_item_emb.shape[1])
        model.eval()  # drops the cached catalogue tokens
        after_cold = model.full_sort_predict(batch)
        model.cf_item_emb[warm] += 10 * torch.randn(model.cf_item_emb.shape[1])
        model.eval()
        after_warm = model.full_sort_predict(batch)
    assert torch.equal(after_cold, base)  # the cold item's SASRec row is never read
    assert not torch.allclose(after_warm[:, warm], base[:, warm])  # a warm item's row is
    assert not model.warm_item[cold] and model.warm_item[warm] and not model.warm_item[0]
    assert "warm_item" in model.state_dict()  # saved with the checkpoint


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


def test_setrec_end_to_end_save_reload_and_beta_on_validation(tmp_path, monkeypatch):
    from recbole.trainer import Trainer

    from recbole_genrec.model.setrec import SETRecTrainer
    from recbole_genrec.trainer import StagedTrainer

    # spies: which loader every evaluate() call gets, and in which phase of SETRecTrainer.fit
    phase, seen, calls = ["train"], {}, []
    orig_fit, orig_staged_fit, orig_eval = SETRecTrainer.fit, StagedTrainer.fit, SETRecTrainer.evaluate

    def fit(self, train_data, valid_data=None, *args, **kwargs):
        seen["valid"] = valid_data
        out = orig_fit(self, train_data, valid_data, *args, **kwargs)
        phase[0] = "test"
        return out

    def staged_fit(self, *args, **kwargs):  # SETRecTrainer.fit's super().fit: training proper
        out = orig_staged_fit(self, *args, **kwargs)
        phase[0] = "sweep"
        seen["time before the sweep"] = self.run_train_time_s
        return out

    def evaluate(self, loader, *args, **kwargs):
        out = orig_eval(self, loader, *args, **kwargs)
        calls.append((phase[0], loader, float(self.model.beta), out))
        if phase[0] == "sweep":
            time.sleep(0.5)  # a slow sweep: its time must reach the run's train_time_s
        return out

    monkeypatch.setattr(SETRecTrainer, "fit", fit)
    monkeypatch.setattr(StagedTrainer, "fit", staged_fit)
    monkeypatch.setattr(SETRecTrainer, "evaluate", evaluate)
    grid = SMALL["setrec_beta_grid"]
    result = run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 2,
                                 "setrec_beta": 0.37}, saved=True)  # a default outside the grid
    assert "ndcg@10" in result["test_result"]
    assert result["train_time_s"] >= seen["time before the sweep"] + 0.5 * len(SMALL["setrec_beta_grid"])
    sweep = [c for c in calls if c[0] == "sweep"]
    assert [c[2] for c in sweep] == grid  # the sweep ran over the whole grid ...
    assert all(c[1] is seen["valid"] for c in sweep)  # ... on the validation loader only
    assert [c[0] for c in calls].count("test") == 1 and calls[-1][1] is not seen["valid"]
    config, model, data, train, valid, test = load_data_and_model(result["model_file"])
    chosen = float(model.beta)
    assert chosen in grid
    # recompute the validation scores of every beta with RecBole's plain Trainer
    model.eval()
    scores = []
    for beta in grid:
        model.beta.fill_(beta)
        scores.append(Trainer(config, model).evaluate(valid, load_best_model=False)[config["valid_metric"].lower()])
    assert scores == pytest.approx([c[3][config["valid_metric"].lower()] for c in sweep])
    assert scores[grid.index(chosen)] == max(scores)
    model.beta.fill_(chosen)
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


def test_a_training_step_has_the_same_gradients_on_two_threads(tmp_path):
    """A seed fixes SETRec's result on several threads too: the history's item tokens are gathered
    with index_select (the backward of ``tokens[items]`` summed repeated items in a varying order)."""
    model, train, _ = build(tmp_path, cf_hidden_size=64, n_sem=4)
    batch = next(iter(train))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            model.zero_grad()
            torch.manual_seed(0)  # the same dropout masks
            sum(model.calculate_loss(batch)).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
