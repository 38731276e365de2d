"""Stage files are a cache: keyed by everything that produced them (data, split, code)."""

import glob
import os
import shutil

import recbole_genrec  # noqa: F401
from conftest import ROOT, TINY_YAML
from recbole_genrec.config import Config
from recbole_genrec.fingerprint import data_fingerprint
from recbole_genrec.quick_start import run_recbole_genrec, run_warm_cold


def test_leave_one_out_then_warm_cold_leave_two_cf_stage_files(tmp_path):
    """A warm/cold run must not reuse a CF stage trained on the leave-one-out split (which saw
    most of the warm/cold test period)."""
    cfg = {"checkpoint_dir": str(tmp_path), "epochs": 1, "cf_epochs": 1}
    run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML], dict(cfg), saved=False)
    run_warm_cold(["SETRec"], "genrec-tiny", [TINY_YAML], dict(cfg), saved=False)
    files = glob.glob(os.path.join(tmp_path, "SETRec-genrec-tiny-cf-*.pth"))
    assert len(files) == 2, files


def test_data_fingerprint_follows_file_content_and_data_settings(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "dataset_atomic" / "genrec-tiny", data / "genrec-tiny")

    def fingerprint(**extra):
        config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"data_path": str(data), **extra})
        return data_fingerprint(config)

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(user_inter_num_interval="[5,inf)") != base  # a filter
    assert fingerprint(eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "mode": "full"}) != base
    inter = data / "genrec-tiny" / "genrec-tiny.inter"
    lines = inter.read_text().splitlines()
    inter.write_text("\n".join(lines[:-1]) + "\n")  # one interaction less, same file name
    assert fingerprint() != base
