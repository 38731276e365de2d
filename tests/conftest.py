import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = str(ROOT / "tests" / "tiny.yaml")
RENAMED_YAML = str(ROOT / "tests" / "tiny_renamed.yaml")


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Each test runs in its own folder: RecBole writes log/ and saved/ relative to the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest"])  # RecBole's Config parses --key=value from argv


@pytest.fixture
def ckpt(tmp_path):
    return {"checkpoint_dir": str(tmp_path / "saved")}


def save_word_backbone(path, preset, words, pad="<pad>", unk="<unk>", eos=None):
    """Save a tiny ``preset`` model with a whitespace word-level tokenizer over ``words`` to
    ``path`` (an ``llm_path``: a backbone with a text vocabulary); returns ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from recbole_genrec.llm.backbone import build_backbone

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad,
                            **({"eos_token": eos} if eos else {})).save_pretrained(path)
    build_backbone(preset, len(words)).model.save_pretrained(path)
    return path


def split_words(text):
    """The words ``save_word_backbone``'s tokenizer sees in ``text``."""
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


@pytest.fixture
def one_thread():
    """Bit-identical CPU results need one thread: on a 2-core AMD EPYC (torch's MKL build) two
    2-thread runs differed in the last bits and swapped near-tied items (test_determinism.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
