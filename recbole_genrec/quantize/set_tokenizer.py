"""SETRec's semantic tokenizer: one MLP autoencoder whose latent is split into ``n_sem``
order-agnostic continuous semantic tokens (Lin et al., SETRec, Eq. 3-4).

``z = Enc(s)`` with ``z = [z_1; ...; z_n]``, each ``z_k`` of the backbone width; the decoder
reconstructs ``s`` from ``z`` and ``L_rec = ||s - Dec(z)||^2`` (Eq. 4) trains it jointly with the
recommender (Eq. 8). No quantisation: tokens are continuous, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.quantize.rq_vae import mlp


class SetTokenizer(nn.Module):
    def __init__(self, in_dim: int, token_dim: int, n_sem: int, hidden=(512, 256, 128)):
        super().__init__()
        self.n_sem, self.token_dim = n_sem, token_dim
        self.encoder = mlp([in_dim, *hidden, n_sem * token_dim])
        self.decoder = mlp([n_sem * token_dim, *reversed(hidden), in_dim])

    def forward(self, semantic: torch.Tensor) -> torch.Tensor:
        """``semantic [N, in_dim] -> tokens [N, n_sem, token_dim]`` (Eq. 3)."""
        return self.encoder(semantic).view(-1, self.n_sem, self.token_dim)

    def reconstruction_loss(self, semantic: torch.Tensor) -> torch.Tensor:
        """Eq. 4: squared error of the decoder's reconstruction."""
        return F.mse_loss(self.decoder(self.encoder(semantic)), semantic)
