"""Hyper-parameter search (RecBole's HyperTuning, no ray): stage files shared across trials."""

import glob
import os
import sys

import pytest

pytest.importorskip("hyperopt")

import recbole_genrec.model.tiger as tiger  # noqa: E402
from conftest import TINY_YAML  # noqa: E402
from recbole_genrec.cli import main  # noqa: E402
from recbole_genrec.hyper import run_hyper, search_space  # noqa: E402


@pytest.fixture
def rq_vae_calls(monkeypatch):
    calls = []
    train = tiger.train_rq_vae

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return train(*args, **kwargs)

    monkeypatch.setattr(tiger, "train_rq_vae", counting)
    return calls


def _fast_yaml(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(f"checkpoint_dir: {tmp_path / 'saved'}\nepochs: 1\ntokenizer_epochs: 2\n")
    return str(path)


def test_recommender_grid_trains_the_tokenizer_once(tmp_path, monkeypatch, rq_vae_calls):
    (tmp_path / "hyper.test").write_text("learning_rate choice [0.01,0.005]\ntrain_batch_size choice [32,64]\n")
    argv = ["run_recbole_genrec.py", "--hyper", "--params_file=hyper.test", "--model=TIGER",
            "--dataset=genrec-tiny", f"--config_files={TINY_YAML} {_fast_yaml(tmp_path)}",
            "--output_file=tiger.result"]
    monkeypatch.setattr(sys, "argv", argv)  # RecBole's Config reads the command line too
    assert "ray" not in sys.modules
    hp = main()
    assert "ray" not in sys.modules
    assert len(rq_vae_calls) == 1  # trial 1 trains the tokenizer, trials 2-4 resume its stage file
    assert len(glob.glob(str(tmp_path / "saved" / "TIGER-genrec-tiny-tokenizer-*.pth"))) == 1
    assert len(hp.params2result) == 4
    text = (tmp_path / "tiger.result").read_text()
    for lr in ("0.01", "0.005"):
        for batch in ("32", "64"):
            assert text.count(f"learning_rate:{lr}, train_batch_size:{batch}\n") == 1
    assert text.count("Valid result:") == text.count("Test result:") == 4
    assert hp.best_params in [{"learning_rate": lr, "train_batch_size": b} for lr in (0.01, 0.005) for b in (32, 64)]
    scores = [r["best_valid_score"] for r in hp.params2result.values()]
    assert hp.best_score == max(scores)


def test_tokenizer_grid_trains_the_tokenizer_per_value(tmp_path, rq_vae_calls):
    hp = run_hyper("TIGER", "genrec-tiny", params_dict={"choice": {"rq_beta": [0.25, 0.5]}},
                   config_file_list=[TINY_YAML, _fast_yaml(tmp_path)], output_file=str(tmp_path / "beta.result"),
                   saved=False)
    assert len(rq_vae_calls) == 2
    assert len(glob.glob(str(tmp_path / "saved" / "TIGER-genrec-tiny-tokenizer-*.pth"))) == 2
    assert sorted(hp.params2result) == ["rq_beta:0.25", "rq_beta:0.5"]
    assert os.path.isfile(tmp_path / "beta.result")


def test_search_errors_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'choice' options only"):
        search_space(params_dict={"uniform": {"learning_rate": [0.001, 0.01]}})
    with pytest.raises(ValueError, match="algo"):
        search_space(params_dict={"choice": {"learning_rate": [0.01]}}, algo="grid")
    monkeypatch.setattr(sys, "argv", ["x", "--learning_rate=0.1"])
    with pytest.raises(ValueError, match="command line"):
        search_space(params_dict={"choice": {"learning_rate": [0.01, 0.005]}})
    space, max_evals = search_space(params_dict={"uniform": {"dropout_prob": [0.1, 0.5]}}, algo="random",
                                    max_evals=3)
    assert set(space) == {"dropout_prob"} and max_evals == 3
