"""LETTER's tokenizer (Wang et al., CIKM 2024, Sec. 3.1), as its official RQ-VAE code trains it.

TIGER's RQ-VAE (:mod:`recbole_genrec.quantize.rq_vae`) with LETTER's regularisers (collaborative,
Eq. 2; diversity, Eq. 3: ``RQVAE.collaborative_loss`` / ``diversity_loss``), and where LETTER's code
differs from TIGER's recipe:

- **Quantisation loss averaged over levels**: the mean over levels of codebook + ``beta`` x
  commitment (TIGER sums them), so LETTER's 4 levels weigh as one against the reconstruction and the
  ``cf_weight`` x collaborative terms.
- **Balanced last level while training**: in every training batch the last level's codes are the
  argmax of a Sinkhorn plan over the batch's squared distances to the codebook (``sk_epsilon``
  0.003, ``sk_iters`` 50, distances centred to [-1, 1]), which spreads the batch evenly over the
  codewords; the other levels (and every code outside training) take the nearest codeword.
- **The epoch with the fewest collisions is kept** (nearest-codeword codes, checked every
  ``eval_step`` epochs), not the last one, and unused codewords are not re-seeded.
- **Collisions**: nearest-codeword codes, then each group of items that share a tuple is
  re-assigned on its own, with a Sinkhorn plan over the group's last-level distances, for up to 20
  rounds. What still collides gets TIGER's dedup suffix (the official code keeps such items as
  duplicates; a full-ranking evaluator needs one tuple per item).

The quantisation loop of :class:`LetterRQVAE` repeats ``RQVAE.quantize`` with those two changes
rather than adding options to it: ``rq_vae.py`` is run code of TIGER, SETRec, TokenRec and TTDS,
whose converged runs an edit would restart (merge them when that file next changes).
"""

from __future__ import annotations

import copy
from logging import getLogger

import torch
import torch.nn.functional as F

from recbole_genrec.quantize.codes import build_code_table
from recbole_genrec.quantize.kmeans import sinkhorn
from recbole_genrec.quantize.rq_vae import RQVAE, codebook_stats, collision_rate


class LetterRQVAE(RQVAE):
    """RQ-VAE with LETTER's level-averaged quantisation loss and Sinkhorn-balanced last level."""

    def __init__(self, *args, sk_epsilon: float = 0.003, sk_iters: int = 50, **kwargs):
        super().__init__(*args, **kwargs)
        self.sk_epsilon, self.sk_iters = float(sk_epsilon), int(sk_iters)

    def quantize(self, z, return_codewords=False, balanced_last=None):
        """As ``RQVAE.quantize``, with the loss averaged over levels; the last level is assigned by
        a Sinkhorn plan over the rows of ``z`` when ``balanced_last`` (default: while training)."""
        balanced_last = self.training if balanced_last is None else balanced_last
        residual, z_q = z, torch.zeros_like(z)
        codes, residuals, codewords, vq_loss = [], [], [], z.new_zeros(())
        for level in range(self.levels):
            book = self.codebooks[level]
            with torch.no_grad():  # the codes only: the losses below carry the gradients
                distances = torch.cdist(residual, book)
            if balanced_last and level == self.levels - 1 and self.sk_epsilon > 0 and len(z) > 1:
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
        out = (z_q, torch.stack(codes, 1), torch.stack(residuals), vq_loss / self.levels)
        return (*out, torch.stack(codewords)) if return_codewords else out

    @torch.no_grad()
    def resolve_collisions(self, x, rounds: int = 20) -> tuple[torch.Tensor, int]:
        """Codes ``[n, L]`` of the rows of ``x``: nearest codewords, then every group of rows that
        share a tuple re-quantised on its own with the Sinkhorn-balanced last level, for up to
        ``rounds`` rounds (LETTER's ``generate_indices.py``). Returns the codes and the rounds run."""
        was_training = self.training
        self.eval()
        codes, done = self.get_codes(x), 0
        while done < rounds:
            _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
            shared = (counts > 1).nonzero().flatten()
            if len(shared) == 0:
                break
            for group in shared.tolist():
                members = (inverse == group).nonzero().flatten()
                codes[members] = self.quantize(self.encode(x[members]), balanced_last=True)[1]
            done += 1
        self.train(was_training)
        return codes, done


def train_letter_rq_vae(model: LetterRQVAE, x: torch.Tensor, epochs=2000, lr=1e-3, batch_size=1024,
                        weight_decay=1e-4, cf_emb=None, cf_weight=0.0, div_weight=0.0, div_groups=10,
                        div_tau=1.0, eval_step=50, seed=2020, log_every=None, show_progress=False) -> dict:
    """Train ``model`` on item vectors ``x [n, d]`` (LETTER's ``RQ-VAE/trainer.py``) and leave it at
    the evaluated epoch with the lowest collision rate of its nearest-codeword codes (the first such
    epoch on a tie). Returns ``{"loss": [per epoch], "best_epoch", "best_collision_rate"}``."""
    if isinstance(eval_step, bool) or not isinstance(eval_step, int) or eval_step < 1:
        raise ValueError(f"tokenizer_eval_step: a positive number of epochs between collision checks, got {eval_step!r}")
    logger = getLogger()
    log_every = log_every or eval_step * max(1, epochs // (20 * eval_step))  # ~20 lines, at checked epochs
    generator = torch.Generator().manual_seed(seed)  # initialisation, batch order
    div_generator = torch.Generator(device=x.device).manual_seed(seed + 1)  # diversity positives
    group_generator = torch.Generator().manual_seed(seed + 2)  # codeword groups
    if not bool(model.initialised):
        model.init_codebooks(x, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    history, best = [], {"rate": float("inf"), "epoch": None, "state": None}
    epoch_iter = range(epochs)
    if show_progress:
        from tqdm import tqdm

        epoch_iter = tqdm(epoch_iter, desc="LETTER RQ-VAE")
    for epoch in epoch_iter:
        model.train()
        if div_weight > 0:
            model.update_code_groups(div_groups, generator=group_generator)
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            out = model(x[idx])
            loss = out["recon_loss"] + out["vq_loss"]
            if cf_weight > 0 and cf_emb is not None:
                loss = loss + cf_weight * model.collaborative_loss(out["z_st"], cf_emb[idx])
            if div_weight > 0:
                loss = loss + div_weight * model.diversity_loss(out["codewords"], out["codes"], tau=div_tau,
                                                                generator=div_generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"LETTER RQ-VAE: the loss became {float(loss)} at epoch {epoch + 1} of the "
                                         f"tokenizer stage; try a lower tokenizer_learning_rate (now {lr})")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
        if (epoch + 1) % eval_step == 0 or epoch == epochs - 1:
            model.eval()
            codes = model.get_codes(x)
            rate = collision_rate(codes)
            if rate < best["rate"]:
                best = {"rate": rate, "epoch": epoch + 1, "state": copy.deepcopy(model.state_dict())}
            if (epoch + 1) % log_every == 0 or epoch == epochs - 1:
                logger.info(f"LETTER RQ-VAE epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}; "
                            f"{codebook_stats(codes, model.codebook_size)}; fewest collisions so far "
                            f"{best['rate']:.4f} (epoch {best['epoch']})")
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"loss": history, "best_epoch": best["epoch"], "best_collision_rate": round(best["rate"], 4)}


def letter_code_table(model: LetterRQVAE, x: torch.Tensor, suffix_size: int, rounds: int = 20) -> torch.Tensor:
    """One-to-one code table ``[n, L + 1]``: :meth:`LetterRQVAE.resolve_collisions`, then TIGER's
    dedup suffix for what still collides."""
    codes, used = model.resolve_collisions(x, rounds)
    getLogger().info(f"LETTER codes: collision rate {collision_rate(model.get_codes(x)):.4f} (nearest codewords), "
                     f"{collision_rate(codes):.4f} after {used} round(s) of per-group Sinkhorn")
    return build_code_table(codes, "suffix", suffix_size=suffix_size)
