import json

import pandas as pd
import pytest

from catstream.offer_files import OfferFileError, offers_from_frame, read_offer_file

ROWS = [
    {"offer_id": "1", "title": "Nike Men Jersey", "mall_category": "Sports", "image": "images/1.jpg",
     "gender": "Men", "master": "Apparel", "leaf": "Tshirts"},
    {"offer_id": "2", "title": "여성 원피스", "mall_category": "", "image": "", "gender": "Women",
     "master": "Apparel", "leaf": "Dresses"},
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
