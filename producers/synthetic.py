"""A synthetic marketplace for the demo and the tests (``catstream synth``).

Korean and English titles; several shops ("malls"), each with its own category naming and its
own noise (one is unreliable); images whose shape and colours differ by category; listing dates
over all 12 months with seasonal categories; a small share of wrong labels. Deterministic per
seed. It writes the offer-file format users bring: ``offers.csv`` + ``images/``, with the
observed (noisy) label in ``category`` and the truth in ``true_category``.
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

__all__ = ["CATEGORIES", "MALLS", "SyntheticCategory", "write_marketplace"]


@dataclass(frozen=True)
class SyntheticCategory:
    path: str
    korean: tuple[str, ...]
    english: tuple[str, ...]
    shape: str
    colour: tuple[int, int, int]
    months: tuple[int, ...] = ()  # listed mostly in these months; empty = all year

    @property
    def audience(self) -> str:
        return self.path.split(" > ")[0]


_WINTER, _SUMMER = (11, 12, 1, 2), (5, 6, 7, 8)
CATEGORIES: tuple[SyntheticCategory, ...] = (
    SyntheticCategory(
        "Women > Clothing > Dresses", ("원피스", "드레스"), ("dress", "maxi dress"), "triangle", (220, 80, 140)
    ),
    SyntheticCategory(
        "Women > Clothing > Blouses", ("블라우스",), ("blouse", "chiffon blouse"), "square", (240, 170, 200)
    ),
    SyntheticCategory(
        "Women > Shoes > Sandals", ("샌들", "슬리퍼"), ("sandals", "slides"), "bar", (200, 120, 60), _SUMMER
    ),
    SyntheticCategory("Men > Clothing > Shirts", ("셔츠", "남방"), ("shirt", "oxford shirt"), "square", (60, 90, 200)),
    SyntheticCategory(
        "Men > Clothing > Padded Jackets",
        ("패딩", "롱패딩"),
        ("puffer jacket", "down jacket"),
        "circle",
        (40, 40, 60),
        _WINTER,
    ),
    SyntheticCategory(
        "Men > Shoes > Sneakers", ("운동화", "스니커즈"), ("sneakers", "running shoes"), "bar", (230, 230, 230)
    ),
    SyntheticCategory(
        "Kids > Clothing > Dresses", ("원피스", "드레스"), ("dress", "party dress"), "triangle", (250, 200, 80)
    ),
    SyntheticCategory(
        "Kids > Shoes > Sneakers", ("운동화", "실내화"), ("sneakers", "light-up shoes"), "bar", (90, 200, 120)
    ),
    SyntheticCategory(
        "Sports > Swim > Swimsuits",
        ("수영복", "래쉬가드"),
        ("swimsuit", "rash guard"),
        "cross",
        (30, 160, 220),
        _SUMMER,
    ),
    SyntheticCategory(
        "Digital > Audio > Earphones",
        ("이어폰", "블루투스 이어폰"),
        ("earbuds", "wireless earphones"),
        "ring",
        (20, 20, 20),
    ),
    SyntheticCategory(
        "Digital > Phone > Cases",
        ("폰케이스", "휴대폰 케이스"),
        ("phone case", "bumper case"),
        "rounded",
        (150, 150, 170),
    ),
    SyntheticCategory(
        "Beauty > Skincare > Sunscreen",
        ("선크림", "자외선 차단제"),
        ("sunscreen", "sun cream"),
        "rounded",
        (250, 240, 150),
        _SUMMER,
    ),
    SyntheticCategory(
        "Home > Bedding > Electric Blankets",
        ("전기요", "전기장판"),
        ("electric blanket", "heated throw"),
        "stripes",
        (200, 60, 40),
        _WINTER,
    ),
    SyntheticCategory(
        "Kitchen > Cookware > Frying Pans", ("프라이팬", "궁중팬"), ("frying pan", "skillet"), "circle", (90, 90, 90)
    ),
    SyntheticCategory(
        "Food > Snacks > Chocolate", ("초콜릿", "초코바"), ("chocolate", "chocolate bar"), "stripes", (110, 60, 30)
    ),
)

_AUDIENCE_WORDS = {
    "Women": (("여성", "여성용"), ("women", "womens")),
    "Men": (("남성", "남성용"), ("men", "mens")),
    "Kids": (("아동", "키즈"), ("kids", "girls")),
}
_ADJECTIVES = (("데일리", "베이직", "프리미엄", "신상", "라이트"), ("daily", "basic", "premium", "new", "light"))
_COLOURS = (("블랙", "화이트", "네이비", "베이지", "레드"), ("black", "white", "navy", "beige", "red"))
_FILLER = (("무료배송", "특가", "인기"), ("free shipping", "best", "hot deal"))
_BRANDS = ("Aurora", "Namsan", "Hanbit", "Pinecone", "Seoulite", "Mirae", "Blue Crane", "Dasol")


@dataclass(frozen=True)
class _Mall:
    mall_id: str
    naming: str  # korean | code | coarse | unreliable
    wrong_label_rate: float


MALLS = (
    _Mall("mall-hana", "korean", 0.02),
    _Mall("mall-dool", "code", 0.02),
    _Mall("mall-set", "coarse", 0.03),
    _Mall("mall-net", "unreliable", 0.06),
)


def _mall_category(mall: _Mall, category: SyntheticCategory, rng: np.random.Generator) -> str:
    levels = category.path.split(" > ")
    if mall.naming == "korean":
        return f"{category.korean[0]} 카테고리/{levels[1]}"
    if mall.naming == "code":
        return f"{levels[0][:2].upper()}-{levels[2][:3].upper()}-{len(levels[2]):02d}"
    if mall.naming == "coarse":
        return levels[0]
    other = CATEGORIES[rng.integers(len(CATEGORIES))]  # this shop files offers almost at random
    return f"{other.english[0]} / misc" if rng.random() < 0.6 else f"{category.english[0]} / misc"


def _title(category: SyntheticCategory, mall: _Mall, rng: np.random.Generator) -> str:
    lang = 0 if rng.random() < 0.6 else 1
    pick = lambda options: options[rng.integers(len(options))]  # noqa: E731
    parts = [pick(_BRANDS)]
    if rng.random() < 0.5:
        parts.append(pick(_ADJECTIVES[lang]))
    audience = _AUDIENCE_WORDS.get(category.audience)
    if audience and rng.random() < 0.85:
        parts.append(pick(audience[lang]))
    if rng.random() < 0.6:
        parts.append(pick(_COLOURS[lang]))
    parts.append(pick(category.korean if lang == 0 else category.english))
    if rng.random() < 0.3:
        parts.append(pick(_FILLER[lang]))
    if rng.random() < 0.2:
        parts.append(f"{rng.integers(1, 5)}{'종' if lang == 0 else ' pcs'}")
    return " ".join(parts)


def _render(category: SyntheticCategory, rng: np.random.Generator, size: int = 96) -> Image.Image:
    jitter = lambda rgb, spread: tuple(int(np.clip(c + rng.normal(0, spread), 0, 255)) for c in rgb)  # noqa: E731
    background = jitter((235, 235, 230), 12)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = jitter(category.colour, 18)
    cx, cy = rng.integers(size // 3, 2 * size // 3, size=2)
    r = int(rng.integers(size // 5, size // 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if category.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif category.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, r // 3))
    elif category.shape == "square":
        draw.rectangle(box, fill=colour)
    elif category.shape == "rounded":
        draw.rounded_rectangle((cx - r // 2, cy - r, cx + r // 2, cy + r), radius=r // 3, fill=colour)
    elif category.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif category.shape == "bar":
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=colour)
    elif category.shape == "cross":
        draw.rectangle((cx - r, cy - r // 4, cx + r, cy + r // 4), fill=colour)
        draw.rectangle((cx - r // 4, cy - r, cx + r // 4, cy + r), fill=colour)
    elif category.shape == "stripes":
        for y in range(int(cy - r), int(cy + r), max(4, r // 3)):
            draw.rectangle((cx - r, y, cx + r, y + max(2, r // 6)), fill=colour)
    noise = rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def _listed_at(category: SyntheticCategory, rng: np.random.Generator) -> dt.date:
    if category.months and rng.random() < 0.9:
        month = int(category.months[rng.integers(len(category.months))])
    else:
        month = int(rng.integers(1, 13))
    year = 2025 if rng.random() < 0.5 else 2026
    return dt.date(year, month, int(rng.integers(1, 29)))


def write_marketplace(out_dir: str | Path, *, offers: int, seed: int = 0, progress: bool = True) -> Path:
    """Write ``offers.csv`` and ``images/`` to ``out_dir``; returns the CSV path."""
    if offers < 1:
        raise ValueError("offers must be at least 1")
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Seasonal categories are rarer outside their months, so balance the category draw.
    weights = np.array([1.0 if not c.months else 0.8 for c in CATEGORIES])
    weights /= weights.sum()
    rows = []
    for index in tqdm(range(offers), desc="synthesising offers", unit="offer", disable=not progress):
        category = CATEGORIES[rng.choice(len(CATEGORIES), p=weights)]
        mall = MALLS[rng.integers(len(MALLS))]
        offer_id = f"syn-{seed}-{index:07d}"
        image_ref = ""
        roll = rng.random()
        if roll < 0.02:
            pass  # no image
        elif roll < 0.03:
            image_ref = f"images/{offer_id}.jpg"
            (out_dir / image_ref).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")  # undecodable
        else:
            extension = ("jpg", "png", "webp")[int(rng.choice(3, p=[0.8, 0.1, 0.1]))]
            image_ref = f"images/{offer_id}.{extension}"
            _render(category, rng).save(out_dir / image_ref, quality=90)
        label = category
        if rng.random() < mall.wrong_label_rate:
            label = CATEGORIES[rng.integers(len(CATEGORIES))]
        rows.append(
            {
                "offer_id": offer_id,
                "title": _title(category, mall, rng),
                "mall_id": mall.mall_id,
                "mall_category": _mall_category(mall, category, rng),
                "image": image_ref,
                "listed_at": _listed_at(category, rng).isoformat(),
                "category": label.path,
                "true_category": category.path,
            }
        )
    path = out_dir / "offers.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
