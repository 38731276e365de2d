"""KV-cached trie-constrained beam search: the same items and scores as the uncached search
(TIGER on T5; TTDS on T5 and decoder-only backbones), exact when the beam covers the catalogue,
and wrong when the cache is not reordered with the beams."""

import os

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.decoding import PrefixTrie, constrained_beam_search, reorder_state
from recbole_genrec.quick_start import _prepare, load_data_and_model, run_recbole_genrec
from test_tiger import random_catalog
from test_ttds import SMALL


def make_step(vocab, seed=1):
    """Next-token log-probs that depend on the last AND the first token of the prefix."""
    g = torch.Generator().manual_seed(seed)
    table, first = torch.randn(4, vocab, vocab, generator=g), torch.randn(vocab, vocab, generator=g)

    def step(prefix):
        if prefix.shape[1] == 0:
            return torch.log_softmax(table[0, 0].expand(prefix.shape[0], vocab), -1)
        return torch.log_softmax(table[prefix.shape[1], prefix[:, -1]] + first[prefix[:, 0]], -1)

    return step


# ----- the engine, on a synthetic model whose distribution depends on the whole prefix -----
def stateful(step):
    """A cached stepper over ``make_step``: its state is the prefix so far (a [N, t] tensor the
    engine must reorder with the beams, like a KV cache)."""

    def cached(last, state):
        if state is None:
            state = torch.zeros(3, 0, dtype=torch.long)  # one row per user: the engine expands it
        else:
            state = torch.cat([state, last.unsqueeze(1)], 1)
        return step(state), state

    return cached


def no_reorder(state, index):
    """Expands the one-row-per-user state, then never follows the beams (a broken cache)."""
    return reorder_state(state, index) if len(index) != len(state) else state


def test_cached_engine_equals_uncached_and_needs_the_reorder():
    seqs, offsets = random_catalog(n_items=40, width=4)
    vocab = 2 + 3 * 4
    step = make_step(vocab)
    trie = PrefixTrie(seqs, torch.arange(100, 140), vocab)
    ranges = [(int(o), int(o) + 4) for o in offsets]
    items, scores = constrained_beam_search(step, trie, 3, 8, ranges)
    items_c, scores_c = constrained_beam_search(stateful(step), trie, 3, 8, ranges, cached=True)
    assert torch.equal(items, items_c) and torch.allclose(scores, scores_c, atol=1e-6)
    items_b, scores_b = constrained_beam_search(stateful(step), trie, 3, 8, ranges, cached=True,
                                                reorder=no_reorder)
    assert not torch.allclose(scores, scores_b, atol=1e-6)


def test_reorder_state_follows_indices_in_dicts_tuples_and_caches():
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.update(torch.arange(3.0).view(3, 1, 1, 1), -torch.arange(3.0).view(3, 1, 1, 1), 0)
    state = {"cache": cache, "mask": torch.tensor([[0], [1], [2]]), "kv": (torch.arange(3), 7)}
    out = reorder_state(state, torch.tensor([2, 2, 0, 1]))
    assert out["cache"] is cache and cache.layers[0].keys.flatten().tolist() == [2.0, 2.0, 0.0, 1.0]
    assert cache.layers[0].values.flatten().tolist() == [-2.0, -2.0, -0.0, -1.0]
    assert out["mask"].flatten().tolist() == [2, 2, 0, 1] and out["kv"][0].tolist() == [2, 2, 0, 1]
    assert out["kv"][1] == 7


# ----- trained models (1 epoch on genrec-tiny) ---------------------------------------------------
def in_folder(folder, fn):
    cwd = os.getcwd()
    os.chdir(folder)  # RecBole writes log/ relative to the cwd
    try:
        return fn()
    finally:
        os.chdir(cwd)


def assert_same_beams(model, batch, beam):
    items, scores = model.beam_search(batch, beam_size=beam, use_cache=False)
    items_c, scores_c = model.beam_search(batch, beam_size=beam, use_cache=True)
    assert torch.equal(items, items_c)
    assert torch.allclose(scores, scores_c, atol=1e-5, rtol=0)
    return items_c, scores_c


def assert_exact_ranking(items, scores, exact):
    """A beam over the whole catalogue is the exact ranking: ``exact [B, n_items - 1]`` holds the
    log-likelihood of items 1..n (top 10 in order; every item once with its exact score)."""
    assert torch.equal(items[:, :10], exact.topk(10, 1).indices + 1)
    assert torch.equal(items.sort(1).values, torch.arange(1, exact.shape[1] + 1).expand_as(items))
    assert torch.allclose(scores, exact.gather(1, items - 1), atol=1e-4)
    assert torch.allclose(scores, exact.sort(1, descending=True).values, atol=1e-4)


@pytest.fixture(scope="module")
def tiger(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiger_cache")
    result = in_folder(folder, lambda: run_recbole_genrec(
        "TIGER", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(folder / "saved"), "epochs": 1}, saved=True))
    config, model, _, _, _, test = load_data_and_model(result["model_file"])
    model.eval()
    return model, test


def test_tiger_cached_beam_equals_uncached_and_exact(tiger):
    model, test = tiger
    assert model.config["beam_kv_cache"] is None  # unset: the cached search is the default
    batch = next(iter(test))[0][torch.arange(16)]
    beam_items, _ = assert_same_beams(model, batch, model.beam_size)
    assert torch.equal(model.full_sort_predict(batch).topk(10, 1).indices, beam_items[:, :10])  # cached default
    items, scores = assert_same_beams(model, batch, model.n_items - 1)  # the whole catalogue
    exact = model.exact_scores(batch)
    assert_exact_ranking(items, scores, exact[:, 1:])


@pytest.fixture(scope="module", params=["t5-tiny", "qwen2-tiny", "llama-tiny"])
def ttds(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ttds_cache_{request.param}")

    def train():
        _, _, trainer, train_data, valid, test = _prepare(
            "TTDS", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(folder), **SMALL, "llm_preset": request.param})
        trainer.fit(train_data, valid, saved=False)
        return trainer.model, test

    model, test = in_folder(folder, train)
    model.eval()
    return model, test


def test_ttds_cached_beam_equals_uncached_and_exact(ttds):
    model, test = ttds
    batch = next(iter(test))[0][torch.arange(12)]
    prompt = model.next_item_prompt(batch)
    assert (prompt == model.pad_id).any()  # left padding is exercised (positions, masks)
    assert_same_beams(model, batch, model.beam_size)
    n = model.n_items - 1
    items, scores = assert_same_beams(model, batch, n)  # the whole catalogue
    B = len(items)
    rep = batch.repeat_interleave(n)
    rep.update(type(batch)({model.ITEM_ID: torch.arange(1, model.n_items).repeat(B)}))
    with torch.no_grad():
        exact = model.predict(rep).view(B, n)
    assert_exact_ranking(items, scores, exact)


# ----- a protocol that ranks targets within part of the catalogue (warm/cold) ---------------------
def some_items(model, n, seed=0):
    allowed = torch.zeros(model.n_items, dtype=torch.bool)
    allowed[1 + torch.randperm(model.n_items - 1, generator=torch.Generator().manual_seed(seed))[:n]] = True
    return allowed


def assert_decodes_within(model, batch, exact, n_allowed=8):
    """Under ``restricted_catalogue`` a beam model decodes among the allowed items only, and (its
    beam covering them) gives their exact ranking; outside the block it decodes every item again."""
    from recbole_genrec.evaluation.runs import restricted_catalogue

    assert n_allowed <= model.beam_size
    allowed = some_items(model, n_allowed)
    with restricted_catalogue(model, allowed):
        scores = model.full_sort_predict(batch)
    finite = torch.isfinite(scores)
    assert not (finite & ~allowed).any()
    assert (finite.sum(1) == n_allowed).all()  # every allowed item decoded, not the few the full beam reached
    assert torch.allclose(scores[:, allowed], exact[:, allowed], atol=1e-4)
    assert (torch.isfinite(model.full_sort_predict(batch)) & ~allowed).any()


def test_tiger_decodes_within_a_restricted_catalogue(tiger):
    model, test = tiger
    batch = next(iter(test))[0][torch.arange(8)]
    assert_decodes_within(model, batch, model.exact_scores(batch))


def test_ttds_decodes_within_a_restricted_catalogue(ttds):
    model, test = ttds
    batch = next(iter(test))[0][torch.arange(6)]
    n = model.n_items - 1
    rep = batch.repeat_interleave(n)
    rep.update(type(batch)({model.ITEM_ID: torch.arange(1, model.n_items).repeat(len(batch))}))
    with torch.no_grad():
        exact = model.predict(rep).view(len(batch), n)
    assert_decodes_within(model, batch, torch.cat([torch.full((len(batch), 1), float("-inf")), exact], 1))


def test_a_target_scored_minus_inf_is_a_miss_not_a_tie_won(tiger):
    """A row with fewer than k finite scores: RecBole's top-k fills the rest with ``-inf`` items in
    torch's tie order; a target among them must not count as a hit (it would for 8 of these 9 rows)."""
    from recbole.evaluator import Collector

    from recbole_genrec.evaluation.runs import unscored_items_are_misses

    model, _ = tiger
    collector = Collector(model.config)
    unscored_items_are_misses(collector)
    n_items, rows = 11, 9  # k = 10: two finite scores per row, nine -inf items of which 8 fill the top-10
    scores = torch.full((rows + 1, n_items), float("-inf"))
    scores[:, 0:2] = torch.tensor([2.0, 1.0])
    positive_u = torch.arange(rows + 1)
    positive_i = torch.cat([torch.arange(2, 2 + rows), torch.tensor([1])])  # each -inf item once; last row: item 1
    collector.eval_batch_collect(scores, None, positive_u, positive_i)
    topk = collector.data_struct.get("rec.topk")
    hits, n_targets = topk[:, :10].sum(1), topk[:, -1]
    assert hits[:rows].sum() == 0  # no -inf target is a hit
    assert hits[rows] == 1  # a finite target is ranked as RecBole ranks it
    assert (n_targets == 1).all()  # every target still counts in its user's recall
