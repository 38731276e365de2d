"""``recbole-genrec`` console script and ``run_recbole_genrec.py``: RecBole's CLI.

``--model``, ``--dataset``, ``--config_files`` (space-separated) as in RecBole's ``run_recbole.py``;
every other ``--key=value`` overrides the config (RecBole's ``Config`` reads them from argv).
``--compare=SASRec,LightGCN,TIGER`` runs several models on one split and writes one table.
"""

import argparse


def main(argv=None):
    from recbole_genrec.quick_start import compare, run_recbole_genrec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="name of the model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space-separated)")
    parser.add_argument("--compare", type=str, default=None, help="comma-separated models to run side by side")
    args, _ = parser.parse_known_args(argv)
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.compare:
        return compare(args.compare, args.dataset, config_file_list=config_files)
    return run_recbole_genrec(model=args.model, dataset=args.dataset, config_file_list=config_files)


if __name__ == "__main__":
    main()
