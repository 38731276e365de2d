"""TokenRec's masked vector-quantised tokenizer (MQ-Tokenizer; Qu et al., TokenRec, Sec. II-C).

One instance tokenizes items, another users, from their collaborative (LightGCN) embeddings:
- masking (Eq. 2-3): each element is zeroed with probability ``mask_ratio`` (rho); the mask is
  redrawn at every epoch (``redraw_mask``) and never applied at inference;
- K-way encoder (Eq. 4): one MLP per sub-codebook, ``a^k = MLP^k(masked embedding)``;
- quantisation (Eq. 5-6): ``w^k = argmin_l ||a^k - c^k_l||``, the token is ``c^k_{w^k}``;
- K-to-1 decoder (Eq. 9): the K codewords are average-pooled and decoded by an MLP;
- loss (Eq. 10-13): ``||q - r||^2 + sum_k ||sg[a^k] - c^k||^2 + beta * sum_k ||a^k - sg[c^k]||^2``
  with straight-through gradients from the decoder input to the encoders.
Codebooks are initialised by k-means on the first encodings and dead codewords are re-seeded
from random encodings every ``reseed_every`` epochs (default 50, the official code's k-means
re-initialisation cadence). Re-seeding after every epoch made the encoder chase codewords that
jump each epoch: on tightly clustered inputs (ml-100k's LightGCN user vectors, mean mutual cosine
0.62, ~4 users per code) the scale of the encodings grew without bound and the loss diverged
(0.6 -> 12 in 200 epochs, codewords of norm ~300). An entity's
identifier is its K codes; identical tuples are allowed (retrieval happens in the CF space) and
their rate is logged.
"""

from __future__ import annotations

from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.quantize.kmeans import kmeans
from recbole_genrec.quantize.rq_vae import collision_rate, mlp


class MQTokenizer(nn.Module):
    def __init__(self, in_dim, n_books=3, book_size=256, code_dim=64, hidden=(128,), mask_ratio=0.2, beta=0.25):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.n_books, self.book_size, self.mask_ratio, self.beta = n_books, book_size, mask_ratio, beta
        self.encoders = nn.ModuleList(mlp([in_dim, *hidden, code_dim]) for _ in range(n_books))
        self.codebooks = nn.Parameter(torch.randn(n_books, book_size, code_dim) * 0.1)
        self.decoder = mlp([code_dim, *reversed(hidden), in_dim])
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def draw_mask(self, shape, generator=None) -> torch.Tensor:
        """Eq. 2: keep-mask with ``P(masked) = mask_ratio`` per element."""
        return (torch.rand(shape, generator=generator) >= self.mask_ratio).float()

    def encode(self, x) -> torch.Tensor:
        """Eq. 4: ``[N, K, code_dim]``."""
        return torch.stack([enc(x) for enc in self.encoders], 1)

    def quantize(self, a):
        """Eq. 5-6: codes ``[N, K]`` and codewords ``[N, K, code_dim]``."""
        dist = torch.cdist(a.transpose(0, 1), self.codebooks)  # [K, N, L]
        codes = dist.argmin(-1).T
        words = self.codebooks[torch.arange(self.n_books).unsqueeze(0), codes]
        return codes, words

    def forward(self, x, mask=None):
        a = self.encode(x if mask is None else x * mask)
        codes, words = self.quantize(a)
        st = a + (words - a).detach()  # straight-through estimator
        recon = self.decoder(st.mean(1))  # Eq. 9: average-pool the K codewords, then the MLP
        cb = F.mse_loss(words, a.detach(), reduction="none").sum(-1).sum(-1).mean()  # Eq. 11
        cm = F.mse_loss(a, words.detach(), reduction="none").sum(-1).sum(-1).mean()  # Eq. 12
        rec = F.mse_loss(recon, x, reduction="none").sum(-1).mean()  # Eq. 10
        return {"codes": codes, "a": a, "recon": recon, "loss": rec + cb + self.beta * cm,
                "recon_loss": rec, "codebook_loss": cb, "commitment_loss": cm}

    @torch.no_grad()
    def init_codebooks(self, x, generator=None):
        a = self.encode(x)
        for k in range(self.n_books):
            self.codebooks.data[k] = kmeans(a[:, k], self.book_size, generator=generator)
        self.initialised.fill_(True)

    @torch.no_grad()
    def reseed_dead_codes(self, a, codes, generator=None) -> int:
        moved = 0
        for k in range(self.n_books):
            dead = (torch.bincount(codes[:, k], minlength=self.book_size) == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, len(a), (len(dead),), generator=generator)
                self.codebooks.data[k, dead] = a[pick, k]
                moved += len(dead)
        return moved

    @torch.no_grad()
    def tokenize(self, x) -> torch.Tensor:
        """Codes ``[N, K]`` of unmasked embeddings (inference)."""
        return self.quantize(self.encode(x))[0]


def mq_stats(codes: torch.Tensor, book_size: int) -> dict:
    stats = {f"used@{k}": round(float((torch.bincount(codes[:, k], minlength=book_size) > 0).float().mean()), 4)
             for k in range(codes.shape[1])}
    stats["collision_rate"] = round(collision_rate(codes), 4)
    return stats


def train_mq_tokenizer(model: MQTokenizer, x, epochs=100, lr=1e-3, batch_size=128, seed=2020,
                       log_every=10, name="MQ-Tokenizer", show_progress=False, reseed_every=50) -> list[float]:
    """AdamW training on ``x [N, d]`` with a fresh mask per epoch; dead codewords are re-seeded
    after every ``reseed_every``-th epoch (never after the last). Returns the loss per epoch."""
    if not isinstance(reseed_every, int) or isinstance(reseed_every, bool) or reseed_every < 1:
        raise ValueError(f"mq_reseed_every: a positive number of epochs, got {reseed_every!r}")
    logger = getLogger()
    generator = torch.Generator().manual_seed(seed)
    if not bool(model.initialised):
        model.init_codebooks(x, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    epochs_iter = range(epochs)
    if show_progress:
        from tqdm import tqdm

        epochs_iter = tqdm(epochs_iter, desc=name)
    for epoch in epochs_iter:
        model.train()
        mask = model.draw_mask(x.shape, generator).to(x.device)  # Eq. 2-3, redrawn every epoch
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            out = model(x[idx], mask[idx])
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            total += float(out["loss"]) * len(idx)
        history.append(total / len(x))
        model.eval()
        with torch.no_grad():
            a = model.encode(x)
            codes = model.quantize(a)[0]
        if (epoch + 1) % reseed_every == 0 and epoch < epochs - 1:
            model.reseed_dead_codes(a, codes, generator)
        if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
            logger.info(f"{name} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}; {mq_stats(codes, model.book_size)}")
    return history
