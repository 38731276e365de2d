"""Evaluation options shared by every model of a run, RecBole's included; the warm/cold and
unseen-user protocols (:mod:`.protocols`) and the result tables and plots (:mod:`.report`)."""

from recbole_genrec.evaluation.history_mask import install_history_mask
from recbole_genrec.evaluation.protocols import (
    WARM_COLD_EVAL_ARGS,
    parse_seeds,
    restricted_catalogue,
    run_unseen_users,
    run_warm_cold,
    subset_loader,
    warm_cold_metrics,
    warm_items,
)
from recbole_genrec.evaluation.report import write_seed_table, write_table

__all__ = [
    "install_history_mask",
    "WARM_COLD_EVAL_ARGS",
    "parse_seeds",
    "restricted_catalogue",
    "run_unseen_users",
    "run_warm_cold",
    "subset_loader",
    "warm_cold_metrics",
    "warm_items",
    "write_seed_table",
    "write_table",
]
