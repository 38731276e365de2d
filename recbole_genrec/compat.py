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
2. Loading a checkpoint must not run code. torch >= 2.6 loads with ``weights_only=True`` by default
   and RecBole checkpoints pickle the whole ``Config`` (RecBole #2215); they are also written with
   ``pickle_protocol=4``, whose opcodes torch's weights-only unpickler does not read at all
   (``Unsupported operand 149``). Every checkpoint (RecBole's ``resume_checkpoint``/``evaluate``,
   the RecBole models that load pre-trained files, and recbole_genrec's own loads) goes through
   :func:`safe_torch_load`: a restricted unpickler that imports only an allow-list of globals and
   calls only an allow-list of functions (:data:`CHECKPOINT_CALLABLES`): torch's own weights-only
   list (tensors, storages, dtypes, ``torch.device``, ``OrderedDict``), globals added with
   ``torch.serialization.add_safe_globals``, numpy scalars/dtypes/arrays and RecBole's enums.
   Classes that checkpoints hold by reference (:data:`CHECKPOINT_CLASSES`: RecBole's and our
   ``Config``, ``yaml.loader.FullLoader``, SciPy sparse matrices; :data:`CHECKPOINT_CLASS_PACKAGES`:
   ``nn.Module`` classes of ``recbole.model``, ``recbole_genrec.model`` and ``torch.nn.modules``,
   RecBole's datasets) are restored from their state (``__new__`` + ``__setstate__``), never called.
   Anything else is refused with :class:`UntrustedCheckpointError` naming the file and the global,
   before its module is imported; so is a file that modifies an allowed class or function (BUILD,
   APPEND, SETITEM on it) instead of an object. To load a checkpoint you trust that holds other objects, set the
   environment variable ``RECBOLE_GENREC_TRUST_CHECKPOINTS=1`` (plain ``weights_only=False``).
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
   ``ValueError: Length of values (1) does not match length of index``;
   ``KnowledgeBasedDataset._reset_ent_remapID`` fails the same way for a ``token_seq`` alias of
   the item or entity id; ``SequentialDataset._benchmark_presets`` (pre-split
   ``benchmark_filename`` files) silently sets every ``item_length`` to the number of rows. Those
   methods run with ``Series.agg(len)`` answering element-wise, as pandas 2 did, for the
   duration of the call. ``Series.agg(np.concatenate)`` hands numpy the Series, which numpy reads
   as ``series[0], series[1], ...``: by label, so it raises ``KeyError: 0`` once rows were dropped
   without resetting the index (``KnowledgeBasedDataset._filter_link`` drops the interactions of
   items without a KG link, then ``_remap`` concatenates a ``token_seq`` alias of the item id);
   within the same methods it concatenates by position. (Audit of ``recbole/data``: no other
   ``agg`` call; the chained in-place ``fillna`` calls are shim 5; no other chained assignment
   to a DataFrame column.)
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
import os
import pickle
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


TRUST_ENV = "RECBOLE_GENREC_TRUST_CHECKPOINTS"

# Globals RecBole's and recbole_genrec's checkpoints and stage files pickle besides tensors, found
# by saving SASRec, GRU4Rec, LightGCN, Pop, NeuMF, EASE, ItemKNN and every recbole_genrec model on
# genrec-tiny. Functions/classes that may be called (REDUCE) with the pickled arguments:
CHECKPOINT_CALLABLES = (
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",  # numpy scalars (best_valid_score)
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",  # numpy arrays
    "numpy.dtype",
    "recbole.utils.enum_type.ModelType", "recbole.utils.enum_type.InputType",
    "recbole.utils.enum_type.EvaluatorType", "recbole.utils.enum_type.FeatureType",
    "recbole.utils.enum_type.FeatureSource", "recbole.utils.enum_type.KGDataLoaderState",
    "logging.getLogger",  # loggers kept by RecBole's FeatureSeqEmbLayer
)
# Classes held by reference or rebuilt from their state (``__new__`` + ``__setstate__``), never called:
CHECKPOINT_CLASSES = (
    "recbole.config.configurator.Config", "recbole_genrec.config.Config",  # the pickled config
    "yaml.loader.FullLoader",  # Config.yaml_loader
    "recbole.data.interaction.Interaction",
    "numpy.ndarray", "numpy.matrix",  # EASE, ItemKNN
    "scipy.sparse._csr.csr_matrix", "scipy.sparse._csc.csc_matrix", "scipy.sparse._lil.lil_matrix",
    "scipy.sparse._coo.coo_matrix", "scipy.sparse._csr.csr_array", "scipy.sparse._csc.csc_array",
    "scipy.sparse._coo.coo_array",
)
# Classes of these packages, when they subclass the given base (checked after importing a module of
# the package, never before): Config.model_class, and what RecBole's feature-aware sequential models
# (FDSA, DIN, SASRecF, ...) keep in ``other_parameter``: their FeatureSeqEmbLayer with its dataset.
CHECKPOINT_CLASS_PACKAGES = {
    "recbole.model.": "torch.nn.Module",
    "recbole_genrec.model.": "torch.nn.Module",
    "torch.nn.modules.": "torch.nn.Module",
    "recbole.data.dataset.": "recbole.data.dataset.Dataset",
}


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a Python object outside the allow-list of :func:`safe_torch_load`."""


def _trust_all_checkpoints() -> bool:
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=1)
def _torch_weights_only_globals() -> dict:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return dict(_get_allowed_globals())
    except Exception:  # pragma: no cover - private torch API moved
        return {"collections.OrderedDict": __import__("collections").OrderedDict,
                "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
                "torch.device": torch.device, "torch.Size": torch.Size}


def _user_safe_globals() -> dict:
    """What the user allowed with ``torch.serialization.add_safe_globals``."""
    out = {}
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        name = name or f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
        out[name] = obj
    return out


def _import_global(module: str, name: str):
    import importlib

    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _restricted_unpickler(source: str):
    """A pure-Python ``Unpickler`` (so that each opcode can be checked) that imports only allowed
    globals and calls only allowed callables; ``source`` names the file in its errors."""
    hint = (f"Loading it could run arbitrary code. If you trust {source}, set {TRUST_ENV}=1 to load "
            "it without this check.")
    callables = {**_torch_weights_only_globals(), **_user_safe_globals()}
    for path in CHECKPOINT_CALLABLES:
        module, _, name = path.rpartition(".")
        try:
            callables[path] = _import_global(module, name)
        except (ImportError, AttributeError):
            pass
    callable_ids = {id(obj) for obj in callables.values()}
    rebuild_from_type = callables.get("torch._tensor._rebuild_from_type_v2")
    if rebuild_from_type is not None:  # it calls its first argument: only an allowed callable

        def guarded_rebuild_from_type(func, *args):
            if id(func) not in callable_ids:
                raise UntrustedCheckpointError(
                    f"refusing to load checkpoint {source}: it rebuilds a tensor with {func!r}. {hint}")
            return rebuild_from_type(func, *args)

        callables["torch._tensor._rebuild_from_type_v2"] = guarded_rebuild_from_type
        callable_ids.add(id(guarded_rebuild_from_type))
    base = pickle._Unpickler

    class RestrictedUnpickler(base):
        dispatch = dict(base.dispatch)

        def find_class(self, module, name):
            obj = self._allowed_global(module, name)
            self.__dict__.setdefault("_globals", set()).add(id(obj))
            return obj

        def _allowed_global(self, module, name):
            path = f"{module}.{name}"
            if path in callables:
                return callables[path]
            if path in CHECKPOINT_CLASSES:
                return _import_global(module, name)
            for package, base_class in CHECKPOINT_CLASS_PACKAGES.items():
                if module.startswith(package) and "." not in name:
                    try:
                        obj = _import_global(module, name)
                    except (ImportError, AttributeError):
                        break
                    if isinstance(obj, type) and issubclass(obj, _import_global(*base_class.rsplit(".", 1))):
                        return obj
            raise UntrustedCheckpointError(
                f"refusing to load checkpoint {source}: it holds the Python global '{path}', which is "
                f"not one RecBole or recbole_genrec checkpoints hold. {hint}")

        def _check_target(self, target, opcode):
            """BUILD/APPEND/SETITEM mutate their target: never a class or function itself."""
            if id(target) in self.__dict__.get("_globals", ()):
                raise UntrustedCheckpointError(
                    f"refusing to load checkpoint {source}: it modifies {target!r} ({opcode}). {hint}")

        def load_build(self):
            self._check_target(self.stack[-2], "BUILD")
            super().load_build()

        def load_append(self):
            self._check_target(self.stack[-2], "APPEND")
            super().load_append()

        def load_setitem(self):
            self._check_target(self.stack[-3], "SETITEM")
            super().load_setitem()

        def load_appends(self):
            self._check_target(self.metastack[-1][-1], "APPENDS")
            super().load_appends()

        def load_setitems(self):
            self._check_target(self.metastack[-1][-1], "SETITEMS")
            super().load_setitems()

        def load_additems(self):
            self._check_target(self.metastack[-1][-1], "ADDITEMS")
            super().load_additems()

        def load_reduce(self):
            func = self.stack[-2]
            if id(func) not in callable_ids:
                what = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)}"
                raise UntrustedCheckpointError(
                    f"refusing to load checkpoint {source}: it calls '{what}' while loading, which "
                    f"RecBole and recbole_genrec checkpoints never do. {hint}")
            super().load_reduce()

        def _refuse_opcode(self):
            raise UntrustedCheckpointError(
                f"refusing to load checkpoint {source}: it uses a pickle opcode (INST/OBJ) that "
                f"torch.save never writes. {hint}")

        dispatch[pickle.REDUCE[0]] = load_reduce
        dispatch[pickle.BUILD[0]] = load_build
        dispatch[pickle.APPEND[0]] = load_append
        dispatch[pickle.APPENDS[0]] = load_appends
        dispatch[pickle.SETITEM[0]] = load_setitem
        dispatch[pickle.SETITEMS[0]] = load_setitems
        dispatch[pickle.ADDITEMS[0]] = load_additems
        dispatch[pickle.INST[0]] = _refuse_opcode
        dispatch[pickle.OBJ[0]] = _refuse_opcode

    return RestrictedUnpickler


def safe_torch_load(path, map_location=None):
    """``torch.load`` of a RecBole / recbole_genrec checkpoint that runs no code from the file.

    Objects outside the allow-list (see shim 2 above) raise :class:`UntrustedCheckpointError`
    naming ``path`` and the global, before anything is imported or called; with the environment
    variable ``RECBOLE_GENREC_TRUST_CHECKPOINTS=1`` the file is loaded with plain pickle instead.
    """
    if _trust_all_checkpoints():
        return torch.load(path, map_location=map_location, weights_only=False)
    source = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else repr(getattr(path, "name", path))
    unpickler = _restricted_unpickler(source)
    module = types.ModuleType("recbole_genrec_restricted_pickle")
    module.Unpickler = unpickler
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    module.__name__ = "recbole_genrec_restricted_pickle"
    # weights_only=False only lets torch take our pickle module: the restricted unpickler is the guard
    # (torch's weights-only unpickler cannot read RecBole's pickle_protocol=4 files)
    return torch.load(path, map_location=map_location, pickle_module=module, weights_only=False)


def _recbole_load(f, map_location=None, *args, **kwargs):
    """Shim 2: RecBole modules' ``torch.load`` (``torch.load(path[, map_location])``)."""
    return safe_torch_load(f, map_location=map_location)


def _torch_with_safe_load() -> types.ModuleType:
    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # PEP 562 delegation
    proxy.load = _recbole_load
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


_ORIGINAL_SERIES_AGG = pd.Series.agg


def _elementwise_len_agg(series, func=None, *args, **kwargs):
    if func is len:
        return series.map(len)
    if func is np.concatenate and not args and not kwargs:  # by position, whatever the index
        return np.concatenate(series.to_numpy())
    return _ORIGINAL_SERIES_AGG(series, func, *args, **kwargs)


def _with_elementwise_len_agg(method):
    """Shim 6: run a ``Dataset`` method with ``Series.agg(len)`` giving each element's length."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        previous = pd.Series.agg  # restored as found, so that nested calls keep the shim
        pd.Series.agg = _elementwise_len_agg
        try:
            return method(self, *args, **kwargs)
        finally:
            pd.Series.agg = previous

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

    proxy = _torch_with_safe_load()
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
    from recbole.data.dataset import kg_dataset, sequential_dataset

    for cls, name in ((dataset_module.Dataset, "_remap"), (dataset_module.Dataset, "_normalize"),
                      (dataset_module.Dataset, "_discretization"),
                      (sequential_dataset.SequentialDataset, "_benchmark_presets"),
                      (kg_dataset.KnowledgeBasedDataset, "_reset_ent_remapID")):
        setattr(cls, name, _with_elementwise_len_agg(getattr(cls, name)))
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
