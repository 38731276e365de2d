"""A RecBole ``Trainer`` that runs a model's named stages before the recommender stage, and that
can be killed and resumed.

Stages
------
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
filters, columns, ``data_path``), the model's signature and stage config, the seed, the code the
model's run executes (:func:`recbole_genrec.fingerprint.run_code_fingerprint`: an edit of another
model's file keeps this model's stages), and the fingerprints of the stages before it. The final "recommender"
stage is RecBole's own ``fit``/``evaluate``; every checkpoint is written to a temporary file
and renamed. Stage files carry a sha256 trailer (:mod:`recbole_genrec.atomic`): a truncated or
corrupted one is logged, removed and trained again.

Checkpoint names and resuming the recommender stage
---------------------------------------------------
:class:`ResumableTrainer` (a mixin of :class:`StagedTrainer`, and of RecBole's own trainers when a
model runs through ``recbole_genrec.quick_start``) names the best checkpoint
``<checkpoint_dir>/<Model>-<time>-<pid>-<random>.pth`` (RecBole: ``<Model>-<time>.pth``, which two
runs started in the same second share), and after every epoch writes a "last" checkpoint
``<best checkpoint>.last`` (model, optimizer, epoch, early-stopping state, best validation
result and curve, the python/numpy/torch RNG states and the shuffling generators of the train and
validation loaders), atomically and with a checksum. It is removed when the run ends.

``resume: True`` (``--resume`` on the command line) names the run deterministically,
``<checkpoint_dir>/<Model>-<dataset>-<run fingerprint>.pth``, where the fingerprint covers the
whole config (less the keys in :data:`RUN_ONLY_KEYS`: paths, devices, logging), the content of the
dataset's files and the package's code, and keeps the ``.last`` file: running the same command
again continues after the last finished epoch (RecBole's ``resume_checkpoint`` semantics, plus
the RNG and loader states, so the result equals an uninterrupted run's bit for bit on the CPU),
and a finished run is not trained again (its best checkpoint is evaluated). Another config,
data or code version is another run and starts from scratch. The RNG states are saved at the end
of an epoch and restored before the next one, rather than reseeded per epoch, so that an
uninterrupted run draws exactly what it drew before resuming existed. While such a run trains,
``<best checkpoint>.lock`` (an advisory ``flock``, released when the process ends, killed or not)
makes a second process with the same run fail at once. ``resume_checkpoint: PATH`` resumes
the run whose best checkpoint (or ``.last`` file) is ``PATH``; a checkpoint written by RecBole
itself is resumed with RecBole's semantics (model, optimizer, epoch, ``cur_step``,
``best_valid_score``).
"""

from __future__ import annotations

import datetime
import os
import random
import secrets
import time
from collections import OrderedDict

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import dict2str, early_stopping, get_local_time, init_seed, set_color

from recbole_genrec.atomic import atomic_write, load_verified, remove_stale_temporaries
from recbole_genrec.compat import safe_torch_load
from recbole_genrec.fingerprint import assets_fingerprint, data_fingerprint, digest, run_code_fingerprint

STAGE_KEYS = ("epochs", "learning_rate", "batch_size")
LAST_SUFFIX = ".last"
LAST_FORMAT = "recbole_genrec-last-1"
# config keys that do not change what a run computes: left out of the run fingerprint (``nproc`` and
# ``world_size`` stay in: a distributed run splits each batch over its processes)
RUN_ONLY_KEYS = frozenset({
    "resume", "resume_checkpoint", "checkpoint_dir", "show_progress", "state", "verbose", "log_wandb",
    "wandb_project", "gpu_id", "use_gpu", "device", "single_spec", "local_rank", "ip",
    "port", "offset", "group_offset", "save_dataset", "dataset_save_path", "save_dataloaders",
    "dataloaders_save_path",
    # options of our command line that RecBole's Config also reads from argv
    "compare", "protocol", "seeds", "report", "reuse_runs", "records_only", "recommend", "users", "histories", "k", "hyper",
    "params_file", "algo", "max_evals", "output_file", "config_files",
})


def atomic_torch_save(obj, path: str, checksum: bool = True) -> None:
    """``torch.save`` to a temporary file in the same folder (with a sha256 trailer unless
    ``checksum=False``), then rename over ``path``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp, pickle_protocol=4), checksum=checksum)


def run_fingerprint(config) -> str:
    """What a run computes: its config (less :data:`RUN_ONLY_KEYS`), its data, the code it runs and
    the packages it runs on (:func:`recbole_genrec.fingerprint.run_code_fingerprint`) and the model
    files it loads (:func:`recbole_genrec.fingerprint.assets_fingerprint`)."""
    settings = {key: value for key, value in config.final_config_dict.items() if key not in RUN_ONLY_KEYS}
    return digest({"config": settings, "data": data_fingerprint(config), "code": run_code_fingerprint(config["model"]),
                   "assets": assets_fingerprint(config)})


def unique_checkpoint_file(config) -> str:
    """RecBole's ``<Model>-<time>.pth`` made unique per process and call."""
    name = f"{config['model']}-{get_local_time()}-{os.getpid()}-{secrets.token_hex(3)}.pth"
    return os.path.join(config["checkpoint_dir"], name)


def run_checkpoint_file(config) -> tuple[str, bool]:
    """``(best checkpoint path, resumable)`` of a run: the path of ``resume_checkpoint`` (which
    must exist), the deterministic name with ``resume``, else a unique name."""
    explicit = config["resume_checkpoint"]
    if explicit:
        explicit = os.fspath(explicit)
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"resume_checkpoint {explicit!r} does not exist")
        return (explicit[: -len(LAST_SUFFIX)] if explicit.endswith(LAST_SUFFIX) else explicit), True
    if config["resume"]:
        name = f"{config['model']}-{config['dataset']}-{run_fingerprint(config)}.pth"
        return os.path.join(config["checkpoint_dir"], name), True
    return unique_checkpoint_file(config), False


def _rng_state(*loaders) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loaders": [None if getattr(loader, "generator", None) is None else loader.generator.get_state()
                    for loader in loaders],
    }
    return state


def _set_rng_state(state: dict, *loaders) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for loader, generator_state in zip(loaders, state["loaders"]):
        if generator_state is not None and getattr(loader, "generator", None) is not None:
            loader.generator.set_state(generator_state.cpu())


class _RunLock:
    """An advisory lock on ``<checkpoint>.lock`` so that two processes never train the same
    deterministically named run at once (released when the process ends, killed or not)."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"another process is training the run {self.path[: -len('.lock')]} (resume): wait for it, "
                f"or run without resume") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    __del__ = release


class ResumableTrainer:
    """Mixin for RecBole ``Trainer`` subclasses whose ``fit`` is RecBole's: unique or deterministic
    checkpoint names, atomic best checkpoints, a ``.last`` checkpoint per epoch and resuming
    (module docstring). Use :func:`resumable` to add it to a trainer class."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file, self.resumable = run_checkpoint_file(config)
        self.saved_model_file = self.from_rank0(self.saved_model_file)  # the file rank 0 writes
        self.valid_curve = []
        if self.is_rank0:
            remove_stale_temporaries(self.checkpoint_dir)
        # held from here (before any stage is trained) to the end of fit
        self._lock = _RunLock(self.saved_model_file + ".lock") if self.resumable and self.is_rank0 else None
        if self._lock is not None:
            self._lock.acquire()

    # ----- distributed helpers ---------------------------------------------------------
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

    # ----- checkpoints -----------------------------------------------------------------
    @property
    def last_checkpoint_file(self) -> str:
        return self.saved_model_file + LAST_SUFFIX

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.is_rank0:
            return
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_write(target, lambda tmp: super(ResumableTrainer, self)._save_checkpoint(
            epoch, verbose=False, saved_model_file=tmp, **kwargs))
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {target}")

    def _save_last(self, epoch_idx: int, stopped: bool, train_data, valid_data) -> None:
        """The ``.last`` checkpoint after epoch ``epoch_idx`` (``stopped``: by early stopping):
        everything the next epoch starts from."""
        if not self.is_rank0:
            return
        state = {
            "format": LAST_FORMAT,
            "epoch": epoch_idx,
            "stopped": bool(stopped),
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": None if self.best_valid_result is None else
            {str(k): float(v) for k, v in self.best_valid_result.items()},
            "valid_curve": [(int(e), float(s)) for e, s in self.valid_curve],
            "valid_step": self._valid_step,
            "recommender_time_s": self._recommender_time_s(),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(train_data, valid_data),
        }
        atomic_torch_save(state, self.last_checkpoint_file)

    def _resume(self):
        """Load the run's ``.last`` checkpoint (or, given as ``resume_checkpoint``, a checkpoint of
        RecBole's); return ``(finished, rng_state)``, or ``None`` when there is nothing to resume."""
        last = self.last_checkpoint_file
        state = load_verified(last, lambda p: safe_torch_load(p, map_location=self.device),
                              "resume checkpoint")
        if state is None:
            explicit = self.config["resume_checkpoint"]
            if explicit and os.path.isfile(os.fspath(explicit)) and not os.fspath(explicit).endswith(LAST_SUFFIX):
                self.resume_checkpoint(explicit)  # RecBole's own checkpoint and semantics
                self.logger.info(set_color("resume", "green") + f": RecBole checkpoint {explicit}, "
                                 f"epoch {self.start_epoch} (RNG states not restored)")
                self.logger.warning("train_time_s counts this process only: a RecBole checkpoint keeps no "
                                    "training time")
                return False, None
            if explicit:
                raise FileNotFoundError(f"resume_checkpoint {os.fspath(explicit)!r}: no usable checkpoint {last}")
            self.logger.info(set_color("resume", "green") + f": no checkpoint {last} for this config, data "
                             "and code; training from the start")
            return None
        if state.get("format") != LAST_FORMAT:
            raise ValueError(f"{last} is not a recbole_genrec resume checkpoint")
        self.model.load_state_dict(state["state_dict"])
        self.model.load_other_parameter(state.get("other_parameter"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        result = state["best_valid_result"]
        self.best_valid_result = None if result is None else OrderedDict(result)
        self.valid_curve = [tuple(point) for point in state["valid_curve"]]
        self._valid_step = state.get("valid_step", 0)
        if "recommender_time_s" in state:
            self._time_before = float(state["recommender_time_s"])
        else:
            self.logger.warning(f"{last} keeps no training time (written by an older version): train_time_s "
                                "counts the epochs from here on only")
        finished = state["stopped"] or self.start_epoch >= self.epochs
        if finished:
            how = "stopped early" if state["stopped"] else f"{self.epochs} epochs"
            self.logger.info(set_color("resume", "green") + f": {last} is a finished run ({how}, last epoch "
                             f"{state['epoch']}); not trained again")
        else:
            self.logger.info(set_color("resume", "green") + f": {last}, training from epoch {self.start_epoch}")
        return finished, state["rng"]

    # ----- the recommender stage -------------------------------------------------------
    def _recommender_time_s(self) -> float:
        """Seconds the recommender stage has trained: this process's ``fit`` so far plus, after a
        resume, the earlier processes' (kept in the ``.last`` checkpoint)."""
        return self._time_before + time.perf_counter() - self._fit_start

    def _stage_time_s(self) -> float:
        return 0.0

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit``, resumable; sets ``run_train_time_s``, the training time of the whole
        run (stages, and the recommender epochs of every process that trained them)."""
        self._valid_step = 0
        self.valid_curve = []
        self._time_before, self._fit_start = 0.0, time.perf_counter()
        try:
            if not saved:
                if self.resumable:
                    self.logger.warning("resume needs saved checkpoints: this run (saved=False) starts from the start")
                return self._fit_loop(train_data, valid_data, verbose, False, show_progress, callback_fn, None)
            resumed = self._resume() if self.resumable else None
            finished, rng = resumed if resumed is not None else (False, None)
            if callback_fn is not None:  # the epochs before the resumed one, as an uninterrupted run saw them
                for epoch, score in self.valid_curve:
                    callback_fn(epoch, score)
            if finished:
                return self.best_valid_score, self.best_valid_result
            result = self._fit_loop(train_data, valid_data, verbose, True, show_progress, callback_fn, rng)
            if not self.resumable and self.is_rank0 and os.path.exists(self.last_checkpoint_file):
                os.remove(self.last_checkpoint_file)  # the run is over: its best checkpoint stays
            return result
        finally:
            self.run_train_time_s = self._stage_time_s() + self._recommender_time_s()
            if self._lock is not None:
                self._lock.release()

    def _eta_line(self, epoch_idx: int, seconds: float) -> str:
        """``epoch i/N took s; at most M more (ETA hh:mm:ss), early stop after P more without gain``."""
        self._epoch_seconds = getattr(self, "_epoch_seconds", []) + [seconds]
        mean = sum(self._epoch_seconds[-5:]) / len(self._epoch_seconds[-5:])
        left = self.epochs - epoch_idx - 1
        line = (f"epoch {epoch_idx + 1}/{self.epochs} took {seconds:.1f} s; at most {left} more "
                f"(ETA {datetime.timedelta(seconds=round(mean * left))})")
        if self.eval_step > 0 and self.stopping_step:
            # RecBole's early_stopping stops once cur_step exceeds stopping_step
            patience = (self.stopping_step - self.cur_step + 1) * self.eval_step
            line += (f", early stop after {patience} more epochs without a better {self.valid_metric} "
                     f"(ETA {datetime.timedelta(seconds=round(mean * min(left, patience)))})")
        return set_color("progress", "green") + ": " + line

    def _fit_loop(self, train_data, valid_data, verbose, saved, show_progress, callback_fn, rng):
        """RecBole 1.2.1's ``Trainer.fit`` loop, plus the ``.last`` checkpoint after each epoch and
        the restored RNG states before the first one."""
        if saved and self.start_epoch >= self.epochs:
            self._save_checkpoint(-1, verbose=verbose)

        self.eval_collector.data_collect(train_data)
        if self.config["train_neg_sample_args"].get("dynamic", False):
            train_data.get_model(self.model)
        if rng is not None and not self.distributed:
            _set_rng_state(rng, train_data, valid_data)

        for epoch_idx in range(self.start_epoch, self.epochs):
            training_start_time = time.time()
            try:
                train_loss = self._train_epoch(train_data, epoch_idx, show_progress=show_progress)
            except ValueError as err:  # RecBole's _check_nan says only "Training loss is nan"
                if "nan" not in str(err).lower():
                    raise
                raise FloatingPointError(
                    f"{self.config['model']}: the training loss became NaN in stage 'recommender', epoch "
                    f"{epoch_idx}; try a lower learning_rate (now {self.config['learning_rate']})") from err
            self.train_loss_dict[epoch_idx] = sum(train_loss) if isinstance(train_loss, tuple) else train_loss
            training_end_time = time.time()
            train_loss_output = self._generate_train_loss_output(
                epoch_idx, training_start_time, training_end_time, train_loss)
            if verbose:
                self.logger.info(train_loss_output)
            self._add_train_loss_to_tensorboard(epoch_idx, train_loss)
            self.wandblogger.log_metrics(
                {"epoch": epoch_idx, "train_loss": train_loss, "train_step": epoch_idx}, head="train")

            stop_flag = False
            if self.eval_step <= 0 or not valid_data:
                if saved:
                    self._save_checkpoint(epoch_idx, verbose=verbose)
            elif (epoch_idx + 1) % self.eval_step == 0:
                valid_start_time = time.time()
                valid_score, valid_result = self._valid_epoch(valid_data, show_progress=show_progress)
                self.best_valid_score, self.cur_step, stop_flag, update_flag = early_stopping(
                    valid_score, self.best_valid_score, self.cur_step,
                    max_step=self.stopping_step, bigger=self.valid_metric_bigger)
                valid_end_time = time.time()
                valid_score_output = (
                    set_color("epoch %d evaluating", "green") + " [" + set_color("time", "blue")
                    + ": %.2fs, " + set_color("valid_score", "blue") + ": %f]"
                ) % (epoch_idx, valid_end_time - valid_start_time, valid_score)
                valid_result_output = set_color("valid result", "blue") + ": \n" + dict2str(valid_result)
                if verbose:
                    self.logger.info(valid_score_output)
                    self.logger.info(valid_result_output)
                self.tensorboard.add_scalar("Vaild_score", valid_score, epoch_idx)
                self.wandblogger.log_metrics({**valid_result, "valid_step": self._valid_step}, head="valid")
                if update_flag:
                    if saved:
                        self._save_checkpoint(epoch_idx, verbose=verbose)
                    self.best_valid_result = valid_result
                self.valid_curve.append((int(epoch_idx), float(valid_score)))
                if callback_fn:
                    callback_fn(epoch_idx, valid_score)
                if stop_flag:
                    stop_output = "Finished training, best eval result in epoch %d" % (
                        epoch_idx - self.cur_step * self.eval_step)
                    if verbose:
                        self.logger.info(stop_output)
                else:
                    self._valid_step += 1
            if saved:
                self._save_last(epoch_idx, stop_flag, train_data, valid_data)
            if verbose and not stop_flag:
                self.logger.info(self._eta_line(epoch_idx, time.time() - training_start_time))
            if stop_flag:
                break

        self._add_hparam_to_tensorboard(self.best_valid_score)
        return self.best_valid_score, self.best_valid_result


_RESUMABLE_CLASSES: dict = {}


def resumable(trainer_class):
    """``trainer_class`` with :class:`ResumableTrainer` mixed in, when its ``fit`` is RecBole's
    ``Trainer.fit`` (other trainers, e.g. for tree models, are returned unchanged)."""
    if issubclass(trainer_class, ResumableTrainer):
        return trainer_class
    if not (issubclass(trainer_class, Trainer) and trainer_class.fit is Trainer.fit):
        return trainer_class
    if trainer_class not in _RESUMABLE_CLASSES:
        _RESUMABLE_CLASSES[trainer_class] = type(
            trainer_class.__name__, (ResumableTrainer, trainer_class),
            {"__module__": trainer_class.__module__, "__doc__": trainer_class.__doc__})
    return _RESUMABLE_CLASSES[trainer_class]


class StagedTrainer(ResumableTrainer, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage_files = {}

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
            "code": run_code_fingerprint(self.config["model"]),
            "assets": assets_fingerprint(self.config),
            "seed": self.config["seed"],
            "world_size": self.config["world_size"],  # a distributed stage splits each batch over its processes
            "stage": stage,
            "stage_config": self.stage_config(stage),
            "signature": self.model.stage_signature(stage),
            "previous": previous,
        }
        return digest(payload)

    def _stage_time_s(self) -> float:
        """Seconds the run's stages took when they were trained (also when this run loaded them)."""
        return sum(float((metrics or {}).get("time_s", 0.0)) for metrics in getattr(self, "stage_results", {}).values())

    def _load_stage_file(self, stage: str, path: str):
        """The stage file's content once its checksum is verified, else ``None`` (a corrupted
        file is logged and removed)."""
        return load_verified(path, lambda p: safe_torch_load(p, map_location=self.device), f"stage [{stage}] file")

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
            saved = None
            if self.config["resume_stages"] and self.is_rank0:
                saved = self._load_stage_file(stage, path)
            if self.from_rank0(saved is not None):
                if saved is None:  # another rank: rank 0 has verified the file
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
        # the recommender stage starts from one random state whether its stages were trained or resumed
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        for loader in (train_data, valid_data):
            if getattr(loader, "generator", None) is not None:
                loader.generator.manual_seed(self.config["seed"])
        # stages may freeze modules: optimise (and, distributed, synchronise) only what is still trainable
        self.optimizer = self._build_optimizer(params=[p for p in self.model.parameters() if p.requires_grad])
        if self.distributed:
            from recbole.trainer import trainer as recbole_trainer

            self.distributed_model = recbole_trainer.DistributedDataParallel(
                self.model, device_ids=[self.config["local_rank"]])
        self.logger.info(set_color("stage [recommender]", "green") + f" training for {self.epochs} epochs")
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
