import json

import pandas as pd
import pytest

from core.offer_files import OfferFileError, offer_fingerprints, offers_from_frame, read_offer_file

ROWS = [
    {
        "offer_id": "1",
        "title": "Nike Men Jersey",
        "mall_category": "Sports",
        "image": "images/1.jpg",
        "gender": "Men",
        "master": "Apparel",
        "leaf": "Tshirts",
    },
    {
        "offer_id": "2",
        "title": "여성 원피스",
        "mall_category": "",
        "image": "",
        "gender": "Women",
        "master": "Apparel",
        "leaf": "Dresses",
    },
    {"offer_id": "3", "title": "", "mall_category": "", "image": "", "gender": "Men", "master": "x", "leaf": "y"},
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_formats_and_label_columns(tmp_path, suffix):
    path = tmp_path / f"offers{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in ROWS))
    else:
        frame.to_parquet(path)
    read = read_offer_file(path, label_columns=["gender", "master", "leaf"])
    assert read["offer_id"].tolist() == ["1", "2"]  # the row without a title is dropped
    assert read["label"].tolist() == ["Men > Apparel > Tshirts", "Women > Apparel > Dresses"]
    assert read["image_url"][0] == (tmp_path / "images/1.jpg").as_uri() and read["image_url"][1] == ""
    offers = list(offers_from_frame(read))
    assert offers[1].title == "여성 원피스" and offers[1].mall_category is None


def test_readable_errors(tmp_path):
    with pytest.raises(OfferFileError, match="does not exist"):
        read_offer_file(tmp_path / "none.csv")
    bad = tmp_path / "x.csv"
    bad.write_text("id,name\n1,a\n")
    with pytest.raises(OfferFileError, match="missing column"):
        read_offer_file(bad)
    other = tmp_path / "x.xlsx"
    other.write_text("")
    with pytest.raises(OfferFileError, match="unknown format"):
        read_offer_file(other)


def _fingerprint_rows(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "1.jpg").write_bytes(b"\xff\xd8 one picture")
    (tmp_path / "b" / "moved.jpg").write_bytes(b"\xff\xd8 one picture")
    (tmp_path / "b" / "other.jpg").write_bytes(b"\xff\xd8 another picture")
    base = {
        "offer_id": "1",
        "title": "Nike Men Jersey",
        "mall_id": "m1",
        "mall_category": "Sports",
        "brand": "Nike",
        "listed_at": "2016-04-26",
        "image": "a/1.jpg",
    }
    variants = {
        "renamed, image moved": {"offer_id": "re-1", "image": "b/moved.jpg"},
        "title": {"title": "Nike Men Jersey Blue"},
        "shop": {"mall_id": "m2"},
        "mall category": {"mall_category": "Sports Wear"},
        "brand": {"brand": "Puma"},
        "listing date": {"listed_at": "2016-04-27"},
        "image bytes": {"image": "b/other.jpg"},
        "image missing": {"image": "b/gone.jpg"},
        "no image": {"image": ""},
    }
    rows = [base] + [{**base, "offer_id": f"v{i}", **change} for i, change in enumerate(variants.values())]
    path = tmp_path / "offers.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return dict(zip(["original", *variants], offer_fingerprints(read_offer_file(path)), strict=True))


def test_fingerprint_is_the_offer_content_without_its_id(tmp_path):
    prints = _fingerprint_rows(tmp_path)
    assert prints["renamed, image moved"] == prints["original"]  # same words, same picture bytes
    assert prints["image missing"] == prints["no image"]  # the model sees no image either way
    different = [name for name in prints if name not in ("original", "renamed, image moved", "image missing")]
    assert len({prints[name] for name in different} | {prints["original"]}) == len(different) + 1
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in prints.values())
