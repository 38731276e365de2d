"""TTDS: twin towers, DM-VAE losses, dynamic IDs, tasks and ablations, decoding, save/reload."""

import copy
import glob
import os
import re
import shutil
import warnings

import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import ROOT, TINY_YAML, save_word_backbone, split_words
from recbole_genrec.data import TextEncoder, load_item_texts
from recbole_genrec.quick_start import _prepare, load_data_and_model, run_recbole_genrec

SMALL = {"ttds_levels": 2, "ttds_codebook_size": 8, "ttds_suffix_size": 32, "ttds_code_dim": 16,
         "ttds_tower_hidden": [32], "ttds_text_length": 16, "ttds_text_vocab": 512, "warmup_epochs": 5,
         "ttds_aux_batch": 16, "epochs": 1}


def build(tmp_path, **extra):
    config, _, trainer, train, valid, test = _prepare(
        "TTDS", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **SMALL, **extra})
    return config, trainer, train, valid, test


def stage_cfg(trainer):
    return trainer.stage_config("warmup")


def test_token_ranges_of_the_towers_are_disjoint_and_tables_live_in_them(tmp_path):
    _, trainer, train, *_ = build(tmp_path)
    m = trainer.model
    item = set(range(m.item_offset, m.item_offset + m.n_id))
    user = set(range(m.user_offset, m.user_offset + m.n_id))
    text = set(range(m.text_offset, m.text_offset + m.text_vocab))
    assert not (item & user) and not (item & text) and not (user & text) and min(item) > m.sep_id
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    for sid, lo in ((m.item_sid[1:], m.item_offset), (m.user_sid[1:], m.user_offset)):
        for level in range(m.M):  # level l uses [lo + l N, lo + (l + 1) N)
            assert ((sid[:, level] >= lo + level * m.N) & (sid[:, level] < lo + (level + 1) * m.N)).all()
        assert ((sid[:, m.M] >= lo + m.M * m.N) & (sid[:, m.M] < lo + m.n_id)).all()
    assert m.llm.get_input_embeddings().num_embeddings >= m.text_offset + m.text_vocab


def test_tables_are_one_to_one_with_forced_collisions(tmp_path):
    _, trainer, train, *_ = build(tmp_path, ttds_codebook_size=2, ttds_suffix_size=80)  # 4 tuples, 48 items, 80 users
    m = trainer.model
    stats = m.train_stage("warmup", train, None, stage_cfg(trainer))
    assert stats["item_collision_rate"] > 0.5 and stats["user_collision_rate"] > 0.5
    for sid in (m.item_sid[1:], m.user_sid[1:]):
        assert sid.shape[1] == m.M + 1 and len(torch.unique(sid, dim=0)) == len(sid)


def test_suffix_overflow_is_a_clear_error(tmp_path):
    _, trainer, train, *_ = build(tmp_path, ttds_codebook_size=2, ttds_suffix_size=4)
    with pytest.raises(ValueError, match="TTDS item IDs: .* share one code tuple.*ttds_suffix_size"):
        trainer.model.train_stage("warmup", train, None, stage_cfg(trainer))


# the warm/cold protocol's split (global time order, 8:1:1): some users come after the training period
WARM_COLD_SPLIT = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": None, "mode": "full"}


def test_users_without_text_share_one_sid_and_do_not_fit_the_user_tower(tmp_path):
    # 16 x 16 tuples: the users with text rarely share one; the suffix (12) is smaller than the
    # number of users without any training interaction, who all have the same (empty) text
    _, trainer, train, *_ = build(tmp_path, eval_args=WARM_COLD_SPLIT, ttds_codebook_size=16, ttds_suffix_size=12)
    m = trainer.model
    has = m.user_has_text[1:]
    assert [bool(t) for t in m.user_text_strings[1:]] == [bool(m.train_items[u]) for u in range(1, m.n_users)]
    assert int((~has).sum()) > m.S and has.any()
    assert not m.user_x[1:][~has].any()  # their X: the zero row of an empty text
    # every user row that fits the user tower (k-means, the warm-up's and the joint stage's L_DM)
    fitted = []
    init, dm = m.user_tower.init_codebooks, m.dm_loss
    m.user_tower.init_codebooks = lambda x, **kw: (fitted.append(x), init(x, **kw))[1]
    m.dm_loss = lambda kind, x: (fitted.append(x) if kind == "user" else None, dm(kind, x))[1]
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    with_text = {tuple(row) for row in m.user_x[1:][has].tolist()}
    assert len(fitted) > 1 and all(tuple(row) in with_text for x in fitted for row in x.tolist())
    assert len(fitted[0]) == int(has.sum())  # k-means on all users with text
    sid = m.user_sid[1:]
    assert len(torch.unique(sid[has], dim=0)) == int(has.sum())  # one-to-one over the users with text
    assert len(torch.unique(sid[~has], dim=0)) == 1  # one Sid for all users without text ...
    assert not (sid[has] == sid[~has][0]).all(1).any()  # ... that no user with text has
    # the user tower is fitted to the users with text only (standardisation, as the refresh re-fits it)
    x = m.user_x[1:][has]
    assert torch.allclose(m.user_tower.x_mean, x.mean(0)) and torch.allclose(m.user_tower.x_std, x.std(0).clamp(min=1e-6))
    # and a joint epoch's refresh keeps the rule
    fitted.clear()
    _joint_steps(m, train, steps=2)
    assert fitted and all(tuple(row) in with_text for x in fitted for row in x.tolist())
    # a user with training rows but no text (user_text_fields only, a user the .user file lacks)
    batch = next(iter(train))
    m.user_has_text[torch.unique(batch[m.USER_ID])] = False
    fitted.clear()
    m.batch_dm_loss(batch)
    assert not fitted  # no user row reached the user tower
    m.user_has_text[1:] = has
    m.refresh_ids()
    sid = m.user_sid[1:]
    assert len(torch.unique(sid[has], dim=0)) == int(has.sum()) and len(torch.unique(sid[~has], dim=0)) == 1
    # LSH centres on the users with text
    m.indexer = "lsh"
    x = m.user_x[1:]
    lsh = m.compute_codes("user", x)
    x_text = x[has]
    proj = torch.einsum("nd,lbd->nlb", x_text - x_text.mean(0), m.lsh_planes)
    assert torch.equal(lsh[has], ((proj > 0).long() * 2 ** torch.arange(proj.shape[-1])).sum(-1) % m.N)


def test_with_every_user_having_text_the_user_table_is_the_plain_collision_table(tmp_path):
    from recbole_genrec.quantize.codes import build_code_table

    _, trainer, *_ = build(tmp_path, ttds_codebook_size=2, ttds_suffix_size=80)  # leave-one-out: all have text
    m = trainer.model
    assert m.user_has_text[1:].all()
    codes = torch.randint(0, 2, (m.n_users - 1, m.M), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.code_table("user", codes), build_code_table(codes, "suffix", suffix_size=m.S))


def test_warmup_keeps_the_llm_bit_identical_and_halves_l_dm(tmp_path):
    _, trainer, train, *_ = build(tmp_path, warmup_epochs=40, warmup_learning_rate=0.01)
    m = trainer.model
    before = {k: v.clone() for k, v in m.llm.state_dict().items()}
    stats = m.train_stage("warmup", train, None, stage_cfg(trainer))
    after = m.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in m.llm.parameters())  # frozen: no gradient was even computed
    assert all(p.requires_grad for p in m.llm.parameters())  # unfrozen again for the joint stage
    for kind in ("item", "user"):
        assert stats["L_DM_last"][kind] < 0.5 * stats["L_DM_first"][kind], stats


@pytest.mark.parametrize("lora", [False, True])
def test_l_id_alone_reaches_encoder_codebooks_and_llm_with_a_detached_target(tmp_path, lora):
    _, trainer, train, *_ = build(tmp_path, use_lora=lora)
    m = trainer.model
    m.train_stage("warmup", train, None, {**stage_cfg(trainer), "epochs": 0})
    x = m.text_targets("item", torch.arange(1, 17)).clone().requires_grad_(True)
    m.zero_grad()
    m.dm_loss("item", x)["id"].backward()
    assert x.grad is None  # the text target (and the towers' input) is stop-gradient
    assert m.x_head.weight.grad.abs().sum() > 0  # f maps the LLM's states into the encoder's X space
    tower = m.item_tower
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in tower.encoder.parameters() if p.dim() == 2)
    assert tower.codebooks.grad.abs().sum() > 0
    llm_grads = [p.grad for n, p in m.llm.named_parameters() if p.requires_grad and "embed" not in n
                 and "shared" not in n]
    assert llm_grads and any(g is not None and g.abs().sum() > 0 for g in llm_grads)
    if lora:
        assert all(not p.requires_grad for n, p in m.llm.named_parameters() if "lora_" not in n
                   and "trainable_tokens" not in n and "token_adapter" not in n)


def test_dynamic_ids_change_between_epochs_and_ttss_keeps_them(tmp_path):
    common = {"epochs": 2, "learning_rate": 0.05, "alpha": 1.0, "ttds_tower_learning_rate": 0.05}
    _, trainer, train, valid, _ = build(tmp_path / "dyn", **common)
    changes = []
    original = trainer.model.refresh_ids

    def spy(**kwargs):
        stats = original(**kwargs)
        changes.append(stats)
        return stats

    trainer.model.refresh_ids = spy
    trainer.fit(train, valid, saved=False)
    joint = changes[1:]  # the first refresh is the warm-up's
    assert len(joint) == 2 and max(c["item_changed"] for c in joint) > 0, changes

    _, trainer, train, valid, _ = build(tmp_path / "static", ttds_dynamic=False, **common)
    trainer.fit(train, valid, saved=False)
    stage = torch.load(trainer.stage_files["warmup"], weights_only=False)["state"]
    assert torch.equal(trainer.model.item_sid, stage["item_sid"])
    assert torch.equal(trainer.model.user_sid, stage["user_sid"])
    assert not any(p.requires_grad for p in trainer.model.item_tower.parameters())


def _joint_steps(m, train, steps=4, lr=0.05):
    """A few joint steps on L_All that move the backbone (hence the live X) a long way."""
    opt = torch.optim.Adam(m.param_groups([p for p in m.parameters() if p.requires_grad]), lr=lr)
    m.train()
    for step, batch in enumerate(train):
        opt.zero_grad()
        m.calculate_loss(batch).backward()
        opt.step()
        if step + 1 == steps:
            break


@pytest.mark.parametrize("source", ["warmup", "live"])
def test_x_is_the_warmups_and_a_refresh_changes_ids_only_by_the_towers_learning(tmp_path, source):
    """``ttds_text_source: warmup``: X is fixed at the warm-up's, so with the towers at learning rate 0
    no ID changes however far the LLM moves, and a refresh with no training in between changes
    nothing (64 codes for 48 items: dead codes a re-seed would move). ``live`` follows the LLM."""
    _, trainer, train, *_ = build(tmp_path, ttds_codebook_size=64, ttds_suffix_size=128,  # no table overflows
                                  ttds_text_source=source, ttds_tower_learning_rate=0.0)
    m = trainer.model
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    x0 = m.text_repr(m.item_text_ids[1:])
    assert torch.equal(m.item_x[1:], x0) and bool(m.x_ready)
    towers = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("item_tower", "user_tower"))}
    sids = (m.item_sid.clone(), m.user_sid.clone())
    _joint_steps(m, train)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in towers.items())  # tower lr 0: untouched
    with torch.no_grad():  # and the LLM's X moves much further still: each text word reads as another
        rows = m.llm.get_input_embeddings().weight[m.text_offset:m.text_offset + m.text_vocab]
        rows.copy_(rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))])
    assert (m.text_repr(m.item_text_ids[1:]) - x0).norm() > 0.5 * x0.norm()
    stats = m.refresh_ids()
    assert "item_collision_rate" in stats and "user_collision_rate" in stats  # rebuilt, not kept
    if source == "warmup":
        assert stats["item_changed"] == stats["user_changed"] == 0, stats
        assert torch.equal(m.item_sid, sids[0]) and torch.equal(m.user_sid, sids[1])
        assert m.refresh_ids()["item_changed"] == 0
    else:
        assert stats["item_changed"] > 0.1 and stats["user_changed"] > 0.1, stats


@pytest.mark.parametrize("backbone", ["preset", "llm_path"])
def test_a_backbone_that_knows_no_words_reads_x_from_the_text_encoder(tmp_path, backbone):
    """``ttds_text_source: auto``: a randomly initialised preset takes X from the text encoder (the
    sentence embeddings of the entity texts, scaled to unit mean square), which the towers quantise
    and L_ID targets through ``x_head``; a backbone from ``llm_path`` keeps its own X."""
    extra = {}
    if backbone == "llm_path":
        words = ["<pad>", "</s>", "<unk>", "the", "returns", "files", "story", "chronicles", "recent"]
        extra["llm_path"] = str(save_word_backbone(tmp_path / "llm", "t5-tiny", words, eos="</s>"))
        extra["ttds_suffix_size"] = 128  # few known words: codes collide
    config, trainer, train, *_ = build(tmp_path, **extra)
    m = trainer.model
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    if backbone == "llm_path":
        assert m.text_source == "warmup" and isinstance(m.x_head, torch.nn.Identity)
        assert torch.equal(m.item_x[1:], m.text_repr(m.item_text_ids[1:]))
        return
    assert m.text_source == "encoder"
    encoder = TextEncoder(max_length=config["text_encoder_max_length"])
    texts = load_item_texts(config, train._dataset)
    expected = torch.from_numpy(encoder.encode(texts[1:])) * 384 ** 0.5
    assert torch.allclose(m.item_x[1:], expected, atol=1e-4)
    users = [u for u, t in enumerate(m.user_text_strings) if t]
    expected = torch.from_numpy(encoder.encode([m.user_text_strings[u] for u in users])) * 384 ** 0.5
    assert torch.allclose(m.user_x[users], expected, atol=1e-4)
    codes = m.item_sid[1:, : m.M] - m.item_offset - torch.arange(m.M) * m.N
    assert torch.equal(codes, m.item_tower.get_codes(m.item_x[1:]))  # the IDs quantise it
    assert torch.equal(m.text_targets("item"), m.item_x[1:])  # and the joint losses read it, not the LLM


def test_a_user_tower_without_any_user_text_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no user has any text.*user_text_fields.*ttds_user_tower"):
        build(tmp_path, ttds_user_history_titles=0)  # no .user fields either
    _, trainer, *_ = build(tmp_path, ttds_user_history_titles=0, ttds_user_tower=False)  # no user tower: fine
    assert trainer.model.user_tower is None


def test_towers_train_at_their_own_learning_rate_in_the_joint_stage(tmp_path):
    _, trainer, train, valid, _ = build(tmp_path, epochs=1, learning_rate=0.05, ttds_tower_learning_rate=0.0)
    m = trainer.model
    trainer.fit(train, valid, saved=False)
    groups = trainer.optimizer.param_groups
    tower = {id(p) for p in list(m.item_tower.parameters()) + list(m.user_tower.parameters())}
    assert [g["lr"] for g in groups] == [0.05, 0.0]
    assert {id(p) for p in groups[1]["params"]} == tower and not tower & {id(p) for p in groups[0]["params"]}
    stage = torch.load(trainer.stage_files["warmup"], weights_only=False)["state"]["towers"]
    state = m.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in stage.items() if k.startswith(("item_tower", "user_tower")))
    assert not torch.equal(stage["up_proj.item.weight"], state["up_proj.item.weight"])  # the rest trained


@pytest.mark.parametrize("preset", ["t5-tiny", "qwen2-tiny"])
def test_decoding_uses_the_current_table_and_matches_exact_likelihoods(tmp_path, preset):
    _, trainer, train, valid, test = build(tmp_path, llm_preset=preset)
    m = trainer.model
    trainer.fit(train, valid, saved=False)
    m.eval()
    # a new table from a dynamic refresh: decoding must follow it, not a stale trie
    _ = m.trie
    old = m.item_sid.clone()
    with torch.no_grad():
        m.item_tower.codebooks[0] = m.item_tower.codebooks[0][torch.randperm(m.N)]
    stats = m.refresh_ids()
    m.eval()
    assert stats["item_changed"] > 0 and not torch.equal(old, m.item_sid)
    batch = next(iter(test))[0][torch.arange(6)]
    items, scores = m.beam_search(batch, beam_size=m.n_items - 1)  # the whole catalogue
    assert ((items >= 1) & (items < m.n_items)).all()
    assert all(len(set(row.tolist())) == len(row) for row in items)
    B = len(items)
    all_items = torch.arange(1, m.n_items).repeat(B)
    rep = batch.repeat_interleave(m.n_items - 1)
    rep.update(type(batch)({m.ITEM_ID: all_items}))
    exact = torch.full((B, m.n_items), float("-inf"))
    exact[:, 1:] = m.predict(rep).view(B, -1)
    assert torch.equal(items[:, :10], exact.topk(10, dim=1).indices)
    assert torch.allclose(scores[:, :10], exact.topk(10, dim=1).values, atol=1e-4)


def interleaved_times_copy(tmp_path):
    """genrec-tiny with every user's k-th interaction at about k * 10240 s: each user keeps their own
    order, but the users' histories overlap in time, so rows (written user by user) are not in time
    order."""
    dst = tmp_path / "data" / "genrec-tiny"
    shutil.copytree(ROOT / "dataset_atomic" / "genrec-tiny", dst)
    header, *lines = (dst / "genrec-tiny.inter").read_text().splitlines()
    rows, seen = [line.split("\t") for line in lines], {}
    for row in rows:
        k = seen[row[0]] = seen.get(row[0], -1) + 1
        row[3] = str(880000000 + 10240 * k + 64 * (int(row[0]) * 37 % 101))  # multiples of 64: exact in float32
    (dst / "genrec-tiny.inter").write_text("\n".join([header] + ["\t".join(r) for r in rows]) + "\n")
    return str(tmp_path / "data")


@pytest.mark.parametrize("history", [20, 1])
def test_user_task_and_user_texts_hold_only_training_interactions(tmp_path, history):
    config, trainer, train, valid, test = build(tmp_path, MAX_ITEM_LIST_LENGTH=history,
                                                data_path=interleaved_times_copy(tmp_path))
    m = trainer.model
    inter = train._dataset.inter_feat
    train_pairs = set(zip(inter[m.ITEM_ID].tolist(), inter[m.USER_ID].tolist()))
    held_out = set()
    for split in (valid, test):
        d = split._dataset.inter_feat
        held_out |= set(zip(d[m.USER_ID].tolist(), d[m.ITEM_ID].tolist()))
    # training interactions: targets and the items of their histories; the times of each (item, user)
    seen, when = set(train_pairs), {}
    for row_user, seq, times, item, t in zip(inter[m.USER_ID].tolist(), inter[m.ITEM_SEQ].tolist(),
                                            inter["timestamp_list"].tolist(), inter[m.ITEM_ID].tolist(),
                                            inter["timestamp"].tolist()):
        seen |= {(i, row_user) for i in seq if i}
        for i, ti in [*zip(seq, times), (item, t)]:
            if i:  # (no pair repeats at one time in this copy: a set of times per pair is enough)
                when.setdefault((i, row_user), set()).add(ti)
    # the users of each item: every training interaction (a user's first item included), in time order
    listed = []
    for item in range(1, m.n_items):
        lo, hi = int(m.item_user_indptr[item]), int(m.item_user_indptr[item + 1])
        users = m.item_user_seq[lo:hi].tolist()
        listed += [(item, user) for user in users]
        # a repeated user takes their next time
        times = [sorted(when[(item, user)])[users[:k].count(user)] for k, user in enumerate(users)]
        assert times == sorted(times)
    first_items = len(torch.unique(inter[m.USER_ID]))  # one per user with a training row
    assert set(listed) == seen and len(listed) == len(inter) + first_items  # repeats kept
    for user, item in held_out:  # a validation/test interaction is never among a user's training items
        assert item not in m.train_items[user] or (item, user) in seen
    assert all((i, u) in seen for u in range(1, len(m.train_items)) for i in m.train_items[u])
    # the user text lists exactly the titles of the last 10 training items, newest first
    from recbole_genrec.data import load_item_texts

    titles = load_item_texts(config, train._dataset, [config["item_text_fields"][0]])
    u = 1
    expected = ", ".join(titles[i].split(": ", 1)[-1] for i in reversed(m.train_items[u][-10:]))
    assert m.user_text_strings[u] == f"recent: {expected}"
    # user prediction: the next user is a later training user of the same item
    items = torch.arange(1, m.n_items)
    batch = m.user_task_batch(items)
    for item, context, nxt in zip(*batch):
        lo, hi = int(m.item_user_indptr[item]), int(m.item_user_indptr[item + 1])
        seq = m.item_user_seq[lo:hi].tolist()
        ctx = [c for c in context.tolist() if c]
        pos = len(ctx)
        assert any(seq[j] == int(nxt) and seq[j - pos:j] == ctx for j in range(pos, len(seq)))


@pytest.mark.parametrize("mode", ["hashed", "tokenizer", "off"])
def test_prompts_put_the_sids_into_the_instruction(tmp_path, mode):
    """Sec. 4.2.1 / 4.2.4: instruction words, then the Sids at their slots, in order; with
    ``llm_path`` the backbone's tokenizer reads the words; ``ttds_instruction: False``: Sids alone."""
    from recbole_genrec.model.ttds import INSTRUCTIONS

    extra = {"ttds_instruction": mode != "off", "warmup_epochs": 1}
    words = ["<pad>", "</s>", "<unk>"] + sorted({w for t in INSTRUCTIONS.values() for w in split_words(t)})
    if mode == "tokenizer":
        extra["llm_path"] = str(save_word_backbone(tmp_path / "t5", "t5-tiny", words, eos="</s>"))
        extra["ttds_suffix_size"] = 128  # entity texts are all unknown words here: codes collide
    _, trainer, train, *_ = build(tmp_path, **extra)
    m = trainer.model
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    piece = {name: getattr(m, f"instr_{name}").tolist() for name in INSTRUCTIONS}
    if mode == "tokenizer":
        assert all([words[t] for t in piece[n]] == split_words(INSTRUCTIONS[n]) for n in INSTRUCTIONS)
    elif mode == "hashed":
        assert all(len(piece[n]) == len(re.findall(r"\w+", INSTRUCTIONS[n])) for n in INSTRUCTIONS)
        assert all(m.text_offset <= t < m.text_offset + m.text_vocab for n in INSTRUCTIONS for t in piece[n])
    else:
        assert not any(piece.values())
    close = [m.eos_id if m.is_encoder_decoder else m.sep_id]
    batch = next(iter(train))[torch.arange(8)]
    prompt = m.next_item_prompt(batch)
    for b in range(8):
        n = min(int(batch[m.ITEM_SEQ_LEN][b]), m.history)
        history = batch[m.ITEM_SEQ][b, int(batch[m.ITEM_SEQ_LEN][b]) - n:int(batch[m.ITEM_SEQ_LEN][b])]
        expected = (piece["user_intro"] + m.user_sid[batch[m.USER_ID][b]].tolist() + piece["history_intro"]
                    + m.item_sid[history].flatten().tolist() + close)
        assert prompt[b][prompt[b] != m.pad_id].tolist() == expected
        assert (prompt[b][-len(expected):] != m.pad_id).all()  # left-padded: no pad among the tokens
    items, context, _ = m.user_task_batch(torch.arange(1, m.n_items))
    prompt = m.user_prompt(items, context)
    for b in range(len(items)):
        expected = (piece["item_intro"] + m.item_sid[items[b]].tolist() + piece["users_intro"]
                    + m.user_sid[context[b][context[b] > 0]].flatten().tolist() + piece["user_question"] + close)
        assert prompt[b][prompt[b] != m.pad_id].tolist() == expected
        assert (prompt[b][-len(expected):] != m.pad_id).all()
    if mode == "hashed":
        with pytest.raises(ValueError, match="ttds_text_vocab must be >= 1"):
            build(tmp_path, ttds_text_vocab=0)


@pytest.mark.parametrize("flags, tasks, user_tower, dynamic", [
    ({}, ["next_item", "user"], True, True),                              # TTDS
    ({"ttds_user_tower": False}, ["next_item"], False, True),             # STDS
    ({"ttds_dynamic": False}, ["next_item", "user"], True, False),        # TTSS
    ({"ttds_tasks": ["next_item"]}, ["next_item"], True, True),           # TTDS-HO
])
def test_each_ablation_builds_exactly_its_tasks(tmp_path, flags, tasks, user_tower, dynamic):
    _, trainer, train, *_ = build(tmp_path, **flags)
    m = trainer.model
    assert m.tasks == tasks and (m.user_tower is not None) == user_tower and m.dynamic == dynamic
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    batch = next(iter(train))
    m.calculate_loss(batch)
    assert sorted(k for k in m.last_losses if k != "dm") == sorted(tasks)
    prompt = m.next_item_prompt(batch)
    has_user_tokens = ((prompt >= m.user_offset) & (prompt < m.user_offset + m.n_id)).any()
    assert bool(has_user_tokens) == user_tower


def test_alpha_zero_gives_exactly_l_llm(tmp_path):
    for alpha in (0.0, 0.5):
        _, trainer, train, *_ = build(tmp_path / str(alpha), alpha=alpha)
        m = trainer.model
        with warnings.catch_warnings():  # the logged losses are read off detached values
            warnings.filterwarnings("error", message="Converting a tensor with requires_grad")
            m.train_stage("warmup", train, None, stage_cfg(trainer))
            m.eval()  # no dropout: the two evaluations below see the same network
            batch = next(iter(train))
            torch.manual_seed(0)
            total = m.calculate_loss(batch)
        torch.manual_seed(0)
        l_llm = m.seq2seq_loss(m.next_item_prompt(batch), m.item_sid[batch[m.POS_ITEM_ID]])
        items, context, nxt = m.user_task_batch(torch.unique(batch[m.POS_ITEM_ID]))
        l_llm = (l_llm + m.seq2seq_loss(m.user_prompt(items, context), m.user_sid[nxt])) / 2
        if alpha == 0:
            assert torch.equal(total, l_llm)
        else:
            assert not torch.allclose(total, l_llm)
            assert torch.allclose(total, l_llm + alpha * torch.tensor(m.last_losses["dm"]), atol=1e-5)


@pytest.mark.parametrize("indexer", ["lsh", "random"])
def test_lsh_and_random_indexers(tmp_path, indexer):
    _, trainer, train, *_ = build(tmp_path, ttds_indexer=indexer, ttds_codebook_size=4)
    m = trainer.model
    assert m.token_embedding == "free" and m.id_token_table("item") is None
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    x = m.text_repr(m.item_text_ids[1:])
    codes = m.compute_codes("item", x)
    if indexer == "lsh":  # sign bits of fixed random projections of the centred X
        proj = torch.einsum("nd,lbd->nlb", x - x.mean(0), m.lsh_planes)
        assert torch.equal(codes, ((proj > 0).long() * torch.tensor([1, 2])).sum(-1))
    else:
        assert torch.equal(codes, m.compute_codes("item", x + 5.0))  # random codes ignore X
    assert torch.equal(m.item_sid[1:, : m.M] - m.item_offset - torch.arange(m.M) * m.N, codes)


@pytest.mark.parametrize("preset", ["t5-tiny", "qwen2-tiny"])
def test_ttds_end_to_end_saves_and_reloads(tmp_path, preset):
    result = run_recbole_genrec("TTDS", "genrec-tiny", [TINY_YAML],
                                {"checkpoint_dir": str(tmp_path), **SMALL, "llm_preset": preset}, saved=True)
    assert "ndcg@10" in result["test_result"]
    assert glob.glob(os.path.join(tmp_path, "TTDS-genrec-tiny-warmup-*.pth"))
    config, model, data, train, valid, test = load_data_and_model(result["model_file"])
    model.eval()
    batch = next(iter(test))[0]
    scores = model.full_sort_predict(batch)
    assert (torch.isfinite(scores).sum(1) == config["beam_size"]).all()
    checkpoint = torch.load(result["model_file"], weights_only=False)
    assert torch.equal(model.item_sid, checkpoint["state_dict"]["item_sid"])
    _, model2, *_ = load_data_and_model(result["model_file"])
    model2.eval()
    assert torch.equal(scores, model2.full_sort_predict(batch))


def test_user_text_uses_the_latest_training_items_even_past_the_history_cap(tmp_path):
    """With a history cap below a user's training length the user text still lists the LAST items."""
    _, trainer, train, *_ = build(tmp_path, MAX_ITEM_LIST_LENGTH=3, ttds_user_history_titles=2)
    m = trainer.model
    inter = train._dataset.inter_feat
    last = {}
    for u, i in zip(inter[m.USER_ID].tolist(), inter[m.ITEM_ID].tolist()):  # rows in time order
        last.setdefault(u, []).append(i)
    long_users = [u for u, items in last.items() if len(items) > 4]
    assert long_users
    for u in long_users:
        assert m.train_items[u][-2:] == last[u][-2:]


def test_a_user_text_cut_to_its_length_keeps_the_newest_titles(tmp_path):
    """The titles run newest first, so the backbone's cut at ``ttds_text_length`` words (and the
    text encoder's at its sub-word limit) drops the oldest ones, never the newest."""
    _, trainer, train, *_ = build(tmp_path, ttds_text_length=8)
    m = trainer.model
    titles = load_item_texts(trainer.config, train._dataset, [trainer.config["item_text_fields"][0]])
    cut = [u for u, t in enumerate(m.user_text_strings) if len(re.findall(r"\w+", t)) > 8]
    assert cut  # users whose text is longer than the cut
    for u in cut:
        newest = titles[m.train_items[u][-1]].split(": ", 1)[-1]
        want = set(m.tokenize([newest], 8)[0].tolist()) - {m.pad_id}
        assert want <= set(m.user_text_ids[u].tolist()), u


def test_ttds_dm_has_no_dm_vae_at_all(tmp_path):
    """alpha 0 (TTDS-DM): no warm-up training; the towers' encoders keep their initial weights."""
    _, trainer, train, *_ = build(tmp_path, alpha=0.0)
    m = trainer.model
    before = {k: v.clone() for k, v in m.item_tower.encoder.state_dict().items()}
    stats = m.train_stage("warmup", train, None, stage_cfg(trainer))
    assert stats["L_DM_first"] == {"item": None, "user": None}
    assert all(torch.equal(before[k], v) for k, v in m.item_tower.encoder.state_dict().items())
    batch = next(iter(train))
    m.calculate_loss(batch)
    assert "dm" not in m.last_losses


@pytest.mark.parametrize("source", ["warmup", "encoder"])
def test_the_warmups_x_survives_a_stage_resume_and_is_what_the_joint_losses_read(tmp_path, source):
    _, trainer, train, valid, _ = build(tmp_path, ttds_text_source=source)
    trainer.run_stages(train, valid)
    m = trainer.model
    x, sids, head = m.item_x.clone(), m.item_sid.clone(), copy.deepcopy(m.x_head.state_dict())
    _, again, train2, valid2, _ = build(tmp_path, ttds_text_source=source)  # the stage file is loaded
    m2 = again.model
    assert m2._x_ready == (source == "encoder")  # warmup: X exists only once the stage has run or loaded
    again.run_stages(train2, valid2)
    assert bool(m2.x_ready) and m2._x_ready and torch.equal(m2.item_x, x) and torch.equal(m2.item_sid, sids)
    assert all(torch.equal(v, m2.x_head.state_dict()[k]) for k, v in head.items())
    if source == "encoder":  # the warm-up trained x_head, and the stage file kept it
        assert head and not torch.equal(head["weight"], build(tmp_path / "fresh", ttds_text_source=source)[1]
                                        .model.x_head.weight)
    assert m2.refresh_ids()["item_changed"] == 0
    batch = next(iter(train2))
    m2.train()
    before = float(m2.batch_dm_loss(batch))
    with torch.no_grad():
        m2.item_x += 100.0  # L_ID's target is the stored X
    assert float(m2.batch_dm_loss(batch)) > 100 * before


def test_a_checkpoint_from_before_x_was_stored_loads_and_reads_live_x(tmp_path):
    # such a checkpoint's config has no ttds_text_source: the LLM's own X
    _, trainer, train, *_ = build(tmp_path, ttds_tower_learning_rate="~", ttds_text_source=None)
    m = trainer.model
    assert m.text_source == "warmup"
    assert m.tower_lr is None and m.param_groups([m.level_emb]) == [m.level_emb]
    m.train_stage("warmup", train, None, stage_cfg(trainer))
    old = {k: v for k, v in m.state_dict().items() if k not in ("item_x", "user_x", "x_ready")}
    m.load_state_dict(old)
    assert not bool(m.x_ready)
    assert torch.equal(m.text_targets("item"), m.text_repr(m.item_text_ids[1:]))
    with pytest.raises(ValueError, match="ttds_tower_learning_rate"):
        build(tmp_path / "bad", ttds_tower_learning_rate="fast")
