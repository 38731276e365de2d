"""recommend(): top-k raw item ids from a checkpoint, for known users and raw histories."""

import os

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.cli import main
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec
from recbole_genrec.recommend import Recommender, recommend


def _train(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp(model.lower())
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run_recbole_genrec(model, "genrec-tiny", [TINY_YAML],
                                    {"checkpoint_dir": str(folder / "saved"), "epochs": 1, "tokenizer_epochs": 5},
                                    saved=True)
    finally:
        os.chdir(cwd)
    return result["model_file"]


@pytest.fixture(scope="module", params=["SASRec", "TIGER"])
def seq_model_file(request, tmp_path_factory):
    return _train(tmp_path_factory, request.param)


@torch.no_grad()
def test_known_users_match_the_test_loader(seq_model_file):
    config, model, dataset, _, _, test_data = load_data_and_model(seq_model_file)
    model.eval()
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch).view(len(batch), -1).clone()
    scores[:, 0] = float("-inf")
    values, indices = torch.topk(scores, 10, dim=1)
    id2user, id2item = dataset.field2id_token["user_id"], dataset.field2id_token["item_id"]
    users = [str(id2user[u]) for u in batch["user_id"].tolist()]

    results = recommend(seq_model_file, user_ids=users, k=10)  # the same rows, the same batch
    assert [r["user"] for r in results] == users
    for b, r in enumerate(results):
        expected = [str(id2item[i]) for i, v in zip(indices[b].tolist(), values[b].tolist()) if v > float("-inf")]
        assert r["items"] == expected and "[PAD]" not in r["items"]
        n = int(batch["item_length"][b])
        assert r["history"] == [str(id2item[i]) for i in batch["item_id_list"][b][:n].tolist()]
        assert len(r["titles"]) == len(r["items"]) and all(r["titles"])  # genrec-tiny: movie_title


def test_unknown_ids_are_named(seq_model_file):
    rec = Recommender.from_checkpoint(seq_model_file)
    with pytest.raises(ValueError, match="unknown user ids.*nobody, ghost"):
        rec.recommend(user_ids=["1", "nobody", "ghost"])
    with pytest.raises(ValueError, match="unknown item ids.*no-such-item"):
        rec.recommend(histories=[["1", "2"], ["3", "no-such-item"]])


def test_unseen_user_history(seq_model_file):
    rec = Recommender.from_checkpoint(seq_model_file)
    known = rec.recommend(user_ids=["1"], k=10)[0]
    unseen = rec.recommend(histories=[known["history"]], k=10)[0]
    assert unseen["user"] is None and unseen["history"] == known["history"]
    assert 0 < len(unseen["items"]) <= 10 and len(set(unseen["items"])) == len(unseen["items"])
    if rec.config["model"] == "SASRec":  # no user field: the same history gives the same list
        assert unseen["items"] == known["items"]
    items = [str(i) for i in range(1, 49)] * 2  # longer than MAX_ITEM_LIST_LENGTH: the last ones are kept
    long = rec.recommend(histories=items, k=5)[0]
    width = rec.config["MAX_ITEM_LIST_LENGTH"]
    assert long["history"] == items[-width:] and len(long["items"]) <= 5
    flagged = rec.recommend(histories=[known["history"]], k=10, exclude_seen=True)[0]
    assert not set(flagged["items"]) & set(known["history"])


def test_cli_prints_a_table(seq_model_file, capsys):
    results = main([f"--recommend={seq_model_file}", "--users=1,2", "--histories=3,4,5", "--k=3"])
    out = capsys.readouterr().out
    assert [r["user"] for r in results] == ["1", "2", None]
    assert "item_id" in out and "history#0" in out and "title" in out
    assert results[0]["items"][0] in out
    plain = main([f"--recommend={seq_model_file}", "--histories=3,4,5", "--k=10"])[0]["items"]
    fresh = main([f"--recommend={seq_model_file}", "--histories=3,4,5", "--k=10", "--exclude_seen"])[0]
    # ten items still (a beam model's beam is widened by the excluded ones), none of the history's
    assert len(fresh["items"]) == 10 and not set(fresh["items"]) & {"3", "4", "5"}
    assert fresh["scores"] == sorted(fresh["scores"], reverse=True)
    if "TIGER" not in seq_model_file:  # every item scored: what is left of the list, in its order
        kept = [i for i in plain if i not in {"3", "4", "5"}]
        assert fresh["items"][:len(kept)] == kept


def test_k_beyond_the_beam_widens_it(seq_model_file):
    """A beam model's list is not cut at its ``beam_size`` (tests/tiny.yaml: 10): the call widens the
    beam to k, and the model keeps its own beam size afterwards."""
    rec = Recommender.from_checkpoint(seq_model_file)
    beam = getattr(rec.model, "beam_size", None)
    top = rec.recommend(user_ids=["1"], k=25)[0]
    assert len(top["items"]) == 25 and len(set(top["items"])) == 25
    assert all(score > float("-inf") for score in top["scores"])
    assert getattr(rec.model, "beam_size", None) == beam
    if beam is None:  # a model that scores every item: the longer list extends the shorter one
        assert top["items"][:10] == rec.recommend(user_ids=["1"], k=10)[0]["items"]


def test_general_model_refuses_histories(tmp_path_factory):
    model_file = _train(tmp_path_factory, "LightGCN")
    rec = Recommender.from_checkpoint(model_file)
    top = rec.recommend(user_ids=["1"], k=5)[0]
    assert len(top["items"]) == 5 and top["history"] is None
    seen = rec.recommend(user_ids=["1"], k=40, exclude_seen=True)[0]["items"]
    inter = rec.train_data._dataset.inter_feat
    uid = rec.dataset.field2token_id["user_id"]["1"]
    train_items = {str(rec.dataset.field2id_token["item_id"][i])
                   for i in inter["item_id"][inter["user_id"] == uid].tolist()}
    assert not set(seen) & train_items
    with pytest.raises(ValueError, match="LightGCN is a general.*sequential model"):
        rec.recommend(histories=[["1", "2"]])
