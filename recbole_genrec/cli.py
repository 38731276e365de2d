"""``recbole-genrec`` console script and ``run_recbole_genrec.py``: RecBole's CLI.

``--model``, ``--dataset``, ``--config_files`` (space-separated) as in RecBole's ``run_recbole.py``;
every other ``--key=value`` overrides the config (RecBole's ``Config`` reads them from argv).
``--compare=SASRec,LightGCN,TIGER`` runs several models on one split and writes one table;
``--protocol=warm_cold`` (with ``--compare`` or ``--model``) runs SETRec's warm/cold protocol;
``--protocol=unseen_users`` runs TokenRec's unseen-user protocol. ``--nproc``, ``--ip``, ``--port``,
``--world_size``, ``--group_offset`` start a distributed run as RecBole's ``run_recbole.py`` does.
``--seeds=2020,2021,2022`` trains each model once per seed (tables show mean ± std over seeds);
``--report=DIR`` writes the table, PNG plots and ``report.md`` to DIR (``pip install
"recbole_genrec[report]"``). With ``--model``, either of them runs a one-model ``--compare``.
``--recommend=MODEL_FILE --users=1,2,3 [--histories="50,172;133"] --k=10`` prints the top-k raw
item ids (and titles) of a saved model for known users and/or raw histories of unseen users.
``--resume`` (config ``resume: True``) names each run's checkpoint after a fingerprint of its config,
data and code and continues a killed run from its last finished epoch when the same command is run
again (a finished run is not trained again); ``--resume_checkpoint=FILE`` resumes the run whose
checkpoint is FILE (see :mod:`recbole_genrec.trainer.staged`).
``--hyper --params_file=hyper.test [--algo=exhaustive|random|bayes] [--max_evals=100]
[--output_file=FILE]`` searches hyper-parameters as RecBole's ``run_hyper.py`` (needs ``pip install
"recbole_genrec[hyper]"``; see :mod:`recbole_genrec.hyper`).
"""

import argparse
import sys


def main(argv=None):
    from recbole_genrec.evaluation.protocols import parse_seeds
    from recbole_genrec.quick_start import compare, run_recbole_genrec, run_unseen_users, run_warm_cold

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="name of the model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space-separated)")
    parser.add_argument("--compare", type=str, default=None, help="comma-separated models to run side by side")
    parser.add_argument("--protocol", type=str, default=None, choices=[None, "warm_cold", "unseen_users"],
                        help="warm_cold: global time-ordered 8:1:1 split, metrics on all/warm/cold targets; "
                             "unseen_users: TokenRec with 5%% of users kept out of training")
    parser.add_argument("--seeds", type=str, default=None,
                        help="comma-separated seeds: each model runs once per seed, tables show mean ± std")
    parser.add_argument("--reuse_runs", action="store_true",
                        help="--compare / --protocol=warm_cold: take a run's result from the run record of an "
                             "earlier run with the same config, data and code (<checkpoint_dir>/runs/) instead of "
                             "training it again")
    parser.add_argument("--records_only", action="store_true",
                        help="like --reuse_runs, but train nothing: tabulate the runs that have a record and "
                             "list the missing ones in report.md")
    parser.add_argument("--report", type=str, default=None, metavar="DIR",
                        help="write the table, PNG plots and report.md to DIR (needs matplotlib)")
    parser.add_argument("--nproc", type=int, default=1, help="processes of a distributed run (gloo on CPU, NCCL on GPU)")
    parser.add_argument("--ip", type=str, default="localhost", help="master address of a distributed run")
    parser.add_argument("--port", type=str, default="5678", help="master port of a distributed run")
    parser.add_argument("--world_size", type=int, default=-1, help="processes over all nodes (default nproc)")
    parser.add_argument("--group_offset", type=int, default=0, help="rank offset of this node's processes")
    parser.add_argument("--recommend", type=str, default=None, metavar="MODEL_FILE",
                        help="print top-k recommendations of a saved model (with --users and/or --histories)")
    parser.add_argument("--users", type=str, default=None, help="comma-separated raw user ids (--recommend)")
    parser.add_argument("--histories", type=str, default=None,
                        help="raw item-id histories of unseen users, oldest first: '1,2,3;4,5' (--recommend)")
    parser.add_argument("--k", type=int, default=10, help="list length (--recommend)")
    parser.add_argument("--exclude_seen", action="store_true",
                        help="never recommend an item of the user's history (--recommend)")
    parser.add_argument("--resume", nargs="?", const="True", default=None, metavar="BOOL",
                        help="deterministic checkpoint names; running the same command again continues "
                             "a killed run from its last finished epoch")
    parser.add_argument("--hyper", action="store_true",
                        help="hyper-parameter search over --params_file (RecBole's run_hyper, without ray)")
    parser.add_argument("--params_file", type=str, default=None,
                        help="searched options, one a line: 'learning_rate choice [0.01,0.005]' (--hyper)")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=["exhaustive", "random", "bayes"],
                        help="exhaustive: every combination; random / bayes (TPE): --max_evals trials (--hyper)")
    parser.add_argument("--max_evals", type=int, default=100, help="trials of random / bayes (--hyper)")
    parser.add_argument("--output_file", type=str, default=None,
                        help="RecBole's result file (--hyper; default hyper-<model>-<dataset>.result)")
    args, _ = parser.parse_known_args(argv)
    if args.recommend:
        from recbole_genrec.recommend import format_table, recommend

        users = [u.strip() for u in (args.users or "").split(",") if u.strip()]
        histories = [[i.strip() for i in h.split(",") if i.strip()] for h in (args.histories or "").split(";")
                     if h.strip()]
        if not users and not histories:
            parser.error("--recommend needs --users=ID,ID,... and/or --histories='ITEM,ITEM;ITEM,...'")
        try:
            results = recommend(args.recommend, user_ids=users or None, histories=histories or None, k=args.k,
                                exclude_seen=args.exclude_seen)
        except ValueError as error:
            parser.error(str(error))
        print(format_table(results))
        return results
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    resume = args.resume is not None and str(args.resume).strip().lower() in ("true", "1", "yes")
    if resume and argv is None and "--resume" in sys.argv:  # RecBole's Config reads --key=value only
        sys.argv[sys.argv.index("--resume")] = "--resume=True"
    run_config = {"resume": True} if resume else None
    if args.hyper:
        from recbole_genrec.hyper import run_hyper, search_space

        if not args.params_file:
            parser.error("--hyper needs --params_file=FILE (lines like 'learning_rate choice [0.01,0.005]')")
        if args.compare or args.protocol or args.seeds or args.report or args.nproc > 1 or args.world_size > 0:
            parser.error("--hyper tunes one model in one process: drop --compare, --protocol, --seeds, "
                         "--report, --nproc and --world_size")
        try:
            search_space(args.params_file, algo=args.algo)  # a bad file or a missing hyperopt, before training
        except (ImportError, OSError, SyntaxError, ValueError) as error:
            parser.error(str(error))
        return run_hyper(args.model, args.dataset, params_file=args.params_file, config_file_list=config_files,
                         algo=args.algo, max_evals=args.max_evals, output_file=args.output_file)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as error:
        parser.error(str(error))
    extra = {"seeds": seeds, "report_dir": args.report, "config_dict": run_config}
    if seeds and any(arg.startswith("--seed=") for arg in (sys.argv[1:] if argv is None else argv)):
        parser.error("give either --seed (one run) or --seeds (one run per seed), not both")
    if (seeds or args.report) and (args.nproc > 1 or args.world_size > 0):
        parser.error("--seeds and --report run in one process: drop --nproc / --world_size")
    records = {"reuse_runs": args.reuse_runs, "records_only": args.records_only}
    if any(records.values()) and (args.protocol == "unseen_users" or not (args.compare or seeds or args.report
                                                                         or args.protocol)):
        parser.error("--reuse_runs / --records_only work with --compare (or --seeds / --report) and "
                     "--protocol=warm_cold")
    if args.protocol == "warm_cold":
        return run_warm_cold(args.compare or args.model, args.dataset, config_file_list=config_files, **records,
                             **extra)
    if args.protocol == "unseen_users":
        return run_unseen_users(args.dataset, config_file_list=config_files, **extra)
    if args.compare or seeds or args.report:
        return compare(args.compare or args.model, args.dataset, config_file_list=config_files, **records, **extra)
    return run_recbole_genrec(model=args.model, dataset=args.dataset, config_file_list=config_files,
                              nproc=args.nproc, world_size=args.world_size, ip=args.ip, port=args.port,
                              group_offset=args.group_offset, config_dict=run_config)


if __name__ == "__main__":
    main()
