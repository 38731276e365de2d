"""``Config`` for recbole_genrec: RecBole's configurator plus the plugin's packaged YAMLs.

Priority stays RecBole's: command line > ``config_dict`` > ``config_file_list`` > internal
defaults. Internal defaults are RecBole's (``overall.yaml``, model, dataset, ``sequential.yaml``)
followed by ours (``recbole_genrec/properties/overall.yaml``, ``dataset/<dataset>.yaml``, then
``model/<Model>.yaml``), so a plugin model's YAML wins over RecBole's
quick-start defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_genrec.utils import get_model

PACKAGE_DIR = Path(__file__).resolve().parent
PROPERTIES_DIR = PACKAGE_DIR / "properties"
REPO_DATASET_DIR = PACKAGE_DIR.parent / "dataset_atomic"


def _recbole_example_dir() -> Path:
    import recbole

    return Path(recbole.__file__).resolve().parent / "dataset_example"


def dataset_candidates(dataset: str) -> list[Path]:
    """Where a dataset named ``dataset`` is looked for when ``data_path`` is not given."""
    return [
        Path("dataset") / dataset,  # RecBole's default ``data_path``, relative to the cwd
        REPO_DATASET_DIR / dataset,  # datasets shipped with this repository
        _recbole_example_dir() / dataset,  # ml-100k inside RecBole's wheel
    ]


class Config(RecBoleConfig):
    """RecBole ``Config`` that knows the plugin's models, YAML defaults and datasets."""

    def _get_model_and_dataset(self, model, dataset):
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
