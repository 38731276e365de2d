"""TokenRec's MQ-Tokenizer: masking, K-way quantisation, straight-through gradients."""

import pytest
import torch

from recbole_genrec.quantize.mq_tokenizer import MQTokenizer, mq_stats, train_mq_tokenizer


def clustered(n_clusters=16, per=20, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g) * 2
    return centres.repeat_interleave(per, 0) + 0.2 * torch.randn(n_clusters * per, dim, generator=g)


def test_mask_ratio_is_respected_and_redrawn():
    model = MQTokenizer(16, mask_ratio=0.2)
    g = torch.Generator().manual_seed(0)
    m1, m2 = model.draw_mask((2000, 16), g), model.draw_mask((2000, 16), g)
    assert abs(1 - float(m1.mean()) - 0.2) < 0.01
    assert not torch.equal(m1, m2)
    with pytest.raises(ValueError, match="mask_ratio"):
        MQTokenizer(16, mask_ratio=1.0)


def test_every_sub_codebook_is_used_and_loss_falls():
    torch.manual_seed(0)
    x = clustered()
    model = MQTokenizer(16, n_books=3, book_size=16, code_dim=8, hidden=(32,))
    history = train_mq_tokenizer(model, x, epochs=40, lr=3e-3, batch_size=64, log_every=1000,
                                 reseed_every=10)  # a short run: re-seed dead codes more often than the default
    assert history[-1] < history[0]
    codes = model.tokenize(x)
    stats = mq_stats(codes, 16)
    for k in range(3):
        assert stats[f"used@{k}"] >= 0.5  # no total collapse of any sub-codebook
    # the 16 clusters are told apart: at least one distinct tuple per cluster
    assert len(torch.unique(codes, dim=0)) >= 16


def test_straight_through_gradients_reach_every_encoder():
    x = clustered()[:32]
    model = MQTokenizer(16, n_books=3, book_size=8, code_dim=8, hidden=(16,))
    model.init_codebooks(x)
    out = model(x, model.draw_mask(x.shape))
    out["recon_loss"].backward()  # the reconstruction alone reaches the encoders only through STE
    for enc in model.encoders:
        assert enc[0].weight.grad is not None and enc[0].weight.grad.abs().sum() > 0
    assert model.codebooks.grad is None or model.codebooks.grad.abs().sum() == 0


def test_codewords_are_reseeded_on_the_official_cadence_and_training_stays_bounded():
    """Tightly clustered inputs with few points per code (like ml-100k's LightGCN user vectors):
    re-seeding dead codewords after every epoch made the encodings and the loss blow up; every
    ``reseed_every`` epochs (default 50) training converges."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g)
    x = 3 * u / u.norm() + 0.5 * torch.randn(300, 64, generator=g) / 8  # mean mutual cosine ~0.97

    def train(**kwargs):
        torch.manual_seed(0)
        model = MQTokenizer(64, n_books=3, book_size=64, code_dim=64, hidden=(128,))
        calls = []
        real = model.reseed_dead_codes
        model.reseed_dead_codes = lambda *a, **k: calls.append(1) or real(*a, **k)
        history = train_mq_tokenizer(model, x, epochs=100, lr=1e-3, batch_size=256, log_every=1000, **kwargs)
        return history, calls, float(model.encode(x).norm(dim=-1).mean())

    history, calls, norm = train()
    assert len(calls) == 1  # after epoch 50 (100 is the last: never after it)
    assert history[-1] < 0.5 * history[0] and history[-1] <= 1.05 * min(history) and norm < 10
    history, calls, norm = train(reseed_every=1)
    assert len(calls) == 99 and history[-1] > 100 * min(history)  # the old cadence diverges
    with pytest.raises(ValueError, match="mq_reseed_every"):
        train_mq_tokenizer(MQTokenizer(64), x, epochs=1, reseed_every=0)
