"""Amazon review dumps (2014, 2018, 2023) -> RecBole atomic files."""

import csv
import gzip
import json
from collections import Counter

import pytest

import recbole_genrec  # noqa: F401
from conftest import TINY_YAML
from recbole_genrec.data.convert import clean_text, convert_amazon, main, parse_price

N_USERS, N_ITEMS, PER_USER = 30, 20, 8
BASE = 1_300_000_000
SPECIAL_TITLE = "Café Crème — naïve 東京 &amp; <b>Bold</b>\tTabbed\nNew line"


def user_items(u):
    return [f"I{(u * 7 + j * 3) % N_ITEMS:02d}" for j in range(PER_USER)]


def base_reviews():
    """(user, item, rating, ts_seconds) of the regular users, in time order of writing."""
    rows = []
    for u in range(N_USERS):
        for j, item in enumerate(user_items(u)):
            rows.append((f"U{u:02d}", item, float((u + j) % 5 + 1), BASE + j * 86400 + u * 60))
    return rows


def review_record(release, user, item, rating, ts):
    if release == 2023:
        return {"rating": rating, "title": "t", "text": "x", "asin": item + "-V", "parent_asin": item,
                "user_id": user, "timestamp": int(ts * 1000), "helpful_vote": 0, "verified_purchase": True}
    return {"reviewerID": user, "asin": item, "reviewerName": "n", "reviewText": "x\ty", "overall": rating,
            "summary": "s", "unixReviewTime": int(ts), "reviewTime": "01 1, 2011"}


def meta_record(release, item, title, brand="Acme", description="A <i>good</i> item", price=12.99):
    if release == 2014:
        return {"asin": item, "title": title, "brand": brand, "price": price,
                "categories": [["Books", "Fiction"], ["Books", "Mystery & Thrillers"]],
                "description": description if isinstance(description, str) else " ".join(description)}
    if release == 2018:
        return {"asin": item, "title": title, "brand": brand, "category": ["Books", "Fiction"],
                "description": description, "price": f"${price}", "also_buy": ["I03", "I04"]}
    return {"parent_asin": item, "title": title, "store": brand, "main_category": "Books",
            "categories": ["Books", "Fiction"], "description": description if isinstance(description, list)
            else [description], "price": price, "details": {}}


def dump_line(release, record, meta):
    return repr(record) if (release == 2014 and meta) else json.dumps(record, ensure_ascii=False)


def write_dumps(folder, release):
    reviews = base_reviews()
    first_u1 = next(r for r in reviews if r[0] == "U01")
    second_u2 = [r for r in reviews if r[0] == "U02"][1]
    extra = [
        ("Usparse", "I00", 5.0, BASE + 10), ("Usparse", "I01", 5.0, BASE + 20),  # 2 reviews: filtered
        ("U00", "Irare", 3.0, BASE + 30),  # an item with 2 reviews: filtered
        *[("Ucasc", f"I0{n}", 4.0, BASE + 40 + n) for n in range(4)], ("Ucasc", "Irare", 4.0, BASE + 50),
        (first_u1[0], first_u1[1], 1.0, first_u1[3] + 5000),  # later duplicate: dropped
        (second_u2[0], second_u2[1], 2.0, second_u2[3] - 100),  # earlier duplicate later in the file: kept
    ]
    lines = [dump_line(release, review_record(release, *row), False) for row in reviews + extra]
    bad_time = review_record(release, "U03", "I00", 4.0, BASE)
    bad_time["unixReviewTime" if release != 2023 else "timestamp"] = "yesterday"
    no_user = review_record(release, "U03", "I00", 4.0, BASE)
    no_user.pop("reviewerID" if release != 2023 else "user_id")
    lines[5:5] = ["this is not json", '{"reviewerID": "U03", "asin": ', json.dumps(no_user), json.dumps(bad_time), ""]
    reviews_path = folder / f"reviews_{release}.json.gz"
    with gzip.open(reviews_path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    meta = []
    for n in list(range(N_ITEMS)) + ["rare", "unused"]:
        item = f"I{n:02d}" if isinstance(n, int) else f"I{n}"
        if item == "I05":
            continue  # no metadata
        title = {"I00": SPECIAL_TITLE, "I01": '"Quoted" Title'}.get(item, f"Item {item} Story")
        description = ["<p>First&nbsp;para</p>", "Second\r\npara"] if item == "I01" else "A <i>good</i> item"
        meta.append(dump_line(release, meta_record(release, item, title, "Acme\tCorp" if item == "I02" else "Acme",
                                                    description), True))
    meta.insert(3, dump_line(release, meta_record(release, "I01", "Second title: ignored"), True))
    meta.insert(4, "garbage {")
    meta_path = folder / f"meta_{release}.json.gz"
    with gzip.open(meta_path, "wt", encoding="utf-8") as f:
        f.write("\n".join(meta) + "\n")
    return reviews_path, meta_path


def read_atomic(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def convert(tmp_path, release, **kwargs):
    reviews, meta = write_dumps(tmp_path, release)
    out = tmp_path / f"amz{release}"
    summary = convert_amazon(str(reviews), str(meta), str(out), progress=False, verbose=False, **kwargs)
    return summary, out


@pytest.mark.parametrize("release", [2014, 2018, 2023])
def test_convert_each_release(tmp_path, release):
    summary, out = convert(tmp_path, release)
    name = f"amz{release}"
    assert (summary.malformed_reviews, summary.duplicates_dropped, summary.malformed_meta) == (4, 2, 1)
    assert (summary.users, summary.items, summary.interactions) == (N_USERS, N_ITEMS, N_USERS * PER_USER)
    assert summary.items_without_meta == 1 and summary.items_with_text == pytest.approx(19 / 20)
    assert summary.density == pytest.approx(N_USERS * PER_USER / (N_USERS * N_ITEMS))

    header, rows = read_atomic(out / f"{name}.inter")
    assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
    assert all(len(row) == 4 for row in rows)
    users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
    assert min(users.values()) >= 5 and min(items.values()) >= 5  # k-core
    assert set(users) == {f"U{u:02d}" for u in range(N_USERS)} and set(items) == {f"I{n:02d}" for n in range(N_ITEMS)}
    stamps = [float(r[3]) for r in rows]
    assert stamps == sorted(stamps)  # time order
    u2_second = next(r for r in rows if r[0] == "U02" and r[1] == user_items(2)[1])
    assert float(u2_second[3]) == BASE + 86400 + 2 * 60 - 100 and float(u2_second[2]) == 2.0  # earliest kept
    pairs = Counter((r[0], r[1]) for r in rows)
    assert max(pairs.values()) == 1
    u1_first = next(r for r in rows if r[0] == "U01" and r[1] == user_items(1)[0])
    assert float(u1_first[2]) == (1 + 0) % 5 + 1  # the later duplicate (rating 1) was dropped

    header, items_rows = read_atomic(out / f"{name}.item")
    assert header == ["item_id:token", "title:token_seq", "brand:token", "categories:token_seq",
                      "description:token_seq", "price:float"]
    assert all(len(row) == 6 for row in items_rows) and len(items_rows) == N_ITEMS
    by_id = {row[0]: row for row in items_rows}
    assert by_id["I00"][1] == "Café Crème — naïve 東京 & Bold Tabbed New line"
    assert by_id["I01"][1] == "'Quoted' Title"  # the first meta line of I01 wins
    assert by_id["I02"][2] == "Acme Corp" and by_id["I03"][3].startswith("Books Fiction")
    assert by_id["I03"][4] == "A good item" and float(by_id["I03"][5]) == 12.99
    if release != 2014:
        assert by_id["I01"][4] == "First para Second para"
    assert by_id["I05"][1:] == ["", "", "", "", ""]
    yaml_text = (out / f"{name}.yaml").read_text()
    assert "item_text_fields: [title, brand, categories, description]" in yaml_text
    assert "inter: [user_id, item_id, rating, timestamp]" in yaml_text


def test_require_meta_drops_items_and_reapplies_kcore(tmp_path):
    summary, out = convert(tmp_path, 2018, require_meta=True, kcore_k=8)
    # every regular user has exactly 8 items: losing I05 drops its users, then the k-core goes on
    lost = {f"U{u:02d}" for u in range(N_USERS) if "I05" in user_items(u)}
    assert summary.items_dropped_without_meta == 1 and summary.items_without_meta == 0
    _, rows = read_atomic(out / "amz2018.inter")
    users, items = Counter(r[0] for r in rows), Counter(r[1] for r in rows)
    assert "I05" not in items and not lost & set(users)
    assert not rows or (min(users.values()) >= 8 and min(items.values()) >= 8)
    assert summary.items_with_text == (1.0 if rows else 0.0)


def test_min_rating_and_cli(tmp_path, capsys):
    reviews, meta = write_dumps(tmp_path, 2023)
    result = main(["amazon", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "cli"),
                   "--kcore", "2", "--min-rating", "3", "--no-progress"])
    assert result["below_min_rating"] > 0
    _, rows = read_atomic(tmp_path / "cli" / "cli.inter")
    assert all(float(r[2]) >= 3 for r in rows)
    assert "malformed skipped 4" in capsys.readouterr().out


def test_clean_text_and_price():
    assert clean_text("b\x00c\u2028d \t e\r\n") == "b c d e"
    assert clean_text("x&amp;lt;br&amp;gt;y") == "x y"
    assert clean_text(["one", ["two", None]], max_words=2) == "one two"
    assert parse_price("$1,299.50 - $1,399.00") == 1299.5 and parse_price("None") is None
    assert parse_price(None) is None and parse_price(3) == 3.0


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amazon")
    summary, out = convert(folder, 2018)
    return out / "amz2018.yaml", folder


def test_converted_dataset_loads_in_recbole(converted):
    from recbole_genrec.config import Config
    from recbole_genrec.data import load_item_texts
    from recbole_genrec.utils import create_dataset

    yaml_path, folder = converted
    config = Config(model="SASRec", dataset="amz2018", config_file_list=[TINY_YAML, str(yaml_path)])
    assert config["data_path"] == str(folder / "amz2018")
    dataset = create_dataset(config)
    assert (dataset.user_num, dataset.item_num, dataset.inter_num) == (N_USERS + 1, N_ITEMS + 1, N_USERS * PER_USER)
    assert "categories" in dataset.item_feat and "price" in dataset.item_feat
    texts = load_item_texts(config, dataset)
    i00 = dataset.field2token_id["item_id"]["I00"]
    assert texts[i00].startswith("title: Café Crème — naïve 東京 & Bold Tabbed New line; brand: Acme")


@pytest.mark.parametrize("model", ["SASRec", "TIGER"])
def test_models_train_on_converted_dataset(converted, model, tmp_path):
    from recbole_genrec.quick_start import run_recbole_genrec

    yaml_path, _ = converted
    result = run_recbole_genrec(model, "amz2018", [TINY_YAML, str(yaml_path)],
                                {"epochs": 1, "checkpoint_dir": str(tmp_path / "saved"), "tokenizer_epochs": 5},
                                saved=False)
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
