"""Offer files (CSV, JSON Lines, Parquet) as users bring them, for producing and training.

Required columns: ``offer_id``, ``title``. Optional: ``mall_id``, ``mall_category``, ``brand``
(used only by the TF-IDF baselines), ``image`` (a path relative to the file, a ``file://`` or
``http(s)://`` URL), ``listed_at`` (ISO date), and label columns. Several label columns join into
one category path with " > ".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd

from core.dictionaries import PATH_SEPARATOR
from core.schemas import Offer

__all__ = ["LABEL", "OfferFileError", "offer_fingerprints", "offers_from_frame", "read_offer_file"]

LABEL = "label"
_OPTIONAL = ("mall_id", "mall_category", "brand", "image", "listed_at")


class OfferFileError(ValueError):
    """The file cannot be read as offers; the message says what to fix."""


def read_offer_file(path: str | Path, *, label_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Load ``path`` into a frame with string columns ``offer_id, title, mall_id, mall_category,
    brand, image_url, listed_at`` (+ ``label`` when ``label_columns`` are given). Image paths become
    absolute ``file://`` URLs; rows without a title are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise OfferFileError(f"offer file {path} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix in (".csv", ".csv.gz", ".tsv"):
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson", ".json", ".jsonl.gz"):
            frame = pd.read_json(path, lines=suffix != ".json", dtype=False).astype(str)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path).astype(str)
        else:
            raise OfferFileError(f"{path}: unknown format {suffix!r}; use .csv, .jsonl or .parquet")
    except (ValueError, OSError) as error:
        if isinstance(error, OfferFileError):
            raise
        raise OfferFileError(f"{path}: cannot be read: {error}") from error
    frame = frame.replace({"nan": "", "None": "", "NaT": ""})
    missing = [column for column in ("offer_id", "title", *label_columns) if column not in frame.columns]
    if missing:
        raise OfferFileError(f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(frame.columns)}")
    out = pd.DataFrame({"offer_id": frame["offer_id"].str.strip(), "title": frame["title"].str.strip()})
    for column in _OPTIONAL:
        out[column] = frame[column].str.strip() if column in frame.columns else ""
    out["image_url"] = [_image_url(value, path.parent) for value in out.pop("image")]
    if label_columns:
        parts = frame[list(label_columns)].apply(lambda column: column.str.strip())
        out[LABEL] = parts.apply(lambda row: PATH_SEPARATOR.join(v for v in row if v), axis=1)
    out = out[(out["offer_id"] != "") & (out["title"] != "")]
    return out.reset_index(drop=True)


def _image_url(value: str, base: Path) -> str:
    if not value:
        return ""
    if "://" in value:
        return value
    image = Path(value)
    return (image if image.is_absolute() else (base / image).resolve()).as_uri()


def offer_fingerprints(frame: pd.DataFrame) -> list[str]:
    """A digest of what each offer of ``frame`` (from :func:`read_offer_file`) says, its id left out.

    Title, shop, mall category, brand, listing date and the image's bytes (its URL where the bytes
    are not on this machine; nothing where the file is missing, as the model then sees no image):
    the same offer under another id, or its image under another path, has the same fingerprint.
    """
    images: dict[str, str] = {}  # colour variants and re-listings share image files
    fingerprints = []
    for row in frame[["title", "mall_id", "mall_category", "brand", "listed_at", "image_url"]].itertuples(index=False):
        url = row.image_url
        if url not in images:
            images[url] = _image_digest(url)
        text = "\x1f".join((row.title, row.mall_id, row.mall_category, row.brand, row.listed_at, images[url]))
        fingerprints.append(hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest())
    return fingerprints


def _image_digest(url: str) -> str:
    if not url.startswith("file://"):
        return url
    try:
        content = Path(url2pathname(urlparse(url).path)).read_bytes()
    except OSError:
        return ""
    return hashlib.blake2b(content, digest_size=16).hexdigest()


def offers_from_frame(frame: pd.DataFrame) -> Iterator[Offer]:
    """Offers of a frame from :func:`read_offer_file` (labels are not part of the message)."""
    for row in frame.itertuples(index=False):
        yield Offer(
            offer_id=row.offer_id,
            title=row.title,
            mall_id=row.mall_id or None,
            mall_category=row.mall_category or None,
            image_url=row.image_url or None,
            listed_at=row.listed_at or None,
        )
