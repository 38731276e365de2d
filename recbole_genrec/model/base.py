"""Machinery shared by the generative recommenders: item text embeddings, CF stage, history."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import sys
from logging import getLogger

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_genrec.compat import safe_torch_load
from recbole_genrec.data import TextEncoder, item_text_embeddings, load_item_texts


# config keys RecBole's Trainer reads when a stage trains one of RecBole's models (train_cf_model) on
# the calling model's loaders: that stage's result depends on them, so it signs them
CF_TRAINER_KEYS = ("stopping_step", "eval_step", "valid_metric", "metrics", "topk", "train_batch_size", "learner",
                   "weight_decay", "clip_grad_norm", "train_neg_sample_args", "reproducibility")


class GenerativeRecommender(SequentialRecommender):
    """A sequential RecBole model with named pre-training stages (see ``StagedTrainer``)."""

    stages: tuple = ()
    # ``[n_items]`` bool, or None (every item): the items a decoding model (a trie-constrained beam
    # search) may return; set only inside :meth:`restricted_decoding`
    allowed_items = None

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config

    @contextlib.contextmanager
    def restricted_decoding(self, allowed: torch.Tensor):
        """Within the block, a model that decodes (TIGER, LETTER, TTDS: beam search over a trie of
        item codes) decodes among the ``allowed`` items only (``[n_items]`` bool), so that a
        protocol ranking targets within part of the catalogue (warm/cold: cold targets among cold
        items) gets the model's own ranking of that part, not the few of its beam that fall there.
        Models that score every item need nothing: the protocol masks the others."""
        previous = self.allowed_items
        self.allowed_items = allowed.bool()
        self._reset_decoding()
        try:
            yield
        finally:
            self.allowed_items = previous
            self._reset_decoding()

    def _reset_decoding(self) -> None:
        if hasattr(self, "_trie"):
            self._trie = None  # rebuilt over the items now allowed

    @staticmethod
    def option(config, key, choices):
        """``config[key]``, or a ValueError naming the key and its allowed values."""
        value = config[key]
        if value not in choices:
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value

    # ----- item text -------------------------------------------------------------------
    @staticmethod
    def item_text_embeddings(config, dataset) -> torch.Tensor:
        """``float32 [n_items, d]`` text embeddings (row 0, the padding item, is zero), cached
        under ``<checkpoint_dir>/text_emb``."""
        texts = load_item_texts(config, dataset)
        encoder = TextEncoder(
            config["text_encoder_path"],
            max_length=config["text_encoder_max_length"],
            batch_size=config["text_encoder_batch_size"],
        )
        cache_dir = os.path.join(config["checkpoint_dir"], "text_emb")
        emb = item_text_embeddings(texts, cache_dir, encoder, show_progress=config["show_progress"])
        return torch.from_numpy(np.ascontiguousarray(emb))

    @staticmethod
    def tensor_digest(tensor: torch.Tensor) -> str:
        return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]

    # ----- history ---------------------------------------------------------------------
    def last_items(self, item_seq, item_len, history: int):
        """The last ``history`` items of each sequence, oldest first: ``items [B, H]``, ``valid``."""
        offsets = torch.arange(history, device=item_seq.device)
        pos = item_len.unsqueeze(1) - history + offsets
        valid = pos >= 0
        items = item_seq.gather(1, pos.clamp(min=0)) * valid
        return items, valid

    # ----- stages (defaults: no stage) -------------------------------------------------
    def train_stage(self, stage, train_data, valid_data, stage_config, show_progress=False) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has no stage '{stage}'")

    def stage_state_dict(self, stage) -> dict:
        raise NotImplementedError

    def load_stage_state_dict(self, stage, state) -> None:
        raise NotImplementedError

    def stage_signature(self, stage) -> dict:
        return {}

    def cf_stage_signature(self) -> dict:
        """The settings a stage trained by :func:`train_cf_model` depends on beyond its own keys
        (early stopping, validation metric, batch size, optimiser): part of its signature."""
        return {key: self.config[key] for key in CF_TRAINER_KEYS}


def train_cf_model(config, train_data, valid_data, model_name="SASRec", overrides=None,
                   epochs=10, learning_rate=1e-3, show_progress=False):
    """Train one of RecBole's own models as a stage on the same split; return it (eval mode).

    Its config is the calling model's config with the CF model's defaults from RecBole's model YAML
    and ``overrides`` on top; RecBole's ``Trainer`` runs it with its validation and early stopping.
    """
    import yaml
    from recbole.utils import get_model, init_seed

    import recbole

    cf_config = copy.deepcopy(config)
    yaml_path = os.path.join(os.path.dirname(recbole.__file__), "properties", "model", f"{model_name}.yaml")
    if os.path.isfile(yaml_path):
        with open(yaml_path) as f:
            # RecBole's own loader: it reads "1e-12" as a float, as RecBole does
            for key, value in (yaml.load(f, Loader=config.yaml_loader) or {}).items():
                cf_config[key] = value
    for key, value in (overrides or {}).items():
        cf_config[key] = value
    cf_config["model"] = model_name
    cf_config["epochs"] = epochs
    cf_config["learning_rate"] = learning_rate
    # the stage's result may depend only on what its fingerprint covers: not on the random draws
    # of the calling model's construction (its LLM backbone is not in the fingerprint) or of what
    # ran before, so reseed the global RNGs and the shuffling generator of the loader it iterates
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    if getattr(train_data, "generator", None) is not None:
        train_data.generator.manual_seed(config["seed"])
    cf_model = get_model(model_name)(cf_config, train_data._dataset).to(config["device"])
    return _fit_best(config, cf_config, cf_model, train_data, valid_data, show_progress)


def _fit_best(config, cf_config, cf_model, train_data, valid_data, show_progress):
    """RecBole's ``Trainer.fit`` with early stopping on ``valid_data``; the best epoch's weights are
    loaded back and the temporary checkpoint removed. Returns the model in eval mode.

    In a distributed run (``cf_config`` distributed) rank 0 writes the checkpoint and every rank
    reads it; a CF model trained by each rank on its own gets a file per rank."""
    from recbole.trainer import Trainer

    from recbole_genrec.atomic import temporary_path

    name = cf_config["model"]
    shared = not cf_config["single_spec"] and torch.distributed.is_initialized()
    suffix = "" if shared else f"-rank{config['local_rank']}"
    trainer = Trainer(cf_config, cf_model)
    # unique per process and call, so that runs sharing a checkpoint_dir never clobber each other's
    # (distributed: the name rank 0 draws, which rank 0 writes and every rank reads)
    tmp_file = temporary_path(os.path.join(
        config["checkpoint_dir"], f"{config['model']}-{config['dataset']}-cf-{name}{suffix}.pth"))
    if shared:
        box = [tmp_file]
        torch.distributed.broadcast_object_list(box, src=0)
        tmp_file = box[0]
    trainer.saved_model_file = tmp_file
    try:
        _, best = trainer.fit(train_data, valid_data, saved=True, show_progress=show_progress, verbose=False)
        if shared:
            torch.distributed.barrier()  # rank 0 has written the best checkpoint
        checkpoint = safe_torch_load(tmp_file, map_location=config["device"])
        cf_model.load_state_dict(checkpoint["state_dict"])
        if shared:
            torch.distributed.barrier()  # every rank has read it
    finally:
        if (not shared or config["local_rank"] == 0) and os.path.exists(tmp_file):
            os.remove(tmp_file)
    getLogger().info(f"CF model {name}: best valid {dict(best or {})}")
    return cf_model.eval()


def load_cf_item_embeddings(path: str, n_items: int) -> torch.Tensor:
    """Item embedding table from a RecBole checkpoint (``cf_model_path``) of the same dataset."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cf_model_path {path!r} does not exist")
    checkpoint = safe_torch_load(path, map_location="cpu")
    state = checkpoint.get("state_dict", checkpoint)
    for key in ("item_embedding.weight", "item_embedding", "embedding_item.weight"):
        if key in state:
            emb = state[key]
            if emb.shape[0] != n_items:
                raise ValueError(
                    f"cf_model_path {path!r}: {key} has {emb.shape[0]} rows but the dataset has {n_items} items"
                )
            return emb.float()
    raise KeyError(f"cf_model_path {path!r} has no item embedding table (looked for item_embedding.weight)")


# data keys a CF model trained on its own loaders must share with the calling model
SHARED_DATA_KEYS = (
    "USER_ID_FIELD", "ITEM_ID_FIELD", "RATING_FIELD", "TIME_FIELD", "load_col", "unload_col", "unused_col",
    "field_separator", "seq_separator", "val_interval", "user_inter_num_interval", "item_inter_num_interval",
    "filter_inter_by_user_or_item", "rm_dup_inter", "eval_args", "seed", "reproducibility", "checkpoint_dir",
    "device", "use_gpu", "gpu_id", "state", "show_progress", "encoding",
)


def train_general_cf_model(config, id_tokens, model_name="LightGCN", epochs=10, learning_rate=1e-3, batch_size=2048,
                           overrides=None, show_progress=False, exclude_users=None):
    """Train one of RecBole's general models (e.g. LightGCN, BPR) on the same data and split, with
    its own pairwise loaders; return it (eval mode), its dataset and its full training dataset.

    Its ids are checked equal to ``id_tokens`` (``{field: dataset.field2id_token[field]}`` of the
    calling model's dataset), so its embedding rows can be used directly. ``exclude_users`` (internal ids) are removed from its
    training interactions (the graph and the loss) and from its validation data (early stopping): TokenRec's
    unseen-user protocol."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, init_seed

    from recbole_genrec.config import Config

    cf_dict = {k: config[k] for k in SHARED_DATA_KEYS if config[k] is not None}
    cf_dict.update({"data_path": os.path.dirname(os.path.normpath(config["data_path"])), "epochs": epochs,
                    "learning_rate": learning_rate, "train_batch_size": batch_size, **(overrides or {})})
    argv, sys.argv = sys.argv, sys.argv[:1]  # the caller's --epochs=... etc. must not reach the CF stage
    try:
        cf_config = Config(model=model_name, dataset=config["dataset"], config_dict=cf_dict)
    finally:
        sys.argv = argv
    init_seed(cf_config["seed"], cf_config["reproducibility"])
    data = create_dataset(cf_config)
    for field, tokens in id_tokens.items():
        if list(data.field2id_token[field]) != list(tokens):
            raise RuntimeError(f"{model_name}'s {field} ids differ from {config['model']}'s: use the same data settings")
    train, valid, _ = data_preparation(cf_config, data)
    full_train = train._dataset
    if exclude_users is not None and len(exclude_users):
        users = full_train.inter_feat[full_train.uid_field]
        keep = ~torch.isin(users, torch.as_tensor(exclude_users))
        train = type(train)(cf_config, full_train.copy(full_train.inter_feat[keep.nonzero().flatten()]),
                            train._sampler, shuffle=True)
        vset = valid._dataset  # nor may they steer early stopping
        keep = ~torch.isin(vset.inter_feat[vset.uid_field], torch.as_tensor(exclude_users))
        valid = type(valid)(cf_config, vset.copy(vset.inter_feat[keep.nonzero().flatten()]), valid._sampler,
                            shuffle=False)
    init_seed(cf_config["seed"], cf_config["reproducibility"])
    cf_model = get_model(model_name)(cf_config, train._dataset).to(config["device"])
    cf_model = _fit_best(config, cf_config, cf_model, train, valid, show_progress)
    cf_model.cf_config = cf_config
    return cf_model, data, full_train
