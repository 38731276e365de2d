"""Evaluation options shared by every model of a run, RecBole's included."""

from recbole_genrec.evaluation.history_mask import install_history_mask

__all__ = ["install_history_mask"]
