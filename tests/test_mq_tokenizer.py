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
    history = train_mq_tokenizer(model, x, epochs=40, lr=3e-3, batch_size=64, log_every=1000)
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
