"""TokenRec end to end: LightGCN stage, MQ-Tokenizers, prompts, cosine retrieval, faiss, resume."""

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec

SMALL = {"cf_epochs": 2, "mq_book_size": 8, "mq_code_dim": 16, "tokenizer_epochs": 10, "cf_hidden_size": 32,
         "epochs": 2}


@pytest.fixture(scope="module")
def tokenrec_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenrec")
    result = run_recbole_genrec("TokenRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(folder), **SMALL}, saved=True)
    return result, folder


def test_tokenrec_runs_all_stages_and_reports_metrics(tokenrec_run):
    result, _ = tokenrec_run
    assert {"hit@10", "ndcg@10"} <= set(result["test_result"])


def test_faiss_topk_equals_dense_topk_and_reload_reproduces(tokenrec_run):
    result, _ = tokenrec_run
    config, model, data, train, valid, test = load_data_and_model(result["model_file"])
    model.eval()
    batch = next(iter(test))[0]
    with torch.no_grad():
        dense = model.full_sort_predict(batch)
    items, scores = model.retrieve(batch, k=10, index="flat")
    dense_top = dense[:, 1:].topk(10, dim=1)
    assert torch.equal(items, dense_top.indices + 1)
    assert torch.allclose(scores, dense_top.values, atol=1e-5)
    approx, _ = model.retrieve(batch, k=10, index="hnsw")  # the ANN option returns real items
    assert ((approx >= 1) & (approx < model.n_items)).all()
    _, model2, *_ = load_data_and_model(result["model_file"])
    model2.eval()
    with torch.no_grad():
        assert torch.equal(dense, model2.full_sort_predict(batch))
    assert (model.item_codes[1:] < model.book_size).all() and model.user_codes[1:].max() < model.book_size


def test_prompts_hold_user_and_history_tokens(tokenrec_run):
    result, _ = tokenrec_run
    _, model, _, train, _, _ = load_data_and_model(result["model_file"])
    batch = next(iter(train))
    ids, mask = model.prompt_ids(batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    K, L = model.n_books, model.book_size
    user_part = ids[:, :K]
    assert ((user_part >= model.user_offset) & (user_part < model.user_offset + K * L)).all()
    body = ids[:, K:-1][mask[:, K:-1].bool()]
    assert ((body >= model.item_offset) & (body < model.user_offset)).all()
    shuffled, _ = model.prompt_ids(batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], shuffle=True)
    assert torch.equal(ids.sort(1).values, shuffled.sort(1).values)  # the same tokens, order dropped
    model.prompt = "user"
    ids1, _ = model.prompt_ids(batch[model.USER_ID])
    assert ids1.shape[1] == K + 1


def test_tokenrec_stage_resume_skips_finished_stages(tokenrec_run, monkeypatch):
    _, folder = tokenrec_run
    import recbole_genrec.model.tokenrec as module

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(module, "train_general_cf_model", boom)
    monkeypatch.setattr(module, "train_mq_tokenizer", boom)
    result = run_recbole_genrec("TokenRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(folder), **SMALL, "epochs": 1}, saved=False)
    assert "hit@10" in result["test_result"]


def test_tokenrec_decoder_only_backbone(tmp_path):
    result = run_recbole_genrec("TokenRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 1, "llm_preset": "qwen2-tiny"},
                                saved=False)
    assert "ndcg@10" in result["test_result"]


def test_unseen_users_are_kept_out_and_evaluated(tmp_path, monkeypatch):
    import recbole_genrec.model.tokenrec as module
    from recbole_genrec.quick_start import run_unseen_users

    seen_rows = []
    original = module.TokenRec.user_representation

    def spy(self, interaction, shuffle=False):
        if self.training:
            seen_rows.append(self.unseen_users[interaction[self.USER_ID]].any().item())
        return original(self, interaction, shuffle)

    monkeypatch.setattr(module.TokenRec, "user_representation", spy)
    out = run_unseen_users("genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 1},
                           ratio=0.1)
    assert seen_rows and not any(seen_rows)  # no unseen user ever reached the LLM in training
    assert "hit@20" in out["seen"] and "ndcg@20" in out["unseen"]
    table = open(tmp_path / "compare" / "unseen_users-genrec-tiny.md").read()
    assert "| seen |" in table and "| unseen |" in table


def test_unseen_user_gets_tokens_from_refreshed_embeddings_alone(tmp_path):
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_genrec.config import Config
    from recbole_genrec.model.tokenrec import TokenRec
    from recbole_genrec.utils import create_dataset

    config = Config("TokenRec", "genrec-tiny", [TINY_YAML],
                    {"checkpoint_dir": str(tmp_path), **SMALL, "unseen_user_ratio": 0.1})
    init_seed(config["seed"], True)
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = TokenRec(config, train._dataset)
    unseen = model.unseen_users.nonzero().flatten()
    assert len(unseen) == 8  # 10% of 80 users, those with the fewest interactions
    model.train_stage("cf", train, valid, {"epochs": 2, "learning_rate": 2e-3, "batch_size": 2048})
    emb = model.user_emb[unseen]
    assert emb.abs().sum(1).gt(0).all()  # refreshed from their interactions
    model.train_stage("tokenizer", train, valid, {"epochs": 5, "learning_rate": 5e-3, "batch_size": 64})
    # the frozen user tokenizer maps the refreshed embedding to the tokens stored for the user
    assert torch.equal(model.user_tokenizer.tokenize(emb), model.user_codes[unseen])
