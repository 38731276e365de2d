"""``Config`` for recbole_genrec: RecBole's configurator plus the plugin's packaged YAMLs.

Priority stays RecBole's: command line > ``config_dict`` > ``config_file_list`` > internal
defaults. Internal defaults are RecBole's (``overall.yaml``, model, dataset, ``sequential.yaml``)
followed by ours (``recbole_genrec/properties/overall.yaml``, ``dataset/<dataset>.yaml``, then
``model/<Model>.yaml``), so a plugin model's YAML wins over RecBole's
quick-start defaults.

RecBole accepts any key silently; a key given by the user (config file, ``config_dict`` or
``--key=value``) that no YAML of RecBole's or ours defines and no code of either reads is logged
as a warning with the closest known key (:func:`known_config_keys`).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from logging import getLogger
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_genrec.utils import get_model

PACKAGE_DIR = Path(__file__).resolve().parent
PROPERTIES_DIR = PACKAGE_DIR / "properties"
REPO_DATASET_DIR = PACKAGE_DIR.parent / "dataset_atomic"


def _recbole_example_dir() -> Path:
    import recbole

    return Path(recbole.__file__).resolve().parent / "dataset_example"


# Keys that are given to a run but that no YAML holds: RecBole's run/distributed arguments, the
# values RecBole's Config sets itself, and the options of our command line (cli.py).
RUN_KEYS = frozenset({
    "model", "dataset", "config_files", "local_rank", "world_size", "ip", "port", "nproc", "offset",
    "group_offset", "compare", "protocol", "device", "single_spec", "MODEL_TYPE", "MODEL_INPUT_TYPE",
    "eval_type", "valid_metric_bigger", "train_neg_sample_args", "valid_neg_sample_args",
    "test_neg_sample_args", "eval_neg_sample_args", "seeds", "report", "recommend", "users", "histories", "k",
    "hyper", "params_file", "algo", "max_evals", "output_file", "resume", "reuse_runs",
})
STAGE_KEYS = ("epochs", "learning_rate", "batch_size")  # <stage>_<key>, read by StagedTrainer
_CODE_KEY = re.compile(
    r"""(?:config|config_dict|cfg|cf_dict)\s*(?:\[|\.get\(|\.setdefault\(|\.pop\()\s*["']([A-Za-z_]\w*)["']""")
_STAGES = re.compile(r"""\bstages\b[^=\n]*=\s*\(([^)]*)\)""")


@functools.lru_cache(maxsize=1)
def known_config_keys() -> frozenset:
    """Every config key RecBole or recbole_genrec knows: the keys of RecBole's ``properties/**.yaml``
    (overall, model, dataset, quick_start_config) and ours, RecBole's argument lists, the keys their
    code reads (``config["..."]``), ``<stage>_epochs``/``_learning_rate``/``_batch_size`` of our
    models' stages, and :data:`RUN_KEYS`."""
    import recbole
    import yaml
    from recbole.utils import argument_list

    keys = set(RUN_KEYS)
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name, []))
    recbole_dir = Path(recbole.__file__).resolve().parent
    for folder in (recbole_dir / "properties", PROPERTIES_DIR):
        for file in folder.rglob("*.yaml"):
            try:
                data = yaml.safe_load(file.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                keys.update(str(key) for key in data)
    for folder in (recbole_dir, PACKAGE_DIR):
        for file in folder.rglob("*.py"):
            text = file.read_text(encoding="utf-8", errors="ignore")
            keys.update(_CODE_KEY.findall(text))
            if folder == PACKAGE_DIR:
                for stages in _STAGES.findall(text):
                    for stage in re.findall(r"""["'](\w+)["']""", stages):
                        keys.update(f"{stage}_{key}" for key in STAGE_KEYS)
    return frozenset(keys)


def unknown_key_warnings(given: dict, source: str) -> list[str]:
    """One message per key of ``given`` (from ``source``) that :func:`known_config_keys` lacks."""
    known = known_config_keys()
    messages = []
    for key in given:
        key = str(key)
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        messages.append(f"config key '{key}' ({source}) is not an option of RecBole or recbole_genrec: "
                        f"it has no effect unless your own code reads it{hint}")
    return messages


def dataset_candidates(dataset: str) -> list[Path]:
    """Where a dataset named ``dataset`` is looked for when ``data_path`` is not given."""
    return [
        Path("dataset") / dataset,  # RecBole's default ``data_path``, relative to the cwd
        REPO_DATASET_DIR / dataset,  # datasets shipped with this repository
        _recbole_example_dir() / dataset,  # ml-100k inside RecBole's wheel
    ]


class Config(RecBoleConfig):
    """RecBole ``Config`` that knows the plugin's models, YAML defaults and datasets."""

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None):
        super().__init__(model, dataset, config_file_list, config_dict)
        self._warn_unknown_keys()
        self._check_paths()
        self._alias_benchmark_item_lists()

    def _alias_benchmark_item_lists(self):
        """Pre-split ``benchmark_filename`` files carry the history as ``item_id_list``; RecBole
        remaps it in an id space of its own unless it is an ``alias_of_item_id``, so that history
        id 1 and target id 1 are different items. Make it an alias when the files have that column."""
        cfg = self.final_config_dict
        files = cfg.get("benchmark_filename")
        if not files or not cfg.get("ITEM_ID_FIELD"):
            return
        list_field = f"{cfg['ITEM_ID_FIELD']}{cfg.get('LIST_SUFFIX') or '_list'}"
        alias = list(cfg.get("alias_of_item_id") or [])
        if list_field in alias:
            return
        try:
            with open(os.path.join(cfg["data_path"], f"{self.dataset}.{files[0]}.inter"),
                      encoding=cfg.get("encoding") or "utf-8") as f:
                header = f.readline().rstrip("\r\n").split(cfg.get("field_separator") or "\t")
        except OSError:
            return  # RecBole names the missing file
        if list_field in (column.split(":")[0] for column in header):
            cfg["alias_of_item_id"] = alias + [list_field]

    def _check_paths(self):
        """Paths the models read, checked before anything is trained or written."""
        cfg = self.final_config_dict
        llm_path = cfg.get("llm_path")
        if llm_path:
            config_file = os.path.join(llm_path, "config.json")
            if not os.path.isdir(llm_path):
                raise FileNotFoundError(f"llm_path {llm_path!r} is not a directory with a Hugging Face checkpoint")
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"llm_path {llm_path!r} has no config.json: not a Hugging Face checkpoint")
            import json

            from recbole_genrec.llm.families import _family_of

            with open(config_file, encoding="utf-8") as f:
                _family_of(str(json.load(f).get("model_type", "?")), llm_path)
        text_encoder_path = cfg.get("text_encoder_path")
        if text_encoder_path and not os.path.isdir(text_encoder_path):
            raise FileNotFoundError(f"text_encoder_path {text_encoder_path!r} is not a directory")

    def _warn_unknown_keys(self):
        if self.final_config_dict.get("local_rank", 0) not in (0, None):
            return  # rank 0 says it once
        logger = getLogger()
        for source, given in (("config file", self.file_config_dict), ("config_dict", self.variable_config_dict),
                              ("command line", self.cmd_config_dict)):
            for message in unknown_key_warnings(given, source):
                logger.warning(message)

    def _get_model_and_dataset(self, model, dataset):
        if model is None and "model" in self.external_config_dict:  # given by config_dict / file / argv
            model = self.external_config_dict["model"]
        if isinstance(model, str):
            model = get_model(model)
        return super()._get_model_and_dataset(model, dataset)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        for file in (
            PROPERTIES_DIR / "overall.yaml",
            PROPERTIES_DIR / "dataset" / f"{dataset}.yaml",
            PROPERTIES_DIR / "model" / f"{model}.yaml",
        ):
            if file.is_file():
                self._update_internal_config_dict(str(file))

    def _init_device(self):
        """RecBole's device setup; a distributed run (``local_rank`` set by the spawner) without
        CUDA joins a gloo process group on the CPU, where RecBole would ask NCCL for GPUs."""
        import torch

        cfg = self.final_config_dict
        gpu_id = cfg.get("gpu_id")
        no_gpu = gpu_id in (None, "", [], ()) or not cfg.get("use_gpu", True) or not torch.cuda.is_available()
        if "local_rank" not in cfg or not no_gpu:
            return super()._init_device()
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(
                backend="gloo", rank=cfg["local_rank"] + cfg.get("offset", 0), world_size=cfg["world_size"],
                init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
            )
        cfg["gpu_id"] = ""
        cfg["device"] = torch.device("cpu")
        cfg["single_spec"] = False
        if cfg["local_rank"] != 0:
            cfg["state"], cfg["show_progress"], cfg["verbose"] = "error", False, False

    def _set_default_parameters(self):
        # RecBole refuses CE-loss sequential models unless the user nulls the negative sampler by
        # hand; a CE model never samples negatives, so do it for them unless they chose otherwise.
        if (
            str(self.final_config_dict.get("loss_type", "")).upper() == "CE"
            and "train_neg_sample_args" not in self.external_config_dict
        ):
            self.final_config_dict["train_neg_sample_args"] = None
        super()._set_default_parameters()
        self.final_config_dict["data_path"] = self._resolve_data_path()

    def _resolve_data_path(self) -> str:
        """``data_path`` given by the user wins (RecBole ignores it for ml-100k); otherwise the
        first existing folder among :func:`dataset_candidates`."""
        user_path = self.external_config_dict.get("data_path")
        if user_path is not None:
            path = Path(user_path) / self.dataset
            if not path.is_dir():
                raise FileNotFoundError(
                    f"dataset '{self.dataset}' not found: data_path={user_path!r} has no folder "
                    f"'{self.dataset}' (expected {path}/{self.dataset}.inter)"
                )
            return str(path)
        candidates = dataset_candidates(self.dataset)
        for path in candidates:
            if (path / f"{self.dataset}.inter").is_file() or (
                path.is_dir() and self.final_config_dict.get("benchmark_filename")
            ):
                return str(path)
        raise FileNotFoundError(
            f"dataset '{self.dataset}' not found in any of "
            f"{[os.fspath(p) for p in candidates]}; set data_path to the folder that holds "
            f"'{self.dataset}/{self.dataset}.inter'"
        )
