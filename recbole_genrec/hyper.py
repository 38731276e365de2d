"""Hyper-parameter search, RecBole style, without ray: the equivalent of RecBole's ``run_hyper``.

RecBole's :class:`recbole.trainer.HyperTuning` (hyperopt; needs ``pip install
"recbole_genrec[hyper]"``) drives the search; every trial is one :func:`run_recbole_genrec` run,
so any model, ours or RecBole's, can be tuned. A params file has one line per searched option,
as RecBole's ``hyper.test``::

    learning_rate choice [0.01,0.005]
    train_batch_size choice [64,128]
    dropout_prob uniform 0.1,0.5

``algo`` is ``exhaustive`` (every combination of ``choice`` values), ``random`` or ``bayes``
(TPE), the last two for ``max_evals`` trials. The result file is RecBole's
(``HyperTuning.export_result``): per trial its parameters, valid and test results.

Trials share ``checkpoint_dir``, and ``resume_stages`` (on by default) loads a pre-training
stage (TIGER's tokenizer, SETRec's CF model, ...) whose fingerprint (stage config, data, code,
model signature, seed) matches a stage file: a search over recommender-stage options (e.g.
``learning_rate``) trains each earlier stage once, a search over a stage option (e.g. ``rq_beta``
or ``tokenizer_learning_rate``) trains it once per value.

``recbole.trainer.hyper_tuning`` imports neither ray nor ``recbole.quick_start`` (which does).
"""

from __future__ import annotations

import sys
from logging import getLogger

ALGOS = ("exhaustive", "random", "bayes")


def require_hyperopt():
    try:
        import hyperopt  # noqa: F401
    except ImportError as error:
        raise ImportError('hyper-parameter search needs hyperopt: pip install "recbole_genrec[hyper]"') from error


def genrec_objective(model, dataset, config_dict=None, saved=True):
    """An objective with RecBole's signature ``(config_dict, config_file_list) -> dict``.

    The trial's parameters override ``config_dict``; ``model`` and ``dataset`` are passed to
    :func:`run_recbole_genrec` by name (RecBole's ``Config`` resolves a model named only in a
    config dict with RecBole's own registry, which lacks ours). Returns the keys of
    :func:`recbole_genrec.quick_start.objective_function`.
    """
    from recbole_genrec.quick_start import run_recbole_genrec

    base = {key: value for key, value in (config_dict or {}).items() if key not in ("model", "dataset")}

    def objective(params, config_file_list=None):
        result = run_recbole_genrec(model=model, dataset=dataset, config_file_list=config_file_list,
                                    config_dict={**base, **(params or {})}, saved=saved)
        return {
            "model": model,
            "best_valid_score": result["best_valid_score"],
            "valid_score_bigger": result["valid_score_bigger"],
            "best_valid_result": result["best_valid_result"],
            "test_result": result["test_result"],
        }

    return objective


def command_line_keys(argv=None) -> set:
    """The ``--key=value`` names RecBole's ``Config`` reads from the command line."""
    argv = sys.argv[1:] if argv is None else argv
    return {arg[2:].split("=")[0] for arg in argv if arg.startswith("--") and len(arg[2:].split("=")) == 2}


def exhaustive_search(new_ids, domain, trials, seed, max_failures=1000):
    """RecBole's ``exhaustive_search`` (hyperopt ``algo``: draws ``choice`` combinations not tried
    yet) with the ``numpy.random.Generator`` that hyperopt >= 0.2.7 samples with; RecBole's passes a
    ``RandomState``, which today's hyperopt cannot draw from."""
    import numpy as np
    from hyperopt import pyll
    from hyperopt.base import miscs_update_idxs_vals

    def key(vals):
        return frozenset((name, value[0] if len(value) else None) for name, value in vals.items())

    seen = {key(trial["misc"]["vals"]) for trial in trials.trials}
    rng = np.random.default_rng(seed)
    docs = []
    for new_id in new_ids:
        for _ in range(max_failures + 1):
            idxs, vals = pyll.rec_eval(domain.s_idxs_vals, memo={domain.s_new_ids: [new_id], domain.s_rng: rng})
            if key(vals) not in seen:
                break
        else:
            return docs  # every combination tried
        seen.add(key(vals))
        misc = dict(tid=new_id, cmd=domain.cmd, workdir=domain.workdir)
        miscs_update_idxs_vals([misc], idxs, vals)
        docs.extend(trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc]))
    return docs


def build_space(params_file=None, params_dict=None) -> dict:
    """hyperopt's space from RecBole's params file or ``HyperTuning``'s params dict."""
    from recbole.trainer.hyper_tuning import HyperTuning

    if params_file:
        return HyperTuning._build_space_from_file(params_file)
    if params_dict:
        return HyperTuning._build_space_from_dict(params_dict)
    raise ValueError("give the searched options: params_file (e.g. hyper.test) or params_dict")


def search_space(params_file=None, params_dict=None, algo="exhaustive", max_evals=100):
    """``(space, max_evals)`` of a search; ``ValueError`` (``ImportError`` without hyperopt) for a
    search that cannot run as asked, before anything is trained."""
    require_hyperopt()
    from recbole.trainer.hyper_tuning import _parameters, _spacesize

    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {', '.join(ALGOS)}, not {algo!r}")
    space = build_space(params_file, params_dict)
    searched = set(space)
    if not searched:
        raise ValueError(f"no searched option in {params_file or params_dict!r} "
                         "(lines like 'learning_rate choice [0.01,0.005]')")
    if algo == "exhaustive":
        continuous = sorted(searched - set(_parameters(space)))
        if continuous:
            raise ValueError(f"exhaustive search takes 'choice' options only, not {', '.join(continuous)}: "
                             "use algo random or bayes")
        max_evals = int(_spacesize(space))
    # RecBole's Config gives the command line priority over a trial's config_dict
    clash = sorted(searched & (command_line_keys() | {"model", "dataset"}))
    if clash:
        raise ValueError(f"{', '.join(clash)} searched and also given on the command line (or as model/dataset): "
                         "the command line would win in every trial")
    return space, max_evals


def run_hyper(model, dataset, params_file=None, params_dict=None, config_file_list=None, config_dict=None,
              algo="exhaustive", max_evals=100, early_stop=None, output_file=None, saved=True):
    """Search ``params_file`` (RecBole's format) or ``params_dict`` (``HyperTuning``'s
    ``{"choice": {name: [values]}, "uniform": {name: [low, high]}, ...}``) for ``model`` on
    ``dataset``; write RecBole's result file to ``output_file`` (default
    ``hyper-<model>-<dataset>.result``), log and print the best parameters; return the
    ``HyperTuning`` (``best_params``, ``best_score``, ``params2result``).

    ``exhaustive`` runs the whole grid (``max_evals`` is its size); ``random`` and ``bayes`` run
    ``max_evals`` trials. ``early_stop`` stops after that many trials without a better valid
    score (hyperopt's ``no_progress_loss``; default: never for ``exhaustive``, 10 otherwise, as
    RecBole's ``run_hyper``)."""
    from recbole.trainer.hyper_tuning import HyperTuning

    space, max_evals = search_space(params_file, params_dict, algo, max_evals)
    early_stop = early_stop or (max_evals if algo == "exhaustive" else 10)
    hp = HyperTuning(genrec_objective(model, dataset, config_dict, saved), space=space,
                     fixed_config_file_list=config_file_list, algo=exhaustive_search if algo == "exhaustive" else algo,
                     max_evals=max_evals, early_stop=early_stop)
    hp.run()
    output_file = output_file or f"hyper-{model}-{dataset}.result"
    hp.export_result(output_file=output_file)
    best = hp.params2result[hp.params2str(hp.best_params)]
    logger = getLogger()
    for line in (f"hyper-parameter search ({algo}, {len(hp.params2result)} trials) written to {output_file}",
                 f"best params: {hp.best_params}", f"best valid: {best['best_valid_result']}",
                 f"best test: {best['test_result']}"):
        logger.info(line)
        print(line)
    return hp
