"""recbole_genrec: LLM-based generative recommenders as ordinary RecBole models."""

from recbole_genrec import compat as _compat

_compat.apply()

__version__ = "0.1.0"
