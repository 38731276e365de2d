"""Trainers: RecBole's Trainer with named pre-training stages."""

from recbole_genrec.trainer.staged import StagedTrainer, atomic_torch_save

__all__ = ["StagedTrainer", "atomic_torch_save"]
