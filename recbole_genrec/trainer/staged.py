"""A RecBole ``Trainer`` that runs a model's named stages before the recommender stage.

A model declares ``stages`` (e.g. ``("cf", "tokenizer")``) and implements
``train_stage(name, train_data, valid_data, stage_config, show_progress) -> metrics``,
``stage_state_dict(name)``, ``load_stage_state_dict(name, state)`` and
``stage_signature(name) -> dict`` (what the stage's result depends on). Each stage reads its own
``<stage>_epochs``, ``<stage>_learning_rate`` and ``<stage>_batch_size`` from the config, logs
through RecBole's logger, and is checkpointed to
``<checkpoint_dir>/<Model>-<dataset>-<stage>-<fingerprint>.pth``. With ``resume_stages`` a stage
whose checkpoint exists with the same fingerprint is loaded instead of trained. The fingerprint
covers everything that produced the stage (:mod:`recbole_genrec.fingerprint`): the content of the
dataset's atomic files and the settings that decide the training data (split ``eval_args``,
filters, columns, ``data_path``), the model's signature and stage config, the seed, the code of
the package, and the fingerprints of the stages before it. The final "recommender"
stage is RecBole's own ``fit``/``evaluate``; every checkpoint is written to a temporary file
and renamed.
"""

from __future__ import annotations

import os
import time

import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_genrec.atomic import atomic_write
from recbole_genrec.compat import safe_torch_load
from recbole_genrec.fingerprint import code_fingerprint, data_fingerprint, digest

STAGE_KEYS = ("epochs", "learning_rate", "batch_size")


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp, pickle_protocol=4))


class StagedTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage_files = {}
        self.saved_model_file = self.from_rank0(self.saved_model_file)  # the file rank 0 writes

    @property
    def distributed(self) -> bool:
        return not self.config["single_spec"] and torch.distributed.is_initialized()

    @property
    def is_rank0(self) -> bool:
        return not self.distributed or self.config["local_rank"] == 0

    def from_rank0(self, obj):
        """``obj`` as rank 0 has it (unchanged when not distributed)."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_rank0(self) -> None:
        """In a distributed run, return once every rank (rank 0's checkpoint writes included) is here."""
        if self.distributed:
            torch.distributed.barrier()

    # ----- stages ----------------------------------------------------------------------
    def stage_config(self, stage: str) -> dict:
        defaults = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 256}
        out = {}
        for key in STAGE_KEYS:
            value = self.config[f"{stage}_{key}"]
            out[key] = defaults[key] if value is None else value
        return out

    def _fingerprint(self, stage: str, previous: list[str]) -> str:
        payload = {
            "model": self.config["model"],
            "dataset": self.config["dataset"],
            "data": data_fingerprint(self.config),
            "code": code_fingerprint(),
            "seed": self.config["seed"],
            "stage": stage,
            "stage_config": self.stage_config(stage),
            "signature": self.model.stage_signature(stage),
            "previous": previous,
        }
        return digest(payload)

    def run_stages(self, train_data, valid_data=None, show_progress=False) -> dict:
        """Train (or resume) every declared stage in order; return ``{stage: metrics}``."""
        results, previous = {}, []
        for stage in getattr(self.model, "stages", ()):
            fingerprint = self._fingerprint(stage, previous)
            path = os.path.join(
                self.checkpoint_dir, f"{self.config['model']}-{self.config['dataset']}-{stage}-{fingerprint}.pth"
            )
            self.stage_files[stage] = path
            stage_cfg = self.stage_config(stage)
            if self.from_rank0(self.config["resume_stages"] and os.path.isfile(path)):
                saved = safe_torch_load(path, map_location=self.device)
                self.model.load_stage_state_dict(stage, saved["state"])
                results[stage] = saved.get("metrics", {})
                self.logger.info(set_color(f"stage [{stage}]", "green") + f" resumed from {path}: {results[stage]}")
            else:
                self.logger.info(set_color(f"stage [{stage}]", "green") + f" training with {stage_cfg}")
                start = time.perf_counter()
                metrics = self.model.train_stage(stage, train_data, valid_data, stage_cfg, show_progress) or {}
                metrics = {**metrics, "time_s": round(time.perf_counter() - start, 2)}
                if self.distributed:  # every rank continues from rank 0's result of the stage
                    state = self.from_rank0(self.model.stage_state_dict(stage) if self.is_rank0 else None)
                    if not self.is_rank0:
                        self.model.load_stage_state_dict(stage, state)
                if self.is_rank0:
                    atomic_torch_save(
                        {"stage": stage, "fingerprint": fingerprint, "metrics": metrics,
                         "state": self.model.stage_state_dict(stage)},
                        path,
                    )
                results[stage] = metrics
                self.logger.info(set_color(f"stage [{stage}]", "green") + f" done: {metrics}; saved {path}")
            previous.append(fingerprint)
        return results

    # ----- recommender stage -----------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.stage_results = self.run_stages(train_data, valid_data, show_progress)
        # stages may freeze modules: optimise (and, distributed, synchronise) only what is still trainable
        self.optimizer = self._build_optimizer(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.distributed:
            from recbole.trainer import trainer as recbole_trainer

            self.distributed_model = recbole_trainer.DistributedDataParallel(
                self.model, device_ids=[self.config["local_rank"]])
        self.logger.info(set_color("stage [recommender]", "green") + f" training for {self.epochs} epochs")
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_write(target, lambda tmp: super(StagedTrainer, self)._save_checkpoint(
            epoch, verbose=False, saved_model_file=tmp, **kwargs))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {target}")
