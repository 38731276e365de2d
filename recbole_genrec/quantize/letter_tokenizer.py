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

The first three are options of TIGER's :class:`~recbole_genrec.quantize.rq_vae.RQVAE` and
:func:`~recbole_genrec.quantize.rq_vae.train_rq_vae`, set here; the last is this module's.
"""

from __future__ import annotations

from logging import getLogger

import torch

from recbole_genrec.quantize.codes import build_code_table
from recbole_genrec.quantize.rq_vae import RQVAE, collision_rate, train_rq_vae


class LetterRQVAE(RQVAE):
    """RQ-VAE with LETTER's level-averaged quantisation loss and Sinkhorn-balanced last level."""

    def __init__(self, *args, sk_epsilon: float = 0.003, sk_iters: int = 50, **kwargs):
        super().__init__(*args, level_loss="mean", sk_epsilon=sk_epsilon, sk_iters=sk_iters, **kwargs)

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
                        eval_step=50, **kwargs) -> dict:
    """Train ``model`` on item vectors ``x [n, d]`` as LETTER's ``RQ-VAE/trainer.py`` does: no
    re-seeding of unused codewords, and the checked epoch (every ``eval_step``) with the fewest
    collisions is kept. Other arguments as :func:`~recbole_genrec.quantize.rq_vae.train_rq_vae`."""
    if isinstance(eval_step, bool) or not isinstance(eval_step, int) or eval_step < 1:
        raise ValueError(f"tokenizer_eval_step: a positive number of epochs between collision checks, got {eval_step!r}")
    return train_rq_vae(model, x, epochs=epochs, lr=lr, batch_size=batch_size, reseed_dead=False,
                        eval_step=eval_step, **kwargs)


def letter_code_table(model: LetterRQVAE, x: torch.Tensor, suffix_size: int, rounds: int = 20) -> torch.Tensor:
    """One-to-one code table ``[n, L + 1]``: :meth:`LetterRQVAE.resolve_collisions`, then TIGER's
    dedup suffix for what still collides."""
    codes, used = model.resolve_collisions(x, rounds)
    getLogger().info(f"LETTER codes: collision rate {collision_rate(model.get_codes(x)):.4f} (nearest codewords), "
                     f"{collision_rate(codes):.4f} after {used} round(s) of per-group Sinkhorn")
    return build_code_table(codes, "suffix", suffix_size=suffix_size)
