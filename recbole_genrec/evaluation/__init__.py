"""Evaluation options shared by every model of a run, RecBole's included; the warm/cold and
unseen-user protocols (:mod:`.protocols`) and the result tables and plots (:mod:`.report`).

The names below load their module on first use, so ``python -m recbole_genrec.evaluation.report``
runs the report module once (no runpy warning) and importing one submodule loads only what it needs.
"""

import importlib

_EXPORTS = {
    "install_history_mask": "history_mask",
    "WARM_COLD_EVAL_ARGS": "protocols",
    "parse_seeds": "protocols",
    "restricted_catalogue": "protocols",
    "run_unseen_users": "protocols",
    "run_warm_cold": "protocols",
    "subset_loader": "protocols",
    "warm_cold_metrics": "protocols",
    "warm_items": "protocols",
    "write_seed_table": "report",
    "write_table": "report",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
