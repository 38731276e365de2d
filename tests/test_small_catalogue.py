"""The held-back check's public stand-in (benchmarks/small_catalogue.py): its data and its table over
draws of users. No training: the data comes from the ml-100k files inside RecBole's wheel."""

import importlib.util
import os

import pandas as pd
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small_catalogue():
    spec = importlib.util.spec_from_file_location("small_catalogue", os.path.join(ROOT, "benchmarks", "small_catalogue.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stand_in_data_is_the_documented_catalogue(small_catalogue, tmp_path):
    sizes = small_catalogue.build(str(tmp_path))
    # the sizes the script's docstring and the README quote for the default draw
    assert sizes == {"users": 201, "items": 1063, "ratings": 20676, "fewest ratings of a user": 18}
    folder = tmp_path / "ml-100k-201u"
    inter = pd.read_csv(folder / "ml-100k-201u.inter", sep="\t", dtype=str)
    items = pd.read_csv(folder / "ml-100k-201u.item", sep="\t", dtype=str, keep_default_na=False)
    assert inter["user_id:token"].nunique() == 201 and len(inter) == 20676
    # every film kept was rated by at least 3 of the drawn users, and has its text row
    assert inter.groupby("item_id:token")["user_id:token"].nunique().min() >= 3
    assert set(items["item_id:token"]) == set(inter["item_id:token"])
    assert {"movie_title:token_seq", "release_year:token", "class:token_seq"} <= set(items.columns)

    # the same draw again leaves the files untouched (runs fingerprint their data by content)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert small_catalogue.build(str(tmp_path)) == sizes
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps

    # another draw is another folder with other users
    other = small_catalogue.build(str(tmp_path), user_seed=1)
    assert small_catalogue.dataset_name(user_seed=1) == "ml-100k-201u-min3-s1"
    other_users = pd.read_csv(tmp_path / "ml-100k-201u-min3-s1" / "ml-100k-201u-min3-s1.inter", sep="\t",
                              dtype=str)["user_id:token"].unique()
    assert other["users"] == 201 and set(other_users) != set(inter["user_id:token"])


def test_draws_table_means_over_the_draws_a_model_has(small_catalogue):
    def run(recall):
        return {"test_result": {"recall@10": recall}}

    table = small_catalogue.draws_table({
        0: (1000, {"A": run(0.02), "B": run(0.02), "C": run(0.01)}),
        1: (500, {"A": run(0.04), "C": run(0.07)}),
        2: (500, {"A": run(0.06), "C": run(0.05)}),
    })
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["A"] == "| A | 0.0200 | 0.0400 | 0.0600 | 0.0400 | 0.0200 | - |"
    assert rows["B"] == "| B | 0.0200 | - | - | 0.0200 | - | +0.0000 (0 of 1 draws) |"  # shared draws only; a tie is not ahead
    # C against A, draw by draw: -0.01, +0.03, -0.01: a mean lead that comes from one draw of three
    assert rows["C"] == "| C | 0.0100 | 0.0700 | 0.0500 | 0.0433 | 0.0306 | +0.0033 (1 of 3 draws) |"
    assert rows["chance (10 / films)"].startswith("| chance (10 / films) | 0.0100 | 0.0200 |")
