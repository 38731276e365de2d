import os
import sys
from pathlib import Path

import pytest

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
