"""TwoLevelLLMRec: item-ID embeddings in a decoder-only LLM, two-level softmax, single-step decoding."""

import pytest
import torch
import torch.nn.functional as F
from recbole.data import data_preparation
from recbole.utils import init_seed

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML, save_word_backbone
from recbole_genrec.config import Config
from recbole_genrec.model.two_level import TwoLevelLLMRec
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec
from recbole_genrec.utils import create_dataset

SMALL = {"cf_epochs": 2, "cf_hidden_size": 16, "learning_rate": 0.01}


def build(tmp_path, **overrides):
    """A model whose clusters need no stage (kmeans on text unless overridden)."""
    config = Config("TwoLevelLLMRec", "genrec-tiny", [TINY_YAML],
                    {"checkpoint_dir": str(tmp_path), **SMALL, "cluster_source": "text", **overrides})
    init_seed(config["seed"], True)
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    init_seed(config["seed"], True)
    return TwoLevelLLMRec(config, train._dataset), train, test


def batch_of(loader, n=16):
    batch = next(iter(loader))
    inter = batch[0] if isinstance(batch, tuple) else batch
    return inter[torch.arange(min(n, len(inter)))]


WORDS = ["[PAD]", "[UNK]", "movie_title", "class", ":", ";", "Action", "Comedy", "Drama", "Horror"]


def qwen2_with_tokenizer(tmp_path):
    """A tiny Qwen2 saved with a WordLevel tokenizer over ``WORDS``: a backbone with a text vocabulary."""
    return save_word_backbone(tmp_path / "qwen2-with-tokenizer", "qwen2-tiny", WORDS, pad="[PAD]", unk="[UNK]")


@pytest.fixture(scope="module")
def two_level_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("twolevel")
    result = run_recbole_genrec("TwoLevelLLMRec", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(folder), **SMALL, "twolevel_inference": "structure"}, saved=True)
    return result, folder


def test_end_to_end_with_bpr_clusters_and_reload(two_level_run):
    result, folder = two_level_run
    assert {"recall@10", "ndcg@10"} <= set(result["test_result"])
    config, model, _, _, _, test = load_data_and_model(result["model_file"])
    _, model2, *_ = load_data_and_model(result["model_file"])
    model.eval(), model2.eval()
    assert model.stages == ("cf",) and len(list(folder.glob("TwoLevelLLMRec-genrec-tiny-cf-*.pth"))) == 1
    assert torch.equal(model.output.cluster_of, model2.output.cluster_of)
    assert sorted(model.output.cluster_of[1:].unique().tolist()) == list(range(model.output.stats()["clusters"]))
    batch = batch_of(test)
    with torch.no_grad():
        a, b = model.full_sort_predict(batch), model2.full_sort_predict(batch)
    assert torch.equal(a, b)
    assert (torch.isfinite(a).sum(1) == 10).all()  # structure inference: the top max(topk) items only
    assert torch.isinf(a[:, 0]).all()


def test_loss_is_minus_log_of_eq4_and_probabilities_sum_to_one(tmp_path):
    for softmax in ("two_level", "full"):
        model, train, _ = build(tmp_path, twolevel_softmax=softmax, twolevel_inference="exact")
        model.eval()  # no dropout, no metadata sampling: the same h in both computations
        batch = batch_of(train)
        with torch.no_grad():
            loss = model.calculate_loss(batch)
            loss = sum(loss) if isinstance(loss, tuple) else loss
            log_p = model.log_probs(model.user_state(batch))
        assert torch.allclose(log_p.exp().sum(1), torch.ones(len(batch)), atol=1e-5)
        target = batch[model.POS_ITEM_ID]
        assert torch.allclose(loss, -log_p.gather(1, target.unsqueeze(1)).mean(), atol=1e-5)


def test_two_level_training_only_touches_the_target_clusters_items(tmp_path):
    model, train, _ = build(tmp_path, n_clusters=6)
    model.train()
    batch = batch_of(train, 4)
    sum(model.calculate_loss(batch)).backward()
    touched = model.item_embedding.weight.grad.abs().sum(1) > 0
    clusters = model.output.cluster_of[batch[model.POS_ITEM_ID]].unique()
    history = batch[model.ITEM_SEQ].unique()
    allowed = torch.isin(model.output.cluster_of, clusters) | torch.isin(torch.arange(model.n_items), history)
    allowed[0] = False
    assert touched.any() and not (touched & ~allowed).any()


def test_loss_falls(tmp_path):
    model, train, _ = build(tmp_path, metadata_sampling=False)  # the same inputs every step
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = batch_of(train, 64)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = sum(model.calculate_loss(batch))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_structure_pruning_returns_the_exact_topk(tmp_path):
    model, _, test = build(tmp_path, n_clusters=7, twolevel_inference="structure")
    model.eval()
    h = model.user_state(batch_of(test, 32)).detach()
    for sharpen in (1.0, 30.0):  # near-uniform clusters visit all; sharp ones let Eq. 6 prune
        with torch.no_grad():
            model.output.cluster_emb.weight.mul_(sharpen)
            exact = model.log_probs(h)[:, 1:].topk(5, dim=1)
            items, values, visited = model.output.structure_topk(h, model.item_vectors(), 5)
        assert torch.equal(items, exact.indices + 1)
        assert torch.allclose(values, exact.values, atol=1e-5)
        assert (visited >= 1).all() and (visited <= 7).all()
    assert visited.float().mean() < 7  # pruning happened


def test_ann_retrieves_the_mips_topk_of_item_plus_centroid(tmp_path):
    model, _, test = build(tmp_path, twolevel_inference="ann")
    model.eval()
    batch = batch_of(test, 16)
    with torch.no_grad():
        h = model.user_state(batch)
        keys = model.item_vectors()[1:] + model.output.cluster_emb.weight[model.output.cluster_of[1:]]
        dense = (h @ keys.T).topk(10, dim=1)
        items, scores = model.ann_topk(h, 10)
        scores_all = model.full_sort_predict(batch)
    assert torch.equal(items, dense.indices + 1)
    assert torch.allclose(scores, dense.values, atol=1e-4)
    assert (torch.isfinite(scores_all).sum(1) == 10).all()
    model.ann_index_type = "hnsw"
    model.train(False)  # a mode switch drops the cached index
    approx, _ = model.ann_topk(h, 10)
    assert ((approx >= 1) & (approx < model.n_items)).all()


def test_ann_rerank_returns_real_items_with_their_exact_eq4_log_probs(tmp_path):
    """ann_rerank: ANN candidates over ``e + c``, re-ranked by exact Eq. 4 (log Z of their clusters only)."""
    model, _, test = build(tmp_path, n_clusters=7, twolevel_inference="ann_rerank", ann_candidates=15)
    model.eval()
    batch = batch_of(test, 16)
    with torch.no_grad():
        model.output.cluster_emb.weight.mul_(10.0)  # clusters' log Z and P(c | h) differ: ANN order != Eq. 4 order
        h = model.user_state(batch)
        exact = model.log_probs(h)
        candidates, ann_scores = model.ann_topk(h, 15)
        items, values = model.ann_rerank_topk(h, 10)
        scores = model.full_sort_predict(batch)
    assert ((items >= 1) & (items < model.n_items)).all()  # real items only, never the padding 0
    assert torch.allclose(values, exact.gather(1, items), atol=1e-5)  # the exact Eq. 4 log-probabilities
    restricted = torch.full_like(exact, float("-inf")).scatter(1, candidates, exact.gather(1, candidates))
    best = restricted.topk(10, dim=1)  # the top-10 of the candidates by the exact score
    assert torch.equal(items, best.indices) and torch.allclose(values, best.values, atol=1e-5)
    changed = [set(a.tolist()) != set(b.tolist()) for a, b in zip(items, candidates[:, :10])]
    assert any(changed)  # re-ranking changed which items make the top-10 (log Z matters)
    assert (torch.isfinite(scores).sum(1) == 10).all() and torch.isinf(scores[:, 0]).all()
    assert torch.allclose(scores.gather(1, items), values)
    for kind in ("hnsw", "hnsw_sq"):  # approximate candidate sets, still exact scores of real items
        model.ann_index_type = kind
        model.train(False)  # a mode switch drops the cached index
        with torch.no_grad():
            items, values = model.ann_rerank_topk(h, 10)
        assert ((items >= 1) & (items < model.n_items)).all()
        assert torch.allclose(values, exact.gather(1, items), atol=1e-5)


@pytest.mark.parametrize("inference", ["structure", "ann", "ann_rerank"])
def test_single_step_modes_rank_within_a_restricted_catalogue(tmp_path, inference):
    """Under ``restricted_decoding`` (warm/cold: cold targets among cold items) a single-step mode
    returns its own top-10 of the allowed items, however far down its whole-catalogue ranking they lie
    (structure: exact Eq. 4; ann: MIPS over ``e + c``; ann_rerank over a widened candidate set)."""
    model, _, test = build(tmp_path, n_clusters=7, twolevel_inference=inference, ann_candidates=12)
    model.eval()
    batch = batch_of(test, 16)
    with torch.no_grad():
        model.output.cluster_emb.weight.mul_(10.0)
        h = model.user_state(batch)
        if inference == "ann":
            keys = model.item_vectors() + model.output.cluster_emb.weight[model.output.cluster_of]
            reference = h @ keys.T
        else:
            reference = model.log_probs(h)
        # the allowed part: the 15 items each user's own ranking puts lowest on average
        allowed = torch.zeros(model.n_items, dtype=torch.bool)
        allowed[reference[:, 1:].mean(0).topk(15, largest=False).indices + 1] = True
        with model.restricted_decoding(allowed):
            scores = model.full_sort_predict(batch)
        unrestricted = model.full_sort_predict(batch)
    assert not (allowed[unrestricted.isfinite().nonzero()[:, 1]]).any()  # the plain top-10 misses them all
    for part in (allowed, torch.arange(model.n_items) % 2 == 1):  # the low 15; every other item
        searched = []
        retrieve = model.retrieve_topk
        model.retrieve_topk = lambda h, k: searched.append(k) or retrieve(h, k)
        with torch.no_grad(), model.restricted_decoding(part):
            scores = model.full_sort_predict(batch)
        del model.retrieve_topk
        assert (torch.isfinite(scores).sum(1) == 10).all()
        assert not (torch.isfinite(scores) & ~part).any()
        finite = scores.isfinite()
        assert torch.allclose(scores[finite], reference[finite], atol=1e-4)  # each mode's own scores
        if inference != "ann_rerank" or part is allowed:  # ann_rerank: exact within the widened ANN candidates
            best = reference.masked_fill(~part, float("-inf")).topk(10, dim=1)
            assert torch.equal(scores.topk(10, dim=1).indices.sort(1).values, best.indices.sort(1).values)
        assert searched[0] == 10 and all(b == min(2 * a, model.n_items - 1) for a, b in zip(searched, searched[1:]))
    assert max(searched) < model.n_items - 1  # half the catalogue allowed: the widening stops early
    with torch.no_grad(), model.restricted_decoding(torch.zeros(model.n_items, dtype=torch.bool)):
        assert torch.isneginf(model.full_sort_predict(batch)).all()  # nothing allowed, nothing scored


def test_ann_rerank_over_the_whole_catalogue_is_the_exact_topk(tmp_path):
    model, _, test = build(tmp_path, n_clusters=7, twolevel_inference="ann_rerank")
    model.ann_candidates = model.n_items - 1  # every item is a candidate
    model.eval()
    batch = batch_of(test, 16)
    with torch.no_grad():
        model.output.cluster_emb.weight.mul_(10.0)
        h = model.user_state(batch)
        exact = model.log_probs(h)[:, 1:].topk(10, dim=1)
        items, values = model.ann_rerank_topk(h, 10)
        ann_items, _ = model.ann_topk(h, 10)
    assert torch.equal(items, exact.indices + 1)
    assert torch.allclose(values, exact.values, atol=1e-5)
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(ann_items, items))  # plain ANN differs here


def test_rerank_topk_equals_the_exact_topk_of_any_candidate_set():
    """The bound-pruned rounds of ``rerank_topk`` give the top-k of the candidates by exact Eq. 4."""
    from recbole_genrec.decoding.two_level_softmax import TwoLevelSoftmax

    torch.manual_seed(0)
    N, K, B, m, k = 401, 40, 64, 60, 10
    output = TwoLevelSoftmax(N, K, 8)
    output.set_clusters(torch.randint(0, K, (N - 1,)))
    with torch.no_grad():
        output.cluster_emb.weight.normal_(0, 2)
    vectors, h = torch.randn(N, 8) * 2, torch.randn(B, 8)
    candidates = torch.stack([torch.randperm(N - 1)[:m] + 1 for _ in range(B)])
    candidates[:4, -55:] = 0  # rows with fewer than k real candidates
    exact = output.log_probs(h, vectors)
    expected = exact.gather(1, candidates).masked_fill(candidates == 0, float("-inf")).topk(k, dim=1)
    items, values = output.rerank_topk(h, vectors, candidates, k)
    real = torch.isfinite(expected.values)
    assert torch.equal(items[real], candidates.gather(1, expected.indices)[real])
    assert torch.allclose(values[real], expected.values[real], atol=1e-5)
    assert (items[~real] == 0).all() and torch.isinf(values[~real]).all() and (~real[:4]).any(1).all()


def test_ann_rerank_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="ann_candidates"):
        build(tmp_path, twolevel_inference="ann_rerank", ann_candidates=5)  # topk is [10]
    with pytest.raises(ValueError, match="ann_rerank"):
        build(tmp_path, twolevel_softmax="full", twolevel_inference="ann_rerank")
    model, _, _ = build(tmp_path, twolevel_inference="ann_rerank", ann_candidates=10)
    with pytest.raises(ValueError, match="ann_candidates"):
        model.ann_rerank_topk(torch.zeros(1, model.output.cluster_emb.weight.shape[1]), 11)


def test_clusterings_partition_the_catalogue(tmp_path):
    model, train, _ = build(tmp_path, clustering="frequency", n_clusters=4)
    counts = torch.bincount(train._dataset.inter_feat[model.ITEM_ID], minlength=model.n_items)
    c = model.output.cluster_of[1:]
    assert sorted(c.unique().tolist()) == [0, 1, 2, 3]
    for k in range(3):  # frequency clusters are count bands, most frequent first
        assert counts[1:][c == k].min() >= counts[1:][c == k + 1].max()
    random_a, _, _ = build(tmp_path, clustering="random", n_clusters=5)
    random_b, _, _ = build(tmp_path, clustering="random", n_clusters=5)
    assert torch.equal(random_a.output.cluster_of, random_b.output.cluster_of)  # the seed fixes it
    sizes = torch.bincount(random_a.output.cluster_of[1:])
    assert len(sizes) == 5 and int(sizes.max() - sizes.min()) <= 1  # equal-size groups
    default, _, _ = build(tmp_path)
    assert default.output.n_clusters == round((default.n_items - 1) ** 0.5)


def test_metadata_sampling_adds_text_tokens_only_while_training(tmp_path):
    model, train, _ = build(tmp_path, id_only_ratio=0.0)
    batch = batch_of(train, 32)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    model.eval()
    inputs, mask, n = model.history_inputs(seq, length)
    assert torch.equal(n, length.clamp(max=model.max_seq_length))  # ID tokens only
    model.train()
    torch.manual_seed(0)
    _, _, n_train = model.history_inputs(seq, length)
    assert (n_train > n).any() and (n_train <= 2 * n).all()  # some items carry their text token too
    only_ids, _, _ = build(tmp_path, id_only_ratio=1.0)
    only_ids.train()
    assert torch.equal(only_ids.history_inputs(seq, length)[2], n)


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match="decoder-only"):
        build(tmp_path, llm_preset="t5-tiny")
    with pytest.raises(ValueError, match="twolevel_inference"):
        build(tmp_path, twolevel_inference="beam")
    with pytest.raises(ValueError, match="structure"):
        build(tmp_path, twolevel_softmax="full", twolevel_inference="structure")
    with pytest.raises(ValueError, match="item_text_fields"):
        build(tmp_path, item_text_fields=None)
    with pytest.raises(ValueError, match="n_clusters"):
        build(tmp_path, n_clusters=10_000)


def test_lora_freezes_the_llm_and_trains_the_item_side(tmp_path):
    model, train, _ = build(tmp_path, use_lora=True, metadata_sampling=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert not [n for n in trainable if n.startswith("llm.") and "lora_" not in n]  # base weights frozen
    assert {"item_embedding.weight", "placeholder", "output.cluster_emb.weight"} <= set(trainable)
    model.train()
    sum(model.calculate_loss(batch_of(train))).backward()
    assert model.item_embedding.weight.grad.abs().sum() > 0


def test_item_text_enters_as_the_backbones_own_tokens_with_llm_path(tmp_path):
    path = qwen2_with_tokenizer(tmp_path)
    model, train, _ = build(tmp_path, llm_path=str(path), id_only_ratio=0.0, twolevel_text_tokens=6,
                            cluster_source="text")
    assert model.text_input == "tokens" and model.text_proj is None
    assert model.item_text_ids.shape == (model.n_items, 6) and not model.item_text_mask[0].any()
    batch = batch_of(train, 32)
    seq, length = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    model.eval()
    assert torch.equal(model.history_inputs(seq, length)[2], length.clamp(max=model.max_seq_length))
    model.train()
    n_train = model.history_inputs(seq, length)[2]
    assert (n_train > 2 * length.clamp(max=model.max_seq_length)).any()  # several text tokens per item
    # the history's text enters as rows of the LLM's own (live) embedding table: move the table, and
    # the text inputs move with it (a copy or another encoder would not); every text token is also
    # an output centroid, so a gradient on its row would not tell
    model._presentation = lambda B, H, device: torch.cat([torch.ones(B, H), torch.zeros(B, 1)], 1).long()
    table = model.llm.get_input_embeddings().weight
    with torch.no_grad():
        table.add_(torch.randn_like(table))
    inputs, mask = model.history_inputs(seq, length)[:2]
    items, valid = model.last_items(seq, length, model.max_seq_length)
    for b in range(4):
        text = torch.cat([model.item_text_ids[i][model.item_text_mask[i]] for i in items[b][valid[b]]])
        rows = inputs[b][mask[b].bool()]
        assert len(rows) == len(text) + 1  # text only (no ID token), then the placeholder
        assert torch.cdist(table[text].detach(), rows.detach()).min(1).values.max() < 1e-5
    with pytest.raises(ValueError, match="tokenizer"):
        build(tmp_path, twolevel_text_input="tokens")  # presets have no tokenizer


def test_text_tokens_are_output_clusters_and_labels_are_sampled_in_training(tmp_path):
    """Sec. 4.2: one cluster per text token, centroid = its LLM embedding; Sec. 3.4: the label as
    ID, text or both while training; inference ID-only."""
    model, train, _ = build(tmp_path, llm_path=str(qwen2_with_tokenizer(tmp_path)), id_only_ratio=0.0,
                            twolevel_text_tokens=6, n_clusters=5)
    K, V = 5, len(WORDS)
    assert model.output.n_clusters == K and model.output.cluster_count == K + V
    batch = batch_of(train, 32)
    seq, length, target = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN], batch[model.POS_ITEM_ID]
    ids, mask = model.item_text_ids, model.item_text_mask
    assert mask[target].any(1).all()  # every label has text
    E_V = model.llm.get_input_embeddings().weight

    model.train()
    torch.manual_seed(0)
    h, tokens, is_text = model.label_states(batch)
    assert is_text.any() and (~is_text).any()  # labels as text and as IDs
    assert model.output.cluster_log_probs(h, model.text_centroids()).shape == (len(h), K + V)

    # history ID-only, labels text-only: the loss is on the label's text tokens, each its own cluster
    model._presentation = lambda B, H, device: torch.cat([torch.zeros(B, H), torch.ones(B, 1)], 1).long()
    h, tokens, is_text = model.label_states(batch)
    assert is_text.all() and torch.equal(tokens, ids[target][mask[target]])
    cluster_loss, item_loss = model.calculate_loss(batch)
    used = torch.bincount(model.output.cluster_of[1:], minlength=K) > 0
    logits = torch.cat([(h @ model.output.cluster_emb.weight.T).masked_fill(~used, float("-inf")), h @ E_V.T], 1)
    expected = -logits.log_softmax(-1).gather(1, (K + tokens).unsqueeze(1)).mean()
    assert torch.allclose(cluster_loss, expected, atol=1e-5) and item_loss == 0
    inputs, att, n, (label, _, count) = model.sequence_inputs(seq, length, target)
    rows = torch.arange(len(n))
    assert torch.equal(n, length.clamp(max=model.max_seq_length)) and torch.equal(att.sum(1), n + count)
    two = count >= 2
    assert two.any() and torch.allclose(inputs[rows, n + 1][two], E_V[label[:, 0]][two])  # teacher forcing
    model.softmax_type = "full"  # Eq. 1 over items and text tokens
    full = model.calculate_loss(batch)
    scores = torch.cat([h @ model.item_vectors()[1:].T, h @ E_V.T], 1)
    assert torch.allclose(full, F.cross_entropy(scores, model.n_items - 1 + tokens), atol=1e-5)
    model.softmax_type = "two_level"

    # label sampling only in training, and not for the ID-only share
    model.eval()
    h, tokens, is_text = model.label_states(batch)
    assert torch.equal(tokens, target) and not is_text.any() and len(h) == len(target)
    del model._presentation
    model.train()
    model.id_only_ratio = 1.0
    assert torch.equal(model.label_states(batch)[1], target)

    # inference: ID inputs only, items ranked in one step
    model.eval()
    inputs, att, n = model.history_inputs(seq, length)
    assert torch.equal(n, length.clamp(max=model.max_seq_length)) and torch.equal(att.sum(1), n + 1)
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
    assert scores.shape == (len(target), model.n_items)
    assert torch.allclose(scores.exp().sum(1), torch.ones(len(target)), atol=1e-5)  # P(item | h, an item)


def test_two_level_loss_projects_each_target_cluster_member_once(tmp_path):
    """Sec. 4.3.1: the members of the batch's target clusters go through the projection once; loss and
    gradients equal the per-example formulation (each row's own cluster projected)."""
    model, train, _ = build(tmp_path, n_clusters=6, metadata_sampling=False)
    model.eval()  # the same h in both computations
    batch = batch_of(train, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    projected = []
    hook = model.item_proj.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[:-1].numel()))
    loss = sum(model.calculate_loss(batch))
    hook.remove()
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    target = batch[model.POS_ITEM_ID]
    cluster_of = model.output.cluster_of
    h = model.user_state(batch)
    used = torch.bincount(cluster_of[1:], minlength=6) > 0
    log_pc = (h @ model.output.cluster_emb.weight.T).masked_fill(~used, float("-inf")).log_softmax(-1)
    expected = 0
    for b, t in enumerate(target.tolist()):
        own = (cluster_of == cluster_of[t]).nonzero().flatten()
        own = own[own > 0]
        log_p = (model.item_proj(model.item_embedding(own)) @ h[b]).log_softmax(-1)
        expected = expected - log_pc[b, cluster_of[t]] - log_p[own == t].squeeze()
    expected = expected / len(target)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    assert torch.allclose(loss, expected, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        assert (g is None) == (e is None) and (g is None or torch.allclose(g, e, atol=1e-6))

    members = torch.isin(cluster_of[1:], cluster_of[target].unique()).sum().item()
    assert projected == [len(target) * model.max_seq_length, members]  # history, then each member once
