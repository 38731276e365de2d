"""Kill and resume, verified artifacts, concurrent runs in one checkpoint_dir (issue 15, items 1, 3, 5)."""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import recbole_genrec  # noqa: F401
from conftest import ROOT, TINY_YAML
from recbole_genrec.atomic import (
    CorruptArtifactError,
    atomic_write,
    load_verified,
    remove_stale_temporaries,
    temporary_path,
    verify_file,
)
from recbole_genrec.compat import safe_torch_load
from recbole_genrec.evaluation import carry
from recbole_genrec.quick_start import run_recbole_genrec

SMALL = {"TIGER": {"tokenizer_epochs": 5},
         "SETRec": {"n_sem": 2, "cf_hidden_size": 16, "cf_epochs": 1, "setrec_beta_grid": [0.0, 1.0]}}

# Runs one model (or a compare) in a fresh process and prints its result as JSON. With
# KILL_MARKER set, the second batch of epoch 2 (epoch_idx 1) creates the marker file and sleeps:
# the test SIGKILLs the process there, in the middle of the recommender stage's training.
DRIVER = r'''
import json, os, sys, time
sys.argv = sys.argv[:1]
from recbole.trainer import Trainer
from recbole_genrec.quick_start import compare, run_recbole_genrec

marker = os.environ.get("KILL_MARKER")
if marker:
    train_epoch = Trainer._train_epoch

    def hooked(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if epoch_idx == 1:
            loss = loss_func or self.model.calculate_loss
            calls = [0]

            def stalling(interaction):
                calls[0] += 1
                if calls[0] == 2:
                    open(marker, "w").close()
                    time.sleep(300)
                return loss(interaction)

            loss_func = stalling
        return train_epoch(self, train_data, epoch_idx, loss_func, show_progress)

    Trainer._train_epoch = hooked

args = json.loads(os.environ["RUN"])
if args.get("compare"):
    results = compare(args["compare"], "genrec-tiny", [args["yaml"]], args["config"])
else:
    results = {args["model"]: run_recbole_genrec(args["model"], "genrec-tiny", [args["yaml"]], args["config"])}
print("RESULT " + json.dumps({name: {"test": {k: float(v) for k, v in r["test_result"].items()},
                                     "best": float(r["best_valid_score"]), "curve": r["valid_curve"],
                                     "file": r["model_file"]} for name, r in results.items()}))
'''


def _start(tmp_path, run: dict, marker=None, name="run"):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "RUN": json.dumps(run), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("KILL_MARKER", None)
    if marker:
        env["KILL_MARKER"] = str(marker)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(driver)], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT), tmp_path / f"{name}.log"


def _result(proc, log, timeout=120):
    assert proc.wait(timeout) == 0, log.read_text()[-4000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    assert lines, log.read_text()[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _state(path):
    return safe_torch_load(path, map_location="cpu")["state_dict"]


def test_carry_packs_what_a_run_in_training_needs_and_unpacks_without_clobbering(tmp_path):
    """``carry`` takes each run's ``.last`` and best checkpoint and every stage file; it leaves
    records, finished runs' checkpoints (a record names the run), locks and temporaries; ``unpack`` refuses to replace
    a file that differs (it may hold later epochs) unless forced."""
    src = tmp_path / "saved"
    (src / "runs").mkdir(parents=True)
    best = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(4.0)}, "optimizer": {"state": {0: torch.ones(64)}}, "epoch": 3}, best)
    files = {"LETTER-ml-100k-aaaaaaaaaaaaaaaa.pth": best.getvalue(), "LETTER-ml-100k-aaaaaaaaaaaaaaaa.pth.last": b"last",
             "LETTER-ml-100k-cf-bbbbbbbbbbbbbbbb.pth": b"cf", "LETTER-ml-100k-tokenizer-cccccccccccccccc.pth": b"tok",
             "SASRec-ml-100k-dddddddddddddddd.pth": b"finished", "SASRec-ml-100k-dddddddddddddddd.pth.lock": b"1",
             "SASRec-ml-100k-dddddddddddddddd.pth.last": b"stopped",  # a resumable run keeps it when it ends
             "TTDS-ml-100k-eeeeeeeeeeeeeeee.pth.last.123-ab.tmp": b"half", "runs/SASRec-ml-100k-seed2020-dddddddddddddddd.json": b"{}"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "text_emb").mkdir()
    expected = sorted(["LETTER-ml-100k-aaaaaaaaaaaaaaaa.pth", "LETTER-ml-100k-aaaaaaaaaaaaaaaa.pth.last",
                       "LETTER-ml-100k-cf-bbbbbbbbbbbbbbbb.pth", "LETTER-ml-100k-tokenizer-cccccccccccccccc.pth"])
    archive = tmp_path / "out" / "carried.tar"
    assert carry.pack(str(src), str(archive)) == expected
    assert os.listdir(archive.parent) == ["carried.tar"]  # no temporary left
    dst = tmp_path / "elsewhere"
    assert sorted(carry.unpack(str(archive), str(dst))) == expected
    assert all((dst / n).read_bytes() == files[n] for n in expected[1:]) and sorted(os.listdir(dst)) == expected
    carried_best = safe_torch_load(dst / expected[0])  # the best so far, without its optimiser state
    assert sorted(carried_best) == ["epoch", "state_dict"] and torch.equal(carried_best["state_dict"]["w"], torch.arange(4.0))
    assert carry.unpack(str(archive), str(dst)) == expected  # the same files again: nothing to refuse
    assert carry.unpack(str(archive), str(src)) == expected  # back where it was packed from: the best checkpoint
    assert (src / expected[0]).read_bytes() == files[expected[0]]  # keeps its optimiser state
    (dst / expected[1]).write_bytes(b"a later epoch")
    with pytest.raises(FileExistsError, match="pth.last exists with other content"):
        carry.unpack(str(archive), str(dst))
    assert (dst / expected[1]).read_bytes() == b"a later epoch"  # nothing written
    carry.unpack(str(archive), str(dst), force=True)
    assert (dst / expected[1]).read_bytes() == b"last"
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        carry.pack(str(tmp_path / "missing"), str(archive))


# ----- 1. kill -9 during epoch 2, run the same command again --------------------------------------
@pytest.mark.parametrize("model", ["TIGER", "SETRec"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, model):
    config = {"epochs": 3, "resume": True, **SMALL[model]}
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    marker = tmp_path / "epoch-2-started"
    run = {"model": model, "yaml": TINY_YAML}
    # the uninterrupted run and the run to be killed side by side
    reference = _start(tmp_path, {**run, "config": {**config, "checkpoint_dir": str(reference_dir)}}, name="reference")
    victim, victim_log = _start(tmp_path, {**run, "config": {**config, "checkpoint_dir": str(killed_dir)}},
                                marker=marker, name="killed")
    deadline = time.time() + 90
    while not marker.exists():
        assert victim.poll() is None and time.time() < deadline, victim_log.read_text()[-4000:]
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    last = [f for f in os.listdir(killed_dir) if f.endswith(".pth.last")]
    assert len(last) == 1  # epoch 1's state, written before epoch 2 started
    assert safe_torch_load(killed_dir / last[0])["epoch"] == 0
    if model == "TIGER":  # carried to "another machine": packed, unpacked into a new directory, resumed there
        archive = tmp_path / "carried.tar"
        packed = carry.pack(str(killed_dir), str(archive))
        assert last[0] in packed and any("-tokenizer-" in name for name in packed)
        killed_dir = tmp_path / "elsewhere"
        assert sorted(carry.unpack(str(archive), str(killed_dir))) == sorted(packed)

    # the same command (state, a logging key, is not part of the run's identity)
    proc, log = _start(tmp_path, {**run, "config": {**config, "checkpoint_dir": str(killed_dir), "state": "INFO"}},
                       name="resumed")
    resumed = _result(proc, log)[model]
    text = log.read_text()
    assert f"{last[0]}, training from epoch 1" in text  # not from the start
    assert " resumed from " in text and "epoch 0 training" not in text  # the finished stage is loaded
    expected = _result(*reference)[model]
    assert resumed["test"] == expected["test"]
    assert resumed["best"] == expected["best"] and resumed["curve"] == expected["curve"]
    assert len(expected["curve"]) == 3
    # the same deterministic name, and the same weights bit for bit (best and last epoch)
    assert os.path.basename(resumed["file"]) == os.path.basename(expected["file"])
    for suffix in ("", ".last"):
        ours, theirs = _state(resumed["file"] + suffix), _state(expected["file"] + suffix)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_finished_run_with_resume_is_not_trained_again(tmp_path, monkeypatch):
    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 2, "resume": True}
    first = run_recbole_genrec("SASRec", "genrec-tiny", [TINY_YAML], dict(config))
    from recbole.trainer import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(Trainer, "_train_epoch", refuse)
    again = run_recbole_genrec("SASRec", "genrec-tiny", [TINY_YAML], dict(config))
    assert again["model_file"] == first["model_file"]
    assert again["test_result"] == first["test_result"] and again["valid_curve"] == first["valid_curve"]
    # the run's training time, kept in its .last checkpoint: not the few ms of the process that found it done
    assert again["train_time_s"] >= 0.9 * first["train_time_s"] > 0


def test_run_names_follow_the_config_and_resume_checkpoint_names_a_run(tmp_path):
    from recbole_genrec.config import Config
    from recbole_genrec.trainer.staged import run_checkpoint_file

    def name(**extra):
        config = Config("SASRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path), **extra})
        return run_checkpoint_file(config)

    path, resumable = name(resume=True)
    assert resumable and os.path.basename(path).startswith("SASRec-genrec-tiny-")
    assert name(resume=True, show_progress=True, checkpoint_dir=str(tmp_path)) == (path, True)
    assert name(resume=True, learning_rate=0.01)[0] != path
    assert name(resume=True, seed=1)[0] != path
    unique = {name()[0] for _ in range(3)}
    assert len(unique) == 3 and not any(resumable for _, resumable in [name()])
    with pytest.raises(FileNotFoundError, match="resume_checkpoint"):
        name(resume_checkpoint=str(tmp_path / "missing.pth"))


def test_one_process_at_a_time_trains_a_resumable_run(tmp_path):
    from recbole_genrec.quick_start import _prepare

    config = {"checkpoint_dir": str(tmp_path), "epochs": 1, "resume": True}
    holder = _prepare("SASRec", "genrec-tiny", [TINY_YAML], dict(config))[2]
    with pytest.raises(RuntimeError, match="another process is training the run"):
        _prepare("SASRec", "genrec-tiny", [TINY_YAML], dict(config))
    holder._lock.release()
    _prepare("SASRec", "genrec-tiny", [TINY_YAML], dict(config))  # free again


# ----- 3. verified artifacts ----------------------------------------------------------------------
def test_verified_files_detect_truncation_corruption_and_missing_checksums(tmp_path, caplog):
    path = str(tmp_path / "a.npy")
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), np.arange(100.0)), checksum=True)
    verify_file(path)
    assert np.array_equal(np.load(path), np.arange(100.0))  # the trailer does not disturb np.load
    data = open(path, "rb").read()
    cases = {"truncated": data[: len(data) // 2], "flipped": data[:100] + bytes([data[100] ^ 1]) + data[101:],
             "no checksum": data[: -73]}
    for label, content in cases.items():
        open(path, "wb").write(content)
        with pytest.raises(CorruptArtifactError):
            verify_file(path)
        with caplog.at_level(logging.WARNING):
            assert load_verified(path, np.load, "test cache") is None, label
        assert not os.path.exists(path) and "test cache" in caplog.text and path in caplog.text
        caplog.clear()
    assert load_verified(path, np.load) is None  # missing: nothing to say


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"x.pth.{dead.pid}-0123abcd.tmp"
    live = temporary_path(str(tmp_path / "y.pth"))
    stale.write_text("half")
    open(live, "w").write("being written")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(live, (old, old))
    assert remove_stale_temporaries(str(tmp_path)) == [str(stale)]
    assert os.path.exists(live)


def test_truncated_text_cache_and_stage_file_are_rebuilt(tmp_path, caplog, one_thread):
    saved = tmp_path / "saved"
    config = {"checkpoint_dir": str(saved), "epochs": 1, **SMALL["SETRec"]}
    first = run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML], dict(config), saved=False)
    cache = [saved / "text_emb" / f for f in os.listdir(saved / "text_emb")]
    stage = [saved / f for f in os.listdir(saved) if f.startswith("SETRec-genrec-tiny-cf-")]
    assert len(cache) == 1 and len(stage) == 1
    for path in cache + stage:
        verify_file(str(path))
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    with caplog.at_level(logging.WARNING):
        again = run_recbole_genrec("SETRec", "genrec-tiny", [TINY_YAML], dict(config), saved=False)
    for what, path in (("item text-embedding cache", cache[0]), ("stage [cf] file", stage[0])):
        assert f"{what} {path} cannot be trusted" in caplog.text
        verify_file(str(path))  # rebuilt, whole again
    assert again["test_result"] == first["test_result"]


def test_converted_smollm2_checkpoint_is_verified(tmp_path):
    from recbole_genrec.llm.backbone import verify_converted, write_manifest

    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    assert verify_converted(str(folder)) == "no manifest (an unfinished or older conversion)"
    write_manifest(str(folder), "abc")
    assert verify_converted(str(folder)) is None and verify_converted(str(folder), "abc") is None
    assert verify_converted(str(folder), "def") == "converted from another GGUF file"
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert "model.safetensors" in verify_converted(str(folder))


# ----- 5. two processes, one checkpoint_dir -------------------------------------------------------
def test_two_concurrent_compares_in_one_checkpoint_dir(tmp_path):
    saved = tmp_path / "saved"
    run = {"compare": "SASRec,SETRec", "yaml": TINY_YAML,
           "config": {"checkpoint_dir": str(saved), "epochs": 1, **SMALL["SETRec"]}}
    procs = [_start(tmp_path, run, name=f"compare{i}") for i in range(2)]
    results = [_result(*proc) for proc in procs]
    files = [r[model]["file"] for r in results for model in ("SASRec", "SETRec")]
    assert len(set(files)) == 4 and all(os.path.isfile(f) for f in files)
    for model in ("SASRec", "SETRec"):  # the same config and seed: the same result
        assert results[0][model]["test"] == results[1][model]["test"]
    leftovers = [f for f in os.listdir(saved) if ".tmp" in f or f.endswith(".last")]
    assert not leftovers
    for f in os.listdir(saved):
        if "-cf-" in f:
            verify_file(str(saved / f))


def test_resume_checkpoint_continues_a_checkpoint_of_recboles(tmp_path, caplog):
    config = {"checkpoint_dir": str(tmp_path), "epochs": 1}
    first = run_recbole_genrec("SASRec", "genrec-tiny", [TINY_YAML], dict(config))
    assert not os.path.exists(first["model_file"] + ".last")  # a finished run keeps its best checkpoint only
    with caplog.at_level(logging.INFO):
        more = run_recbole_genrec("SASRec", "genrec-tiny", [TINY_YAML],
                                  {**config, "epochs": 2, "resume_checkpoint": first["model_file"], "state": "INFO"})
    assert "RecBole checkpoint" in caplog.text and "epoch 1" in caplog.text
    assert more["model_file"] == first["model_file"]
    assert [epoch for epoch, _ in more["valid_curve"]] == [1]  # epoch 0 was not trained again
