"""TIGER and LETTER: RQ-VAE, code tables, trie-constrained beam search, end to end."""

import itertools
import os

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import RENAMED_YAML, TINY_YAML
from recbole_genrec.decoding import PrefixTrie, constrained_beam_search
from recbole_genrec.quantize.codes import build_code_table, catalogue_codebook_size, dedup_suffix
from recbole_genrec.quantize.rq_vae import RQVAE, codebook_stats, collision_rate, train_rq_vae
from recbole_genrec.quick_start import load_data_and_model, run_recbole_genrec


def clustered(n_clusters=8, per=40, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 3
    return (centres.repeat_interleave(per, 0) + 0.3 * torch.randn(n_clusters * per, dim, generator=g))


# ----- quantizer ---------------------------------------------------------------------------
def test_rq_vae_losses_fall_and_codebooks_are_used():
    torch.manual_seed(0)
    x = clustered()
    model = RQVAE(24, hidden=(64, 32), e_dim=8, levels=3, codebook_size=8)
    history = train_rq_vae(model, x, epochs=60, lr=3e-3, batch_size=64, log_every=1000)["loss"]
    assert history[-1] < 0.5 * history[0]
    stats = codebook_stats(model.get_codes(x), 8)
    assert stats["used@0"] >= 0.75  # the 8 clusters spread over the first level
    first = model.get_codes(x)[:, 0].view(8, 40)
    assert (first == first.mode(1).values.unsqueeze(1)).float().mean() > 0.9  # a cluster keeps its code


def test_straight_through_gradient_reaches_the_encoder():
    model = RQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=4)
    model.init_codebooks(clustered())
    out = model(clustered()[:16])
    out["recon_loss"].backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_dedup_suffix_makes_codes_one_to_one():
    codes = torch.randint(0, 3, (500, 2))  # at most 9 tuples for 500 items: heavy collisions
    assert collision_rate(codes) > 0.9
    table = dedup_suffix(codes)
    assert table.shape == (500, 3) and torch.equal(table[:, :2], codes)
    assert len(torch.unique(table, dim=0)) == 500
    assert collision_rate(table) == 0.0


def test_sinkhorn_resolution_is_one_to_one_and_changes_last_level():
    torch.manual_seed(0)
    codes = torch.tensor([[0, 0]] * 4 + [[1, 0]] * 4)  # two tuples for eight items
    costs = torch.rand(8, 4)
    table = build_code_table(codes, "sinkhorn", last_costs=costs)
    assert len(torch.unique(table, dim=0)) == 8
    assert torch.equal(table[:, 0], codes[:, 0])  # only the last level moves
    assert collision_rate(table[:, :2]) < collision_rate(codes)
    with pytest.raises(ValueError, match="dedup level"):
        build_code_table(torch.zeros(10, 2, dtype=torch.long), "suffix", suffix_size=4)


# ----- constrained beam search -------------------------------------------------------------
def random_catalog(n_items=30, depth=3, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    combos = torch.tensor(list(itertools.product(range(width), repeat=depth)))
    rows = combos[torch.randperm(len(combos), generator=g)[:n_items]]
    offsets = 2 + torch.arange(depth) * width
    return rows + offsets, offsets


def make_step(vocab, seed=1):
    """A deterministic next-token distribution that depends on the whole prefix."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(4, vocab, vocab, generator=g)

    def step(prefix):
        if prefix.shape[1] == 0:
            logits = table[0, 0].expand(prefix.shape[0], vocab)
        else:
            logits = table[prefix.shape[1], prefix[:, -1]] + 0.1 * prefix.sum(1, keepdim=True).float()
        return torch.log_softmax(logits, -1)

    return step


def exact_ranking(step, seqs):
    scores = []
    for row in seqs:
        total = 0.0
        for t in range(len(row)):
            total += float(step(row[:t].unsqueeze(0))[0, row[t]])
        scores.append(total)
    return torch.tensor(scores)


def test_beam_search_emits_only_real_items_without_duplicates():
    seqs, offsets = random_catalog()
    vocab = 2 + 3 * 4
    items = torch.arange(100, 130)
    trie = PrefixTrie(seqs, items, vocab)
    ranges = [(int(o), int(o) + 4) for o in offsets]
    found, scores = constrained_beam_search(make_step(vocab), trie, batch_size=3, beam_size=12, level_ranges=ranges)
    assert found.shape == (3, 12)
    for row in found:
        assert set(row.tolist()) <= set(items.tolist()) and len(set(row.tolist())) == 12
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_beam_search_matches_exact_scores_when_beam_covers_catalog():
    seqs, offsets = random_catalog()
    vocab = 2 + 3 * 4
    step = make_step(vocab)
    trie = PrefixTrie(seqs, torch.arange(len(seqs)), vocab)
    ranges = [(int(o), int(o) + 4) for o in offsets]
    found, scores = constrained_beam_search(step, trie, 1, beam_size=len(seqs), level_ranges=ranges)
    exact = exact_ranking(step, seqs)
    assert torch.equal(found[0], torch.argsort(exact, descending=True))
    assert torch.allclose(scores[0], exact.sort(descending=True).values, atol=1e-5)
    # a beam wider than the catalogue pads with -1 / -inf instead of inventing items
    found, scores = constrained_beam_search(step, trie, 1, beam_size=len(seqs) + 5, level_ranges=ranges)
    assert (found[0, -5:] == -1).all() and torch.isinf(scores[0, -5:]).all()


def test_trie_rejects_colliding_codes():
    with pytest.raises(ValueError, match="one-to-one"):
        PrefixTrie(torch.tensor([[2, 3], [2, 3]]), torch.tensor([1, 2]), 8)


# ----- TIGER / LETTER end to end -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiger_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiger")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                                    {"checkpoint_dir": str(folder / "saved"), "epochs": 3}, saved=True)
    finally:
        os.chdir(cwd)
    return result, folder


def test_tiger_trains_and_beats_popularity_floor(tiger_run):
    result, _ = tiger_run
    # 48 items: a random top-10 hits ~21%; the synthetic sequences are predictable
    assert result["test_result"]["hit@10"] > 0.3


def test_codebook_size_auto_follows_the_catalogue(monkeypatch):
    """``codebook_size: auto`` (TIGER's and LETTER's default) keeps TIGER's ~48 items per
    first-level code; the model sizes its RQ-VAE and code-token block from it."""
    from recbole.data import data_preparation

    from recbole_genrec.config import Config
    from recbole_genrec.model.tiger import TIGER
    from recbole_genrec.quantize import codes
    from recbole_genrec.utils import create_dataset

    assert [catalogue_codebook_size("auto", n) for n in (48, 1034, 1682, 12101, 10**6)] == [16, 22, 35, 252, 256]
    assert catalogue_codebook_size(64, 1682) == 64
    for bad in ("big", 1, 2.5, True):
        with pytest.raises(ValueError, match="codebook_size"):
            catalogue_codebook_size(bad, 100)
    config = Config("TIGER", "genrec-tiny", [TINY_YAML], {"codebook_size": "auto"})
    train_data, *_ = data_preparation(config, create_dataset(config))
    monkeypatch.setattr(codes, "ITEMS_PER_FIRST_CODE", 2)  # 48 items / 2 = 24 codes (above the floor of 16)
    model = TIGER(config, train_data._dataset)
    assert model.codebook_size == 24 and model.rq_vae.codebooks.shape[1] == 24


def test_tiger_reload_reproduces_predictions_and_beams_are_real_items(tiger_run):
    result, folder = tiger_run
    config, model, data, train_data, valid_data, test_data = load_data_and_model(result["model_file"])
    model.eval()
    batch = next(iter(test_data))[0]
    scores = model.full_sort_predict(batch)
    finite = torch.isfinite(scores)
    assert (finite.sum(1) == config["beam_size"]).all() and not finite[:, 0].any()
    _, model2, *_ = load_data_and_model(result["model_file"])
    model2.eval()
    assert torch.equal(scores, model2.full_sort_predict(batch))
    items, _ = model.beam_search(batch)
    assert ((items >= 1) & (items < model.n_items)).all()


def test_tiger_beam_agrees_with_exact_scorer(tiger_run):
    result, _ = tiger_run
    config, model, data, train_data, valid_data, test_data = load_data_and_model(result["model_file"])
    model.eval()
    batch = next(iter(test_data))[0][torch.arange(8)]
    exact = model.exact_scores(batch)
    items, scores = model.beam_search(batch, beam_size=model.n_items - 1)  # the whole catalogue
    top_exact = exact.topk(10, dim=1).indices
    assert torch.equal(items[:, :10], top_exact)
    assert torch.allclose(scores[:, :10], exact.topk(10, dim=1).values, atol=1e-4)
    # predict() (sampled evaluation) is the same log-likelihood
    batch.update(type(batch)({model.ITEM_ID: top_exact[:, 0]}))
    assert torch.allclose(model.predict(batch), exact.max(1).values, atol=1e-4)


def test_tiger_stage_resumes_from_its_checkpoint(tiger_run, monkeypatch, tmp_path):
    _, folder = tiger_run
    import recbole_genrec.model.tiger as tiger_module

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer stage should have been resumed")

    monkeypatch.setattr(tiger_module, "train_rq_vae", no_training)
    result = run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(folder / "saved"), "epochs": 1}, saved=False)
    assert "hit@10" in result["test_result"]
    # a changed tokenizer setting is a different fingerprint: the stage trains again
    with pytest.raises(AssertionError, match="resumed"):
        run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                           {"checkpoint_dir": str(folder / "saved"), "epochs": 1, "rq_beta": 0.5}, saved=False)


def test_beam_size_below_topk_is_refused(tmp_path):
    with pytest.raises(ValueError, match="beam_size"):
        run_recbole_genrec("TIGER", "genrec-tiny", [TINY_YAML],
                           {"checkpoint_dir": str(tmp_path), "beam_size": 5, "topk": [10]}, saved=False)


def test_tiger_on_renamed_fields(tmp_path):
    result = run_recbole_genrec("TIGER", "genrec-tiny-renamed", [TINY_YAML, RENAMED_YAML],
                                {"checkpoint_dir": str(tmp_path), "epochs": 1}, saved=True)
    assert "ndcg@10" in result["test_result"]


def _letter_tokenizer(tmp_path, cf_weight, div_weight, epochs=15, patch=None):
    """LETTER's cf + tokenizer stages on genrec-tiny; ``patch(model)`` may alter the model first."""
    from recbole.data import data_preparation
    from recbole.utils import init_seed

    from recbole_genrec.config import Config
    from recbole_genrec.model.letter import LETTER
    from recbole_genrec.utils import create_dataset

    config = Config("LETTER", "genrec-tiny", [TINY_YAML],
                    {"checkpoint_dir": str(tmp_path), "cf_weight": cf_weight, "div_weight": div_weight,
                     "div_groups": 2, "rq_levels": 2, "cf_epochs": 1})
    init_seed(config["seed"], True)
    data = create_dataset(config)
    train, valid, _ = data_preparation(config, data)
    init_seed(config["seed"], True)
    model = LETTER(config, train._dataset)
    init_seed(config["seed"], True)
    model.train_stage("cf", train, valid, {"epochs": 1, "learning_rate": 1e-3, "batch_size": 64})
    assert model.cf_item_emb[1:].abs().sum() > 0
    if patch:
        patch(model)
    init_seed(config["seed"], True)
    model.train_stage("tokenizer", train, valid, {"epochs": epochs, "learning_rate": 5e-3, "batch_size": 64})
    assert len(torch.unique(model.item_codes[1:], dim=0)) == model.n_items - 1
    return model.item_codes.clone()


def test_collaborative_loss_alone_reaches_every_encoder_layer():
    """LETTER Eq. 2 must move the encoder (code assignment), not only the codebooks."""
    model = RQVAE(24, hidden=(32, 16), e_dim=8, levels=2, codebook_size=4)
    x = clustered()[:32]
    model.init_codebooks(clustered())
    out = model(x)
    cf = torch.randn(32, 8)
    model.collaborative_loss(out["z_st"], cf).backward()
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert torch.allclose(out["z_st"], out["z_q"], atol=1e-6)  # forward value is the quantised latent


def test_train_rq_vae_feeds_the_collaborative_loss_a_latent_with_an_encoder_path(monkeypatch):
    grads = []
    original = RQVAE.collaborative_loss

    def spy(latent, cf_emb):
        loss = original(latent, cf_emb)
        first = spy.model.encoder[0].weight
        grads.append(torch.autograd.grad(loss, first, retain_graph=True, allow_unused=True)[0])
        return loss

    model = RQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=4)
    spy.model = model
    monkeypatch.setattr(RQVAE, "collaborative_loss", staticmethod(spy))
    train_rq_vae(model, clustered(), epochs=1, cf_emb=torch.randn(320, 8), cf_weight=1.0, log_every=1000)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_diversity_loss_anchor_is_the_assigned_codeword_and_generator_device_is_checked():
    model = RQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=8)
    x = clustered()
    model.init_codebooks(x)
    model.update_code_groups(2, generator=torch.Generator().manual_seed(0))
    out = model(x[:64])
    g = torch.Generator(device=out["codewords"].device).manual_seed(0)
    model.diversity_loss(out["codewords"], out["codes"], generator=g).backward()
    # the anchor is e_{c_l}: the loss moves codebooks only, never the encoder
    assert model.codebooks.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    with pytest.raises(ValueError, match="generator"):  # a CPU generator for tensors elsewhere
        model.diversity_loss(out["codewords"].detach().to("meta"), out["codes"], generator=g)


def test_train_rq_vae_draws_diversity_positives_on_the_data_device(monkeypatch):
    seen = []
    original = RQVAE.diversity_loss

    def spy(self, codewords, codes, tau=1.0, generator=None):
        seen.append((torch.device(generator.device).type, codewords.device.type))
        return original(self, codewords, codes, tau=tau, generator=generator)

    monkeypatch.setattr(RQVAE, "diversity_loss", spy)
    model = RQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=8)
    train_rq_vae(model, clustered(), epochs=1, div_weight=0.1, div_groups=2, log_every=1000)
    assert seen and all(a == b for a, b in seen)


def test_sinkhorn_survives_a_wide_cost_range():
    """Float32 exp(-c / eps) underflows to all-zero rows (argmax 0); log-space float64 does not."""
    from recbole_genrec.quantize.kmeans import sinkhorn

    g = torch.Generator().manual_seed(0)
    n, k = 64, 16
    best = torch.arange(n) % k
    cost = torch.rand(n, k, generator=g) * 1e4 + 50.0  # a wide range of costs
    cost[torch.arange(n), best] = torch.rand(n, generator=g) * 1e-2  # each row has a clear favourite
    plan = sinkhorn(cost, 0.003)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(1), torch.ones(n), atol=1e-2)
    assert torch.allclose(plan.sum(0), torch.full((k,), n / k), atol=1e-3)
    assert torch.equal(plan.argmax(1), best)  # the assignment follows the costs


def test_letter_regularisers_act_through_their_gradients(tmp_path, monkeypatch, one_thread):
    """Each regulariser changes the codes through its gradient alone: the same run with the
    regulariser's value detached (same RNG consumption, zero gradient) equals the run without it
    (bit for bit, so at one thread: see ``one_thread``)."""
    base = _letter_tokenizer(tmp_path / "a", 0.0, 0.0)

    def detached(name):
        original = getattr(RQVAE, name)

        def patch(model):
            inert = lambda *a, **k: original(*a, **k).detach()  # noqa: E731
            static = isinstance(RQVAE.__dict__[name], staticmethod)
            monkeypatch.setattr(RQVAE, name, staticmethod(inert) if static else inert)
        return patch

    for name, weights in {"collaborative_loss": (1.0, 0.0), "diversity_loss": (0.0, 0.5)}.items():
        active = _letter_tokenizer(tmp_path / name, *weights)
        inert = _letter_tokenizer(tmp_path / f"{name}-inert", *weights, patch=detached(name))
        monkeypatch.undo()
        assert torch.equal(inert, base), name  # no gradient -> the same training as without it
        assert not torch.equal(active, inert), name


def test_letter_end_to_end(tmp_path):
    result = run_recbole_genrec("LETTER", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), "epochs": 1, "cf_epochs": 1, "rq_levels": 2,
                                 "div_groups": 2},
                                saved=True)
    assert "ndcg@10" in result["test_result"]


# ----- LETTER's tokenizer as its official code trains it (quantize/letter_tokenizer.py) -----------------
def test_letter_quantisation_loss_is_the_mean_over_levels():
    """LETTER averages codebook + beta x commitment over levels; TIGER sums them."""
    from recbole_genrec.quantize.letter_tokenizer import LetterRQVAE

    torch.manual_seed(0)
    letter = LetterRQVAE(24, hidden=(32,), e_dim=8, levels=4, codebook_size=8).eval()
    tiger = RQVAE(24, hidden=(32,), e_dim=8, levels=4, codebook_size=8).eval()
    tiger.load_state_dict(letter.state_dict())
    z = letter.encode(clustered())
    ours, theirs = letter.quantize(z), tiger.quantize(z)
    assert torch.equal(ours[1], theirs[1])  # the same codes outside training
    assert theirs[3] > 0 and torch.allclose(ours[3], theirs[3] / 4)


def test_letter_balances_the_last_level_over_a_training_batch_only():
    """While training, the last level is the argmax of a Sinkhorn plan over the batch: a batch that
    crowds onto a few nearest codewords is spread over the codebook; the other levels, and every
    code outside training, are the nearest codewords."""
    from recbole_genrec.quantize.letter_tokenizer import LetterRQVAE

    torch.manual_seed(0)
    model = LetterRQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=8)
    x = clustered()
    model.init_codebooks(x, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # crowd the last level: every codeword but two far away
        model.codebooks[1, 2:] += 100.0
    z = model.encode(x)
    model.eval()
    nearest = model.quantize(z)[1]
    assert len(torch.unique(nearest[:, 1])) <= 2
    model.train()
    balanced = model.quantize(z)[1]
    assert torch.equal(balanced[:, 0], nearest[:, 0])
    counts = torch.bincount(balanced[:, 1], minlength=8)
    assert (counts > 0).all() and counts.max() <= 3 * len(x) / 8  # spread over the codebook (nearest: >= 160 on one)
    assert torch.equal(model.quantize(z, balanced_last=False)[1], nearest)
    assert torch.equal(model.forward(x)["codes"], balanced)  # forward trains on the balanced codes
    model.eval()
    assert torch.equal(model.get_codes(x), nearest)


def test_letter_tokenizer_keeps_the_epoch_with_the_fewest_collisions(monkeypatch):
    """The state kept is the one of the evaluated epoch with the lowest collision rate (not the
    last), and unused codewords are never re-seeded."""
    import copy

    from recbole_genrec.quantize import rq_vae
    from recbole_genrec.quantize.letter_tokenizer import LetterRQVAE, train_letter_rq_vae

    rates, states = iter([0.5, 0.2, 0.1, 0.3, 0.4]), []
    model = LetterRQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=8)

    def scripted(codes):
        rate = next(rates, None)
        if rate is None:  # the last epoch's log line (codebook_stats), after its check
            return 0.0
        states.append(copy.deepcopy(model.state_dict()))
        return rate

    def no_reseed(*args, **kwargs):
        raise AssertionError("LETTER does not re-seed unused codewords")

    monkeypatch.setattr(rq_vae, "collision_rate", scripted)
    monkeypatch.setattr(RQVAE, "reseed_dead_codes", no_reseed)
    out = train_letter_rq_vae(model, clustered(), epochs=10, batch_size=64, eval_step=2, log_every=1000)
    assert len(states) == 5 and out["best_epoch"] == 6 and out["best_collision_rate"] == 0.1
    kept = model.state_dict()
    assert all(torch.equal(kept[k], states[2][k]) for k in kept)
    assert not all(torch.equal(kept[k], states[-1][k]) for k in kept)
    with pytest.raises(ValueError, match="tokenizer_eval_step"):
        train_letter_rq_vae(model, clustered(), epochs=2, eval_step=0)


def test_letter_resolves_each_colliding_group_on_its_last_level_only():
    """Items sharing a tuple are re-quantised group by group with the balanced last level: the
    collision rate falls, items that did not collide keep their codes, and every re-assigned item
    keeps its first levels."""
    from recbole_genrec.quantize.letter_tokenizer import LetterRQVAE, letter_code_table

    torch.manual_seed(0)
    model = LetterRQVAE(24, hidden=(32,), e_dim=8, levels=2, codebook_size=8).eval()
    x = torch.cat([clustered(4, 30), clustered(16, 1, seed=5)])  # crowded clusters and lone items
    model.init_codebooks(x, generator=torch.Generator().manual_seed(0))
    nearest = model.get_codes(x)
    _, inverse, counts = torch.unique(nearest, dim=0, return_inverse=True, return_counts=True)
    alone = counts[inverse] == 1
    assert collision_rate(nearest) > 0.5 and alone.any()
    resolved, rounds = model.resolve_collisions(x)
    assert 1 <= rounds <= 20
    assert collision_rate(resolved) < collision_rate(nearest)
    assert torch.equal(resolved[alone], nearest[alone]) and torch.equal(resolved[:, 0], nearest[:, 0])
    table = letter_code_table(model, x, suffix_size=len(x))
    assert torch.equal(table[:, :2], resolved) and len(torch.unique(table, dim=0)) == len(x)


def test_tiger_hashed_user_token_is_prepended_and_trained(tmp_path):
    """Sec. 3.2: the hashed user token opens the encoder input and receives gradient."""
    from recbole_genrec.quick_start import _prepare

    _, _, trainer, train, _, _ = _prepare("TIGER", "genrec-tiny", [TINY_YAML],
                                          {"checkpoint_dir": str(tmp_path), "tiger_user_tokens": 8,
                                           "tokenizer_epochs": 2})
    model = trainer.model
    trainer.run_stages(train)
    batch = next(iter(train))
    users = batch[model.USER_ID]
    ids, _ = model.model_inputs(batch)
    lo = model.user_token_offset
    assert torch.equal(ids[:, 0], model.user_token[users])
    assert ((ids[:, 0] >= lo) & (ids[:, 0] < lo + 8)).all() and not ((ids[:, 1:] >= lo) & (ids[:, 1:] < lo + 8)).any()
    assert len(torch.unique(model.user_token[1:])) > 1  # users spread over buckets
    model.calculate_loss(batch).backward()
    grad = model.llm.get_input_embeddings().weight.grad
    assert grad[torch.unique(ids[:, 0])].abs().sum(1).gt(0).all()


@pytest.mark.parametrize("model", ["TIGER", "LETTER"])
def test_unknown_collision_handling_is_refused(tmp_path, model):
    with pytest.raises(ValueError, match="collision_handling must be 'suffix' or 'sinkhorn', got 'sufix'"):
        run_recbole_genrec(model, "genrec-tiny", [TINY_YAML],
                           {"checkpoint_dir": str(tmp_path), "collision_handling": "sufix"}, saved=False)
