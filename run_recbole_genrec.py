"""Command line: ``python run_recbole_genrec.py --model=TIGER --dataset=ml-100k [--key=value ...]``.

Same arguments as RecBole's ``run_recbole.py``; any other ``--key=value`` overrides the config.
``--compare=SASRec,LightGCN,TIGER`` runs several models on one split and writes one table.
"""

import argparse

from recbole_genrec.quick_start import compare, run_recbole_genrec

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", "-m", type=str, default="SASRec", help="name of the model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="config files (space-separated)")
    parser.add_argument("--compare", type=str, default=None, help="comma-separated models to run side by side")
    args, _ = parser.parse_known_args()
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    if args.compare:
        compare(args.compare, args.dataset, config_file_list=config_files)
    else:
        run_recbole_genrec(model=args.model, dataset=args.dataset, config_file_list=config_files)
