"""Make RecBole 1.2.x run on today's scientific Python stack.

Applied once, on ``import recbole_genrec``. Each shim names the upstream problem it covers
and touches only RecBole's own modules (or restores an alias RecBole itself tries to set),
never the user's code. Nothing here pins a version down.

Shims
-----
1. NumPy >= 2 removed ``np.float``/``np.int``/``np.bool``/... and ``np.float_``/``np.unicode_``.
   ``Config.compatibility_settings`` assigns ``np.float = np.float_`` and so raises
   ``AttributeError`` in NumPy 2; RecBole's metrics, ``Interaction`` and ``Dataset`` still use
   ``np.float`` / ``np.bool`` (RecBole #1604, #2162). We give NumPy the aliases the 1.x line had
   (builtin types) only where the name is missing, and replace ``compatibility_settings``.
2. torch >= 2.6 loads with ``weights_only=True`` by default; RecBole checkpoints pickle the whole
   ``Config``, so ``Trainer.resume_checkpoint``/``evaluate(load_best_model=True)`` fail with an
   ``UnpicklingError`` (RecBole #2215). RecBole's modules get a ``torch`` whose ``load`` defaults to
   ``weights_only=False``: they only ever load checkpoints that RecBole itself wrote.
3. SciPy >= 1.12 removed the private ``dok_matrix._update`` that LightGCN, NGCF, NCL, GCMC and
   SpectralCF call to build the adjacency matrix (``AttributeError``). We restore it as a bulk
   update of the matrix's own dict.
4. ``recbole.quick_start`` imports ``ray`` at import time (RecBole pins ``ray<=2.6.3``, which has
   no wheels for Python >= 3.12). The plugin never imports ``recbole.quick_start``; it has its own
   runner in :mod:`recbole_genrec.quick_start`. ``install_recbole_hint`` explains the
   ``--no-deps`` install.
5. pandas >= 3 (copy-on-write): ``df[col].fillna(..., inplace=True)`` on a column no longer writes
   to the frame. RecBole's ``_load_feat`` relies on it to turn empty ``token_seq``/``float_seq``
   cells into ``""`` before splitting (an empty genre cell then crashes with
   ``'float' object has no attribute 'split'``), and ``Dataset._fill_nan`` silently leaves NaNs in
   token and float fields. RecBole's dataset module gets a ``pd`` whose ``read_csv`` fills empty
   sequence cells, and ``_fill_nan`` is replaced by an assignment-based version.
6. pandas >= 3: ``Series.agg(len)`` returns the length of the Series instead of each element's.
   ``Dataset._remap`` (any ``token_seq`` field, e.g. ml-100k's genres), ``_normalize``
   (``float_seq`` with ``normalize_all``) and ``_discretization`` (``float_seq`` among
   ``numerical_features``) use it to split concatenated values back per row, and fail with
   ``ValueError: Length of values (1) does not match length of index``. Those three methods run
   with ``Series.agg(len)`` answering element-wise, as pandas 2 did, for the duration of the call.
7. ``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)``
   at import time, and importing any RecBole model package imports it: autograd anomaly
   detection (a debugging mode) is then on for the whole process, and every backward pass
   checks every gradient for NaN and keeps forward stack traces (measured here: a t5-tiny
   training step 2.98 s -> 1.73 s, a qwen2-tiny step 1.41 s -> 0.84 s once it is off). We import
   RecBole's models and restore the anomaly-detection state the process had before.
8. RecBole's ``AbstractTrainer`` wraps the model in ``DistributedDataParallel(model,
   device_ids=[local_rank])``, which torch rejects for a CPU module. Its trainer module gets a
   ``DistributedDataParallel`` that drops ``device_ids`` for CPU modules, so RecBole's own DDP
   path runs on CPUs with the gloo backend (:meth:`recbole_genrec.config.Config._init_device`).
   RecBole's ``ensure_dir`` checks for a folder and then creates it, so processes started
   together race on ``./log`` and the checkpoint folder (``FileExistsError``); its modules get one
   that tolerates a folder created in between. ``Trainer.evaluate(load_best_model=True)`` makes
   every rank read the checkpoint only rank 0 writes, named with each process's own clock: the
   ranks now agree on rank 0's file name and wait for each other before reading it.
"""

from __future__ import annotations

import functools
import types
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

_APPLIED = False

# The aliases NumPy 1.x had: each was the Python builtin of the same name.
_NUMPY_ALIASES = {
    "bool": bool,
    "int": int,
    "float": float,
    "complex": complex,
    "object": object,
    "str": str,
    "long": int,
    "unicode": str,
}


def install_recbole_hint() -> str:
    return (
        "RecBole is not installed. Install it without its dependency pins, which only serve its "
        "ray-based hyper-parameter tuning: `pip install --no-deps recbole==1.2.1` "
        "(recbole_genrec itself depends on the rest of RecBole's requirements)."
    )


def _restore_numpy_aliases() -> None:
    """Shim 1 (RecBole #1604, #2162)."""
    for name, value in _NUMPY_ALIASES.items():
        if name not in np.__dict__:
            setattr(np, name, value)


def _compatibility_settings(self) -> None:  # replaces Config.compatibility_settings
    _restore_numpy_aliases()


def _trusted_load(f, *args, **kwargs):
    """``torch.load`` for checkpoints written by RecBole itself (shim 2, RecBole #2215)."""
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


def _torch_with_trusted_load() -> types.ModuleType:
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # PEP 562 delegation
    proxy.load = _trusted_load
    return proxy


def _dok_update(self, data) -> None:
    """Shim 3: SciPy >= 1.12 dropped ``dok_matrix._update`` (bulk dict update)."""
    store = getattr(self, "_dict", None)
    if store is None:  # very old SciPy: the matrix is the dict
        dict.update(self, data)
        return
    shape = self.shape
    for (row, col), value in data.items():
        if not (0 <= row < shape[0] and 0 <= col < shape[1]):
            raise IndexError(f"index ({row}, {col}) out of bounds for shape {shape}")
        if value:
            store[(int(row), int(col))] = value
        else:
            store.pop((int(row), int(col)), None)


def _read_csv_filling_sequences(*args, **kwargs):
    """Shim 5: ``pd.read_csv`` that turns empty ``*_seq`` cells into ``""`` (pandas >= 3 CoW)."""
    df = pd.read_csv(*args, **kwargs)
    for column in df.columns:
        if isinstance(column, str) and column.endswith("seq"):
            df[column] = df[column].fillna("")
    return df


def _pandas_with_seq_fill() -> types.ModuleType:
    proxy = types.ModuleType("pandas")
    proxy.__getattr__ = lambda name: getattr(pd, name)
    proxy.read_csv = _read_csv_filling_sequences
    return proxy


def _fill_nan(self) -> None:
    """Shim 5: ``Dataset._fill_nan`` with assignments instead of chained in-place ``fillna``."""
    from recbole.utils import FeatureType

    for feat_name in self.feat_name_list:
        feat = getattr(self, feat_name)
        for field in feat:
            ftype = self.field2type[field]
            if ftype == FeatureType.TOKEN:
                feat[field] = feat[field].fillna(value=0)
            elif ftype == FeatureType.FLOAT:
                feat[field] = feat[field].fillna(value=feat[field].mean())
            else:
                dtype = np.int64 if ftype == FeatureType.TOKEN_SEQ else np.float64
                feat[field] = feat[field].apply(
                    lambda x: np.array([], dtype=dtype) if isinstance(x, float) else x
                )


def _distributed_data_parallel(module, device_ids=None, **kwargs):
    """Shim 8: ``DistributedDataParallel`` without ``device_ids`` for modules on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)


def _ensure_dir(dir_path) -> None:
    """Shim 8: RecBole's ``ensure_dir`` without the check-then-create race between processes."""
    import os

    os.makedirs(dir_path, exist_ok=True)


def _evaluate_rank0_checkpoint(evaluate):
    """Shim 8: ``Trainer.evaluate`` that, in a distributed run, loads rank 0's best checkpoint
    after rank 0 has written it."""

    @functools.wraps(evaluate)
    def wrapper(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and not self.config["single_spec"] and torch.distributed.is_initialized():
            name = [model_file or self.saved_model_file]
            torch.distributed.broadcast_object_list(name, src=0)
            torch.distributed.barrier()
            model_file = name[0]
        return evaluate(self, eval_data, load_best_model, model_file, show_progress)

    return wrapper


def _with_elementwise_len_agg(method):
    """Shim 6: run a ``Dataset`` method with ``Series.agg(len)`` giving each element's length."""
    original = pd.Series.agg

    def agg(series, func=None, *args, **kwargs):
        if func is len:
            return series.map(len)
        return original(series, func, *args, **kwargs)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        pd.Series.agg = agg
        try:
            return method(self, *args, **kwargs)
        finally:
            pd.Series.agg = original

    return wrapper


def apply() -> None:
    """Apply every shim once. Safe to call many times."""
    global _APPLIED
    if _APPLIED:
        return
    try:
        import recbole  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(install_recbole_hint()) from err

    anomaly = (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled())
    _restore_numpy_aliases()
    from recbole.config import configurator

    configurator.Config.compatibility_settings = _compatibility_settings

    import importlib

    proxy = _torch_with_trusted_load()
    for name in (
        "recbole.trainer.trainer",
        "recbole.model.general_recommender.convncf",
        "recbole.model.general_recommender.nais",
        "recbole.model.general_recommender.ract",
        "recbole.model.general_recommender.neumf",
        "recbole.model.sequential_recommender.s3rec",
        "recbole.model.context_aware_recommender.kd_dagfm",
    ):
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = proxy

    from recbole.data.dataset import dataset as dataset_module

    if getattr(dataset_module, "pd", None) is pd:
        dataset_module.pd = _pandas_with_seq_fill()
    dataset_module.Dataset._fill_nan = _fill_nan
    for name in ("_remap", "_normalize", "_discretization"):
        setattr(dataset_module.Dataset, name, _with_elementwise_len_agg(getattr(dataset_module.Dataset, name)))
    chained = getattr(pd.errors, "ChainedAssignmentError", None)
    if chained is not None:  # RecBole's remaining no-op in-place fillna is covered by shim 5
        warnings.filterwarnings("ignore", category=chained, module=r"recbole\.data\.dataset\.dataset")

    for cls in (sp.dok_matrix, getattr(sp, "dok_array", None)):
        if cls is not None and not hasattr(cls, "_update"):
            cls._update = _dok_update

    trainer_module = importlib.import_module("recbole.trainer.trainer")
    trainer_module.DistributedDataParallel = _distributed_data_parallel  # shim 8
    trainer_module.Trainer.evaluate = _evaluate_rank0_checkpoint(trainer_module.Trainer.evaluate)
    for name in ("recbole.trainer.trainer", "recbole.data.dataset.dataset", "recbole.data.utils",
                 "recbole.utils", "recbole.utils.logger", "recbole.utils.utils"):
        module = importlib.import_module(name)
        if hasattr(module, "ensure_dir"):
            module.ensure_dir = _ensure_dir
    importlib.import_module("recbole.model.sequential_recommender.sine")  # shim 7
    torch.autograd.set_detect_anomaly(*anomaly)
    _APPLIED = True
