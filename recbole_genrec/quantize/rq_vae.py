"""Residual-quantised VAE (RQ-VAE) for semantic item IDs (TIGER; LETTER's losses as options).

x -> MLP encoder -> z (``e_dim``) -> L levels of nearest-codeword quantisation of the residual
(r_0 = z, c_l = argmin_k ||r_l - e^l_k||, r_{l+1} = r_l - e^l_{c_l}) -> z_q = sum_l e^l_{c_l}
-> MLP decoder -> x_hat.

Loss (TIGER, Rajput et al. 2023, Sec. 3.1): ||x - x_hat||^2 + sum_l ||sg[r_l] - e_{c_l}||^2
+ beta * ||r_l - sg[e_{c_l}]||^2, with the straight-through estimator z + sg[z_q - z] feeding the
decoder. Codebooks are initialised by k-means on the first encoder outputs (per level, on the
residuals) and unused codes are re-seeded from random residuals after each epoch.

LETTER (Wang et al. 2024, Sec. 3.1) adds, weighted by ``cf_weight`` and ``div_weight``:
- collaborative regularisation (Eq. 2): in-batch softmax between the quantised latent and the
  item's frozen CF embedding (dot-product logits, the positive is the item itself). The latent is
  the straight-through one, z + sg[z_q - z] (as in LETTER's code), so this loss moves the
  *encoder* and hence the code assignment; a plain sum of codewords would only move codebooks;
- diversity regularisation (Eq. 3): each level's codewords are grouped by size-constrained k-means;
  the anchor is the item's assigned codeword e_{c_l} (LETTER's ``diversity_loss`` uses the selected
  embedding, not the residual), its positive a random *other* codeword of the same group, in a
  softmax over the level's codewords (own code masked), temperature ``div_tau``. The positive is
  drawn with a generator on the tensors' device, separate from the training order's generator, so
  switching a regulariser on does not change which batches or initialisations are drawn.
"""

from __future__ import annotations

import copy
import math
from logging import getLogger

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.quantize.kmeans import constrained_kmeans, kmeans, sinkhorn


def mlp(dims, dropout=0.0) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    """TIGER's RQ-VAE. LETTER's recipe (:mod:`recbole_genrec.quantize.letter_tokenizer`) sets
    ``level_loss="mean"`` (the quantisation loss averaged over levels; TIGER sums it) and
    ``sk_epsilon > 0`` (while training, the last level is assigned by a Sinkhorn plan over the batch,
    ``sk_iters`` iterations, instead of the nearest codeword)."""

    def __init__(self, in_dim, hidden=(512, 256, 128), e_dim=32, levels=3, codebook_size=256,
                 beta=0.25, dropout=0.0, decoder=True, level_loss="sum", sk_epsilon=0.0, sk_iters=50):
        super().__init__()
        if level_loss not in ("sum", "mean"):
            raise ValueError(f"level_loss must be 'sum' or 'mean', got {level_loss!r}")
        self.levels, self.codebook_size, self.beta = levels, codebook_size, beta
        self.level_loss, self.sk_epsilon, self.sk_iters = level_loss, float(sk_epsilon), int(sk_iters)
        self.encoder = mlp([in_dim, *hidden, e_dim], dropout)
        # TTDS's towers have no decoder: the LLM reconstructs the text representation (L_ID)
        self.decoder = mlp([e_dim, *reversed(hidden), in_dim], dropout) if decoder else None
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, e_dim) / math.sqrt(e_dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        # inputs are standardised per dimension with statistics fixed at initialisation
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_std", torch.ones(in_dim))
        # LETTER diversity: codeword groups per level (-1: not computed)
        self.register_buffer("code_groups", torch.full((levels, codebook_size), -1, dtype=torch.long))

    def quantize(self, z, return_codewords=False, balanced_last=None):
        """Return ``z_q [n, e]``, ``codes [n, L]``, ``residuals [L, n, e]`` and the codebook loss
        (and, with ``return_codewords``, the selected codewords ``[L, n, e]``, differentiable
        w.r.t. the codebooks). ``balanced_last`` (default: while training, when ``sk_epsilon > 0``):
        the last level's codes are the argmax of a Sinkhorn plan over the rows of ``z``."""
        if balanced_last is None:
            balanced_last = self.training
        balanced_last = balanced_last and self.sk_epsilon > 0 and len(z) > 1
        residual, z_q = z, torch.zeros_like(z)
        codes, residuals, codewords, vq_loss = [], [], [], z.new_zeros(())
        for level in range(self.levels):
            book = self.codebooks[level]
            with torch.no_grad():  # the codes only: the losses below carry the gradients
                distances = torch.cdist(residual, book)
            if balanced_last and level == self.levels - 1:
                idx = sinkhorn(distances ** 2, self.sk_epsilon, self.sk_iters).argmax(1)
            else:
                idx = distances.argmin(1)
            e = book[idx]
            vq_loss = vq_loss + F.mse_loss(e, residual.detach()) + self.beta * F.mse_loss(residual, e.detach())
            residuals.append(residual)
            codewords.append(e)
            codes.append(idx)
            z_q = z_q + e
            residual = residual - e.detach()
        if self.level_loss == "mean":
            vq_loss = vq_loss / self.levels
        out = (z_q, torch.stack(codes, 1), torch.stack(residuals), vq_loss)
        return (*out, torch.stack(codewords)) if return_codewords else out

    def standardise(self, x):
        return (x - self.x_mean) / self.x_std

    def encode(self, x):
        return self.encoder(self.standardise(x))

    def forward(self, x):
        z = self.encode(x)
        z_q, codes, residuals, vq_loss, codewords = self.quantize(z, return_codewords=True)
        z_st = z + (z_q - z).detach()  # straight-through estimator: forward z_q, gradient to z
        x_hat = self.decoder(z_st)
        return {"z": z, "z_q": z_q, "z_st": z_st, "codes": codes, "residuals": residuals, "codewords": codewords,
                "recon_loss": F.mse_loss(x_hat, self.standardise(x)), "vq_loss": vq_loss}

    @torch.no_grad()
    def init_codebooks(self, x, generator=None):
        """Fix the input standardisation, then k-means-initialise every level on the residuals."""
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(x.std(0).clamp(min=1e-6))
        residual = self.encode(x)
        for level in range(self.levels):
            self.codebooks.data[level] = kmeans(residual, self.codebook_size, generator=generator)
            idx = torch.cdist(residual, self.codebooks[level]).argmin(1)
            residual = residual - self.codebooks[level][idx]
        self.initialised.fill_(True)

    @torch.no_grad()
    def reseed_dead_codes(self, residuals, codes, generator=None) -> int:
        """Move codewords no item used onto random residuals of their level; return how many."""
        moved = 0
        for level in range(self.levels):
            counts = torch.bincount(codes[:, level], minlength=self.codebook_size)
            dead = (counts == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(0, residuals.shape[1], (len(dead),), generator=generator)
                self.codebooks.data[level, dead] = residuals[level, pick]
                moved += len(dead)
        return moved

    @torch.no_grad()
    def get_codes(self, x, batch_size=4096) -> torch.Tensor:
        return torch.cat([self.quantize(self.encode(x[i:i + batch_size]))[1]
                          for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def last_level_costs(self, x) -> torch.Tensor:
        """Squared distances ``[n, K]`` of the last-level residuals to the last codebook."""
        _, _, residuals, _ = self.quantize(self.encode(x))
        return torch.cdist(residuals[-1], self.codebooks[-1]) ** 2

    # ----- LETTER regularisers -------------------------------------------------------------
    @staticmethod
    def collaborative_loss(z_st, cf_emb):
        """LETTER's collaborative alignment (Eq. 2): in-batch softmax of the straight-through
        quantised latent ``z_st`` against frozen CF rows, the item's own row positive."""
        logits = z_st @ cf_emb.T
        return F.cross_entropy(logits, torch.arange(len(z_st), device=z_st.device))

    @torch.no_grad()
    def update_code_groups(self, n_groups: int, generator=None):
        """Group each level's codewords by size-constrained k-means (LETTER diversity)."""
        for level in range(self.levels):
            self.code_groups[level] = constrained_kmeans(self.codebooks[level].detach(), n_groups,
                                                         generator=generator)

    def diversity_loss(self, codewords, codes, tau=1.0, generator=None):
        """LETTER Eq. 3: pull each assigned codeword ``codewords [L, n, e]`` towards another codeword
        of its group. ``generator`` must live on the tensors' device (a clear error otherwise)."""
        if (self.code_groups < 0).any():
            return codewords.new_zeros(())
        if generator is not None and torch.device(generator.device).type != codewords.device.type:
            raise ValueError(f"diversity_loss: the generator is on {generator.device} but the codewords are on "
                             f"{codewords.device}; create it with torch.Generator(device=codewords.device)")
        loss = codewords.new_zeros(())
        for level in range(self.levels):
            groups = self.code_groups[level]
            own = codes[:, level]
            same = groups[own].unsqueeze(1) == groups.unsqueeze(0)  # [n, K]
            same[torch.arange(len(own)), own] = False
            has_peer = same.any(1)
            if not has_peer.any():
                continue
            weights = same[has_peer].float()
            positive = torch.multinomial(weights, 1, generator=generator).squeeze(1)
            logits = codewords[level][has_peer] @ self.codebooks[level].T / tau
            logits = logits.masked_fill(F.one_hot(own[has_peer], self.codebook_size).bool(), float("-inf"))
            loss = loss + F.cross_entropy(logits, positive)
        return loss / self.levels


def codebook_stats(codes: torch.Tensor, codebook_size: int) -> dict:
    """Per-level used-code fraction and perplexity, and the collision rate of full tuples."""
    stats = {}
    for level in range(codes.shape[1]):
        counts = torch.bincount(codes[:, level], minlength=codebook_size).float()
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        stats[f"used@{level}"] = round(float((counts > 0).float().mean()), 4)
        stats[f"perplexity@{level}"] = round(float(entropy.exp()), 2)
    stats["collision_rate"] = round(collision_rate(codes), 4)
    return stats


def collision_rate(codes: torch.Tensor) -> float:
    """Fraction of items whose code tuple is shared with an earlier item."""
    return 1.0 - len(torch.unique(codes, dim=0)) / max(len(codes), 1)


def train_rq_vae(model: RQVAE, x: torch.Tensor, epochs=100, lr=1e-3, batch_size=256, weight_decay=1e-4,
                 cf_emb=None, cf_weight=0.0, div_weight=0.0, div_groups=10, div_tau=1.0,
                 seed=2020, log_every=None, show_progress=False, reseed_dead=True, eval_step=None) -> dict:
    """Train ``model`` on item vectors ``x [n, d]`` (rows are items). Returns ``{"loss": [per epoch],
    "best_epoch", "best_collision_rate"}``.

    ``cf_emb [n, e_dim]`` with ``cf_weight > 0`` and ``div_weight > 0`` switch on LETTER's
    collaborative and diversity regularisers. TIGER's recipe (the defaults) re-seeds unused
    codewords after each epoch and keeps the last epoch; LETTER's (``reseed_dead=False``,
    ``eval_step=k``) checks the collision rate of the nearest-codeword codes every ``k`` epochs and
    keeps the checked epoch with the fewest collisions (the first on a tie).
    """
    logger = getLogger()
    name = "LETTER RQ-VAE" if eval_step else "RQ-VAE"
    if log_every is None:  # about 20 lines (at checked epochs when there are any)
        log_every = eval_step * max(1, epochs // (20 * eval_step)) if eval_step else 10
    generator = torch.Generator().manual_seed(seed)  # initialisation, batch order, dead codes
    # the diversity regulariser draws from its own generators, so switching it on leaves the
    # initialisation, batch order and dead-code draws unchanged
    div_generator = torch.Generator(device=x.device).manual_seed(seed + 1)  # positives
    group_generator = torch.Generator().manual_seed(seed + 2)  # codeword groups (k-means on CPU tensors)
    if not bool(model.initialised):
        model.init_codebooks(x, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history, best = [], {"rate": float("inf"), "epoch": None, "state": None}
    epoch_iter = range(epochs)
    if show_progress:
        from tqdm import tqdm

        epoch_iter = tqdm(epoch_iter, desc=name)
    for epoch in epoch_iter:
        model.train()
        if div_weight > 0:
            model.update_code_groups(div_groups, generator=group_generator)
        order = torch.randperm(len(x), generator=generator)
        total, parts = 0.0, {"recon": 0.0, "vq": 0.0, "cf": 0.0, "div": 0.0}
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            out = model(x[idx])
            loss = out["recon_loss"] + out["vq_loss"]
            parts["recon"] += float(out["recon_loss"]) * len(idx)
            parts["vq"] += float(out["vq_loss"]) * len(idx)
            if cf_weight > 0 and cf_emb is not None:
                cf = model.collaborative_loss(out["z_st"], cf_emb[idx])
                loss = loss + cf_weight * cf
                parts["cf"] += float(cf) * len(idx)
            if div_weight > 0:
                div = model.diversity_loss(out["codewords"], out["codes"], tau=div_tau, generator=div_generator)
                loss = loss + div_weight * div
                parts["div"] += float(div) * len(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: the loss became {float(loss)} at epoch {epoch + 1} of the "
                                         f"tokenizer stage; try a lower tokenizer_learning_rate (now {lr})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        history.append(total / len(x))
        model.eval()
        last = epoch == epochs - 1
        line = f"{name} epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f} (" + ", ".join(
            f"{k} {v / len(x):.4f}" for k, v in parts.items() if v) + ")"
        if reseed_dead:
            with torch.no_grad():
                out = model(x)
            dead = model.reseed_dead_codes(out["residuals"], out["codes"], generator=generator) if not last else 0
            if (epoch + 1) % log_every == 0 or last:
                logger.info(f"{line}; re-seeded {dead} dead codes; {codebook_stats(out['codes'], model.codebook_size)}")
        if eval_step and ((epoch + 1) % eval_step == 0 or last):
            codes = model.get_codes(x)
            rate = collision_rate(codes)
            if rate < best["rate"]:
                best = {"rate": rate, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
            if (epoch + 1) % log_every == 0 or last:
                logger.info(f"{line}; {codebook_stats(codes, model.codebook_size)}; fewest collisions so far "
                            f"{best['rate']:.4f} (epoch {best['epoch']})")
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        model.eval()
    rate = best["rate"] if best["epoch"] is not None else None
    return {"loss": history, "best_epoch": best["epoch"], "best_collision_rate": None if rate is None else round(rate, 4)}
