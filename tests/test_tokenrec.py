"""TokenRec end to end: LightGCN stage, MQ-Tokenizers, prompts, cosine retrieval, faiss, resume."""

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML, save_word_backbone, split_words
from recbole_genrec.config import Config
from recbole_genrec.model.tokenrec import TokenRec
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec
from recbole_genrec.utils import create_dataset

SMALL = {"cf_epochs": 2, "mq_book_size": 8, "mq_code_dim": 16, "tokenizer_epochs": 10, "cf_hidden_size": 32,
         "epochs": 2}
CF_STAGE = {"epochs": 2, "learning_rate": 2e-3, "batch_size": 2048}


def build(tmp_path, **overrides):
    """A TokenRec with no stage run, its loaders."""
    config = Config("TokenRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, **overrides})
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], True)
    return TokenRec(config, train._dataset), train, valid, test


def random_codes(model):
    """Distinct codes for every user and item (as if the tokenizer stage had run)."""
    g = torch.Generator().manual_seed(0)
    model.item_codes[1:] = torch.randint(model.book_size, model.item_codes[1:].shape, generator=g)
    model.user_codes[1:] = torch.randint(model.book_size, model.user_codes[1:].shape, generator=g)


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
    # early stopping (LightGCN stage and recommender) must not see the unseen users' validation items
    import recbole_genrec.model.base as base
    from recbole_genrec.trainer import StagedTrainer

    valid_users = {}
    fit_best, fit = base._fit_best, StagedTrainer.fit

    def spy_fit_best(config, cf_config, cf_model, train_data, valid_data, show_progress):
        valid_users["cf"] = valid_data._dataset.inter_feat[valid_data._dataset.uid_field]
        return fit_best(config, cf_config, cf_model, train_data, valid_data, show_progress)

    def spy_fit(self, train_data, valid_data=None, *args, **kwargs):
        valid_users["recommender"] = valid_data._dataset.inter_feat[valid_data._dataset.uid_field]
        valid_users["unseen"] = self.model.unseen_users.cpu()
        return fit(self, train_data, valid_data, *args, **kwargs)

    monkeypatch.setattr(base, "_fit_best", spy_fit_best)
    monkeypatch.setattr(StagedTrainer, "fit", spy_fit)
    out = run_unseen_users("genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, "epochs": 1},
                           ratio=0.1)
    assert seen_rows and not any(seen_rows)  # no unseen user ever reached the LLM in training
    unseen = valid_users["unseen"]
    for stage in ("cf", "recommender"):
        users = valid_users[stage]
        assert len(users) == unseen[1:].logical_not().sum() and not unseen[users].any(), stage
    assert "hit@20" in out["seen"] and "ndcg@20" in out["unseen"]
    table = open(tmp_path / "compare" / "unseen_users-genrec-tiny.md").read()
    assert "| seen |" in table and "| unseen |" in table


def test_unseen_user_embeddings_are_lightgcn_propagations_of_their_items(tmp_path, monkeypatch):
    import recbole_genrec.model.tokenrec as module

    trained = {}
    original = module.train_general_cf_model

    def spy(*args, **kwargs):
        trained["cf"], _, trained["full"] = out = original(*args, **kwargs)
        return out

    monkeypatch.setattr(module, "train_general_cf_model", spy)
    model, train, valid, _ = build(tmp_path, unseen_user_ratio=0.1)
    unseen = model.unseen_users.nonzero().flatten()
    assert len(unseen) == 8  # 10% of 80 users, those with the fewest interactions
    model.train_stage("cf", train, valid, CF_STAGE)
    cf, full = trained["cf"], trained["full"]
    # independent LightGCN (He et al. 2020, Eq. 7-8): layer 0 of an unseen user = the mean of its items'
    # layer-0 rows; symmetric-normalised propagation over the full training graph; mean over layers
    n_users = model.n_users
    uid, iid = full.inter_feat[full.uid_field], full.inter_feat[full.iid_field]
    adj = torch.zeros(n_users + model.n_items, n_users + model.n_items, dtype=torch.float64)
    adj[uid, n_users + iid] = adj[n_users + iid, uid] = 1.0
    d = adj.sum(1).pow(-0.5).nan_to_num(posinf=0.0)
    adj = d[:, None] * adj * d[None, :]
    users, items = cf.user_embedding.weight.detach().double().clone(), cf.item_embedding.weight.detach().double()
    for u in unseen.tolist():
        users[u] = items[iid[uid == u]].mean(0)
    layers = [torch.cat([users, items])]
    for _ in range(cf.n_layers):
        layers.append(adj @ layers[-1])
    expected = torch.stack(layers).mean(0)[unseen]
    assert torch.allclose(model.user_emb[unseen].double(), expected, atol=1e-5)
    with torch.no_grad():
        untrained = cf.forward()[0][unseen]  # their (never trained) init rows: what a no-op refresh leaves
    assert (model.user_emb[unseen] - untrained).abs().amax(1).gt(1e-3).all()
    seen = ~model.unseen_users
    assert torch.equal(model.user_emb[seen], cf.forward()[0][seen].detach())  # seen users untouched
    model.train_stage("tokenizer", train, valid, {"epochs": 5, "learning_rate": 5e-3, "batch_size": 64})
    assert torch.equal(model.user_tokenizer.tokenize(model.user_emb[unseen]), model.user_codes[unseen])


def test_train_and_eval_prompts_share_one_layout(tmp_path, monkeypatch):
    model, train, _, _ = build(tmp_path)
    random_codes(model)
    batch = next(iter(train))
    args = (batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    assert (args[2] < model.max_seq_length).any() and (args[2] > 2).any()  # pads and something to shuffle
    eval_ids, eval_mask = model.prompt_ids(*args)
    with monkeypatch.context() as m:  # identity permutation: the training prompt is the evaluation prompt
        m.setattr(model, "shuffle_keys", lambda shape, device: (torch.arange(shape[1]) / shape[1]).expand(shape))
        ids, mask = model.prompt_ids(*args, shuffle=True)
    assert torch.equal(ids, eval_ids) and torch.equal(mask, eval_mask)
    ids, mask = model.prompt_ids(*args, shuffle=True)
    assert torch.equal(mask, eval_mask) and torch.equal(ids == model.pad_id, eval_ids == model.pad_id)
    K = model.n_books
    groups = lambda t: [sorted(map(tuple, row.view(-1, K).tolist())) for row in t[:, K:-1]]  # noqa: E731
    assert groups(ids) == groups(eval_ids)  # the same items (whole K-token groups), only their order differs
    assert torch.equal(ids[:, :K], eval_ids[:, :K]) and (ids[:, -1] == model.eos_id).all()
    assert not torch.equal(ids, eval_ids)


def lightgcn_checkpoint(tmp_path, model):
    """A LightGCN trained one epoch by RecBole, saved in RecBole's checkpoint layout (config, state_dict)."""
    from recbole_genrec.model.base import train_general_cf_model

    cf, _, _ = train_general_cf_model(model.config, model.id_tokens, "LightGCN", epochs=1,
                                      overrides={"embedding_size": model.cf_dim})
    path = tmp_path / "LightGCN-genrec-tiny.pth"
    torch.save({"config": cf.cf_config, "epoch": 0, "state_dict": cf.state_dict()}, path)
    return path, cf


def test_cf_model_path_gives_propagated_lightgcn_embeddings(tmp_path):
    model, train, valid, _ = build(tmp_path)
    path, cf = lightgcn_checkpoint(tmp_path, model)
    loaded, *_ = build(tmp_path, cf_model_path=str(path))
    loaded.train_stage("cf", train, valid, CF_STAGE)
    with torch.no_grad():
        users, items = cf.forward()  # what a LightGCN trained as stage 'cf' gives
    assert torch.allclose(loaded.user_emb, users, atol=1e-6) and torch.allclose(loaded.item_emb, items, atol=1e-6)


def test_cf_model_path_checks_user_item_counts_and_ids(tmp_path):
    model, train, valid, _ = build(tmp_path)
    path, cf = lightgcn_checkpoint(tmp_path, model)
    state = cf.state_dict()
    short = tmp_path / "short.pth"
    torch.save({"config": cf.cf_config, "state_dict": {**state, "user_embedding.weight": state["user_embedding.weight"][:-1]}},
               short)
    with pytest.raises(ValueError, match="cf_model_path .*short.pth.* users"):
        build(tmp_path, cf_model_path=str(short))[0].train_stage("cf", train, valid, CF_STAGE)
    uid = model.USER_ID
    other = tmp_path / "other_ids.pth"
    torch.save({"config": cf.cf_config, "state_dict": state,
                "field2id_token": {uid: list(reversed(model.id_tokens[uid]))}}, other)
    with pytest.raises(ValueError, match=f"cf_model_path .*other_ids.pth.*{uid} ids differ"):
        build(tmp_path, cf_model_path=str(other))[0].train_stage("cf", train, valid, CF_STAGE)


def test_cf_model_path_refuses_unseen_users(tmp_path):
    with pytest.raises(ValueError, match="unseen_user_ratio.*cf_model_path"):
        build(tmp_path, cf_model_path=str(tmp_path / "LightGCN.pth"), unseen_user_ratio=0.1)


def tokenizer_backbone(tmp_path, preset="t5-tiny"):
    """``llm_path``: a tiny ``preset`` model and a word-level tokenizer knowing every template word."""
    from recbole_genrec.model.tokenrec import TRAIN_TEMPLATES, UNSEEN_TEMPLATE, USER_TEMPLATE

    words = ["<pad>", "</s>", "<unk>", "user_", "item_", ","]
    for template in (*TRAIN_TEMPLATES, UNSEEN_TEMPLATE, USER_TEMPLATE):
        words += [w for w in split_words(template.format(user="user_", items="item_")) if w not in words]
    path = save_word_backbone(tmp_path / preset, preset, words, eos="</s>")
    return path, words, split_words


def test_text_templates_interleave_tokenizer_words_and_code_tokens_with_llm_path(tmp_path):
    from recbole_genrec.model.tokenrec import SEEN_TEMPLATE, TRAIN_TEMPLATES, UNSEEN_TEMPLATE, USER_TEMPLATE

    path, words, split = tokenizer_backbone(tmp_path)
    model, train, _, _ = build(tmp_path, llm_path=str(path))
    assert model.item_offset == len(words)  # code tokens come after the tokenizer's words
    random_codes(model)
    batch = next(iter(train))[torch.arange(32)]
    users, seq, length = batch[model.USER_ID], batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    K, user_word, item_word = model.n_books, words.index("user_"), words.index("item_")

    def check(ids, mask, templates, shuffled=False):
        assert (ids[:, -1] == model.eos_id).all() and (mask.sum(1) < mask.shape[1]).any()  # left-padded
        for b in range(len(users)):
            row = ids[b][mask[b].bool()].tolist()[:-1]
            n = int(length[b].clamp(max=model.max_seq_length))
            text = [words[t] for t in row if t < model.item_offset]
            assert any(text == split(t.format(user="user_", items=", ".join(["item_"] * n))) for t in templates)
            u = row.index(user_word)
            assert row[u + 1:u + 1 + K] == model.user_tokens(users[b]).tolist()
            history = model.item_tokens(seq[b, length[b] - n:length[b]]).tolist()
            got = [row[i + 1:i + 1 + K] for i, t in enumerate(row) if t == item_word]
            assert (sorted(got) == sorted(history)) if shuffled else (got == history)
            assert len(row) == len(text) + K * (n + 1)  # nothing but words and code tokens

    model.eval()
    check(*model.prompt_ids(users, seq, length), [SEEN_TEMPLATE])
    model.train()
    check(*model.prompt_ids(users, seq, length, shuffle=True), TRAIN_TEMPLATES, shuffled=True)
    from transformers import AutoTokenizer

    model._build_templates(AutoTokenizer.from_pretrained(path), "unseen")
    check(*model.prompt_ids(users, seq, length), [UNSEEN_TEMPLATE])
    model.prompt = "user"
    model._build_templates(AutoTokenizer.from_pretrained(path), "seen")
    ids, mask = model.prompt_ids(users)
    text = [words[t] for t in ids[0][mask[0].bool()].tolist()[:-1] if t < model.item_offset]
    assert text == split(USER_TEMPLATE.format(user="user_"))
    model.prompt = "user_history"
    model._build_templates(AutoTokenizer.from_pretrained(path), "seen")
    model.item_emb.normal_()
    model.calculate_loss(batch).backward()  # the text prompt goes through the backbone
    assert model.llm.get_input_embeddings().weight.grad[user_word].abs().sum() > 0


def test_the_cf_stage_gets_its_own_patience_and_the_runs_metrics(tmp_path, monkeypatch):
    """LightGCN (stage cf) is trained by RecBole's trainer with ``cf_stopping_step`` as its patience
    and the run's ``valid_metric``, metrics and top-k; another patience is another stage file."""
    from recbole.trainer import Trainer

    from recbole_genrec.quick_start import _prepare

    def prepared(**extra):
        return _prepare("TokenRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, **extra})

    assert prepared(cf_stopping_step=3)[2]._fingerprint("cf", []) != prepared(cf_stopping_step=4)[2]._fingerprint("cf", [])
    seen = []
    real_init = Trainer.__init__

    def spy(self, config, model):
        seen.append((config["model"], config["stopping_step"], config["valid_metric"], config["topk"], config["epochs"]))
        real_init(self, config, model)

    monkeypatch.setattr(Trainer, "__init__", spy)
    model = build(tmp_path, cf_stopping_step=3, valid_metric="Recall@10", topk=[3, 10])[0]
    model.train_stage("cf", None, None, CF_STAGE)
    assert seen == [("LightGCN", 3, "Recall@10", [3, 10], 2)]


@pytest.mark.parametrize("loss", ["cosine", "softmax"])
def test_each_loss_is_its_formula_and_trains_the_projection(tmp_path, loss):
    """``cosine`` is Eq. 20 with the sampled negative and margin gamma; ``softmax`` (our departure)
    is a cross-entropy over every item's Eq. 19 cosine / tau, the sampled negative unused. Both
    reach the projection MLP, and a few steps on one batch lower them."""
    import torch.nn.functional as F

    model, train, *_ = build(tmp_path, tokenrec_loss=loss, tokenrec_tau=0.2, gamma=0.1)
    random_codes(model)
    model.item_emb.copy_(torch.randn(model.item_emb.shape, generator=torch.Generator().manual_seed(1)))
    model.eval()  # no dropout, no history shuffle: the same z in both computations
    batch = next(iter(train))
    value = model.calculate_loss(batch)
    z = model.user_representation(batch)
    target, negative = batch[model.POS_ITEM_ID], batch[model.NEG_ITEM_ID]
    if loss == "softmax":
        cos = F.normalize(z, dim=-1) @ F.normalize(model.item_emb[1:], dim=-1).T  # items 1..n, no padding
        expected = F.cross_entropy(cos / 0.2, target - 1)
    else:
        pos = F.cosine_similarity(z, model.item_emb[target], dim=-1)
        neg = F.cosine_similarity(z, model.item_emb[negative], dim=-1)
        expected = (1 - pos).mean() + (neg - 0.1).clamp(min=0).mean()
    assert torch.allclose(value, expected, atol=1e-5)
    value.backward()
    assert model.proj[0].weight.grad.abs().sum() > 0
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    assert model.calculate_loss(batch).item() < value.item() - 0.05


def test_a_bad_loss_option_names_itself(tmp_path):
    with pytest.raises(ValueError, match="tokenrec_loss"):
        build(tmp_path, tokenrec_loss="hinge")
    with pytest.raises(ValueError, match="tokenrec_tau"):
        build(tmp_path, tokenrec_loss="softmax", tokenrec_tau=0)
    for tau in (True, float("inf")):  # (a string from the command line or config_dict is evaluated by RecBole)
        with pytest.raises(ValueError, match="tokenrec_tau"):
            build(tmp_path, tokenrec_loss="softmax", tokenrec_tau=tau)


WARM_COLD_SPLIT = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}


def test_users_without_training_interactions_get_codes_from_their_history(tmp_path, monkeypatch):
    import recbole_genrec.model.tokenrec as module

    graph = {}
    train_cf, fit = module.train_general_cf_model, module.train_mq_tokenizer

    def spy_cf(*args, **kwargs):
        out = train_cf(*args, **kwargs)
        graph["full"] = out[2]
        return out

    fitted = {}
    monkeypatch.setattr(module, "train_general_cf_model", spy_cf)
    monkeypatch.setattr(module, "train_mq_tokenizer",
                        lambda tok, x, name, **kw: (fitted.__setitem__(name, x.clone()), fit(tok, x, name=name, **kw))[1])
    model, train, valid, test = build(tmp_path, eval_args=WARM_COLD_SPLIT)
    model.trained_users.zero_()  # (the sequential split's users: here the same set; the stage must set it)
    model.train_stage("cf", train, valid, CF_STAGE)
    # trained: an edge in the graph LightGCN propagated over (its own training split)
    full = graph["full"]
    degree = torch.bincount(full.inter_feat[full.uid_field], minlength=model.n_users)
    new = (degree == 0) & (torch.arange(model.n_users) > 0)
    assert torch.equal(model.trained_users, ~new & (torch.arange(model.n_users) > 0)) and new.sum() > 5
    assert new[test._dataset.inter_feat[model.USER_ID]].any()  # the warm/cold test period holds such users
    # the paper's unseen users are picked among users with training interactions only
    counts = torch.bincount(train._dataset.inter_feat[model.USER_ID], minlength=model.n_users)
    assert (counts[TokenRec.fewest_interaction_users(train._dataset, 0.1)] > 0).all()
    # the user MQ-Tokenizer is fitted on the trained users' LightGCN vectors only
    model.train_stage("tokenizer", train, valid, {"epochs": 5, "learning_rate": 5e-3, "batch_size": 64})
    assert torch.equal(fitted["user MQ-Tokenizer"], model.user_emb[model.trained_users])
    tokenize = model.user_tokenizer.tokenize
    average = tokenize(model.user_emb[model.trained_users].mean(0, keepdim=True))[0]
    assert (model.user_codes[new] == average).all()  # stored codes: the trained users' mean vector
    assert torch.equal(model.user_codes[~new][1:], tokenize(model.user_emb[~new][1:]))
    # in a prompt, each new user's codes tokenize the mean vector of its own history items; a trained
    # user keeps its own
    (u_new, v_new), u_old = new.nonzero().flatten()[:2].tolist(), int((~new).nonzero()[1])
    K, L = model.n_books, model.book_size
    offsets = model.user_offset + torch.arange(K) * L
    histories = ([3, 5, 8], [10, 2], [4, 6, 7, 9])
    users = torch.tensor([u_new, v_new, u_old])
    seq = torch.zeros(3, model.max_seq_length, dtype=torch.long)
    for row, history in enumerate(histories):
        seq[row, :len(history)] = torch.tensor(history)
    length = torch.tensor([len(h) for h in histories])
    expected = [tokenize(model.item_emb[h].mean(0, keepdim=True))[0] for h in histories[:2]]
    assert any(not torch.equal(e, average) for e in expected)  # the history, not the stored codes, decides
    ids, _ = model.prompt_ids(users, seq, length)
    assert torch.equal(ids[0, :K], offsets + expected[0]) and torch.equal(ids[1, :K], offsets + expected[1])
    assert torch.equal(ids[2, :K], offsets + model.user_codes[u_old])
    model.prompt = "user"  # prompt 1 has no history: the stored codes
    ids, _ = model.prompt_ids(torch.tensor([u_new]))
    assert torch.equal(ids[0, :K], offsets + average)
    # a reload keeps the stage's set of trained users; a checkpoint from before it was stored loads
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.trained_users.fill_(True)
    model.load_state_dict(state)
    assert torch.equal(model.trained_users, ~new & (torch.arange(model.n_users) > 0))
    model.load_state_dict({k: v for k, v in state.items() if k != "trained_users"})


def test_text_prompts_give_new_users_their_history_codes(tmp_path):
    path, words, _ = tokenizer_backbone(tmp_path)
    model, train, _, _ = build(tmp_path, llm_path=str(path), eval_args=WARM_COLD_SPLIT)
    random_codes(model)
    model.item_emb.normal_(generator=torch.Generator().manual_seed(1))
    model.user_tokenizer.eval()
    new = ~model.trained_users
    new[0] = False
    u_new, u_old = int(new.nonzero()[0]), int((~new).nonzero()[1])
    seq = torch.zeros(2, model.max_seq_length, dtype=torch.long)
    seq[:, :3] = torch.tensor([3, 5, 8])
    ids, mask = model.prompt_ids(torch.tensor([u_new, u_old]), seq, torch.tensor([3, 3]))
    K, user_word = model.n_books, words.index("user_")
    expected = model.user_tokens(torch.tensor([u_new, u_old]), *model.last_items(seq, torch.tensor([3, 3]), model.max_seq_length))
    for b in range(2):
        row = ids[b][mask[b].bool()].tolist()
        u = row.index(user_word)
        assert row[u + 1:u + 1 + K] == expected[b].tolist()
    history_codes = model.user_tokenizer.tokenize(model.item_emb[[3, 5, 8]].mean(0, keepdim=True))[0]
    assert torch.equal(expected[0] - model.user_offset - torch.arange(K) * model.book_size, history_codes)
    assert not torch.equal(history_codes, model.user_codes[u_new])  # (so the check above can fail)


def test_the_cf_stage_gives_the_same_vectors_whatever_the_thread_count(tmp_path):
    """A seed fixes the LightGCN stage's vectors bit for bit, also with several threads (the stage
    runs on one: with two, its sparse sums came out about 1e-8 apart between runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vectors = []
        for _ in range(3):
            model, train, valid, _ = build(tmp_path, cf_hidden_size=64)
            model.train_stage("cf", train, valid, {**CF_STAGE, "epochs": 3, "learning_rate": 1e-3})
            vectors.append(torch.cat([model.user_emb, model.item_emb]))
            assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(vectors[0], v) for v in vectors[1:])
