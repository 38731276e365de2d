"""Lookup chains: the plugin's models, trainers and datasets first, RecBole's second."""

from __future__ import annotations

import importlib

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

# Model name -> module that defines it (one model per file, named after its paper).
MODEL_MODULES = {
    "TIGER": "recbole_genrec.model.tiger",
    "LETTER": "recbole_genrec.model.letter",
    "SETRec": "recbole_genrec.model.setrec",
    "TokenRec": "recbole_genrec.model.tokenrec",
    "TwoLevelLLMRec": "recbole_genrec.model.two_level",
    "TTDS": "recbole_genrec.model.ttds",
}


def get_model(model_name: str):
    """Return the model class called ``model_name`` (ours, else RecBole's)."""
    if model_name in MODEL_MODULES:
        return getattr(importlib.import_module(MODEL_MODULES[model_name]), model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ModuleNotFoundError) as err:
        # RecBole's lookup ends in exlib_recommender, whose import needs xgboost/lightgbm
        raise ValueError(
            f"model '{model_name}' is neither a recbole_genrec model "
            f"({', '.join(sorted(MODEL_MODULES))}) nor a RecBole model"
            + ("" if isinstance(err, ModuleNotFoundError) else f" ({err})")
        ) from err


def get_trainer(model_type, model_name: str):
    """The trainer a model declares (``trainer_class``), else RecBole's choice."""
    if model_name in MODEL_MODULES:
        trainer = getattr(get_model(model_name), "trainer_class", None)
        if trainer is not None:
            return trainer
    return recbole_get_trainer(model_type, model_name)


def create_dataset(config):
    """The dataset class a model declares (``dataset_class``), else RecBole's choice."""
    from recbole.data import create_dataset as recbole_create_dataset

    model_class = get_model(config["model"])
    dataset_class = getattr(model_class, "dataset_class", None)
    if dataset_class is not None:
        return dataset_class(config)
    return recbole_create_dataset(config)
