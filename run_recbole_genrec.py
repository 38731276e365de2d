"""``python run_recbole_genrec.py --model=TIGER --dataset=ml-100k [--key=value ...]``

RecBole's ``run_recbole.py`` arguments; ``--compare=SASRec,LightGCN,TIGER`` for a side-by-side
table. See :mod:`recbole_genrec.cli`.
"""

from recbole_genrec.cli import main

if __name__ == "__main__":
    main()
