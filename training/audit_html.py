"""The audit as one self-contained HTML file: inline CSS, images as data: URIs, no script, no
external asset. Every piece of user text (titles, shop categories, shop ids, category names) goes
through :func:`html.escape`."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

__all__ = ["heatmap_png", "render_html"]

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#1f2937;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #d1d5db}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #e5e7eb;padding:3px 8px;text-align:left}
th{background:#f3f4f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:9px;background:#dc2626;vertical-align:middle}
.offer{border:1px solid #e5e7eb;border-radius:6px;padding:.7em;margin:.7em 0;display:flex;gap:1em}
.offer .text{flex:1}.tok{padding:1px 3px;margin:0 1px;border-radius:3px;white-space:pre}
.label{color:#6b7280;font-size:.85em;margin-right:.4em}.meta{color:#4b5563;font-size:.9em}
.legend span{padding:1px 6px;border-radius:3px;margin-right:.5em}
pre{background:#f9fafb;border:1px solid #e5e7eb;padding:.6em;overflow-x:auto}
.note{color:#4b5563}.uncertain{color:#92400e}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(value) -> str:
    return "–" if value is None or value != value else f"{100 * value:.1f}%"


def _colour(value: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(value) / scale) * 0.85
    rgb = "220,38,38" if value > 0 else "37,99,235"
    return f"background:rgba({rgb},{alpha:.2f})"


def _tokens(words: list[str], values: list[float], scale: float) -> str:
    return " ".join(
        f'<span class="tok" style="{_colour(v, scale)}" title="SHAP {v:+.4f}">{_e(w)}</span>'
        for w, v in zip(words, values, strict=True)
    )


def heatmap_png(image: np.ndarray, values: np.ndarray, *, size: int = 160) -> bytes:
    """PNG of ``image`` (3, S, S) uint8 with the grid ``values`` (G, G) overlaid: red pushes toward
    the explained category, blue away, opacity by magnitude."""
    base = Image.fromarray(np.transpose(image, (1, 2, 0))).convert("RGBA").resize((size, size), Image.BILINEAR)
    grid = values.shape[0]
    scale = float(np.abs(values).max()) or 1.0
    overlay = np.zeros((grid, grid, 4), dtype=np.uint8)
    overlay[..., 0] = np.where(values > 0, 220, 37)
    overlay[..., 1] = np.where(values > 0, 38, 99)
    overlay[..., 2] = np.where(values > 0, 38, 235)
    overlay[..., 3] = (np.abs(values) / scale * 170).astype(np.uint8)
    layer = Image.fromarray(overlay, "RGBA").resize((size, size), Image.NEAREST)
    buffer = io.BytesIO()
    Image.alpha_composite(base, layer).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _img(data: bytes, alt: str, css_class: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img class="{css_class}" alt="{_e(alt)}" src="data:image/png;base64,{encoded}" width="160" height="160">'


def _plain_png(image: np.ndarray, size: int = 160) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.transpose(image, (1, 2, 0))).resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


def _offer(offer: dict) -> str:
    values = np.array(offer["word_shap"]).reshape(-1, 2)
    scale = float(np.abs(values).max()) if values.size else 0.0
    if offer["shop_category_shap"] is not None:
        scale = max(scale, float(np.abs(offer["shop_category_shap"]).max()))
    rows = []
    for column, name, category in ((0, "toward predicted", offer["predicted"]), (1, "toward true", offer["true"])):
        shop = ""
        if offer["shop_category_shap"] is not None:
            v = offer["shop_category_shap"][column]
            shop = (
                f' <span class="label">shop category</span><span class="tok" style="{_colour(v, scale)}" '
                f'title="SHAP {v:+.4f}">{_e(offer["mall_category"])}</span>'
            )
        rows.append(
            f'<div><span class="label">{name} ({_e(category)}):</span>'
            f"{_tokens(offer['words'], values[:, column].tolist(), scale)}{shop}</div>"
        )
    images = ""
    if offer.get("_image") is not None and offer["image_shap"] is not None:
        grid = np.array(offer["image_shap"])
        images = (
            "<div>"
            + _img(_plain_png(offer["_image"]), "offer image", "photo")
            + _img(heatmap_png(offer["_image"], grid[..., 0]), "SHAP toward the predicted category", "heatmap")
            + "</div>"
        )
    state = '<span class="uncertain">answered "uncertain"</span>' if offer["answered_uncertain"] else "answered"
    kind = "wrongly filed here" if offer["kind"] == "wrongly_filed_here" else "missed"
    return (
        f'<div class="offer" data-offer-id="{_e(offer["offer_id"])}"><div class="text">'
        f'<div class="title"><b>{_e(offer["title"])}</b></div>'
        f'<div class="meta">{kind} · true <b>{_e(offer["true"])}</b> → predicted <b>{_e(offer["predicted"])}</b> '
        f"({offer['confidence']:.3f}, {state}) · shop {_e(offer['mall_id'])} · shop category "
        f"“{_e(offer['mall_category'])}” · offer {_e(offer['offer_id'])}</div>"
        + "".join(rows)
        + f"</div>{images}</div>"
    )


def _table(headers: list[str], rows: list[list[str]], table_id: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value, numeric: bool = False) -> str:
    return f'<td class="n">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def render_html(report) -> str:
    s = report.summary
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>catstream audit — {_e(s['model_version'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Error audit of {_e(s['model_version'])}</h1>",
        f'<p class="note">{s["offers"]} labeled offers from <code>{_e(s["data"])}</code> '
        f"(protocol {_e(s['protocol'])}), "
        f"{s['categories']} categories. Top-1 accuracy {_pct(s['accuracy'])}; at the threshold {s['threshold']:.3f} "
        f"{_pct(s['uncertain_rate'])} are answered “uncertain” and {_pct(s['precision_answered'])} of the rest are "
        f"right. Attributions: {_e(s['explainer'])}; {s['explained_offers']} offers explained in {s['seconds']} s.</p>",
        '<p class="legend"><span style="background:rgba(220,38,38,.6)">pushes toward</span>'
        '<span style="background:rgba(37,99,235,.6)">pushes away from</span> the category named on the row '
        "(hover a word for its SHAP value, in probability).</p>",
        "<h2>Categories, worst first</h2>",
    ]
    rows = []
    for c in report.categories:
        bar = f'<span class="bar" style="width:{min(100, 100 * c["error_rate"]):.0f}px"></span>'
        rows.append(
            [
                _td(c["category"]),
                f'<td class="n">{_pct(c["error_rate"])} {bar}</td>',
                _td(c["support"], True),
                _td(c["wrong_answers"], True),
                _td(_pct(c["uncertain_rate"]), True),
                _td(c["wrongly_filed_here"], True),
            ]
        )
    parts.append(
        _table(
            [
                "category",
                "error rate (top-1)",
                "support",
                "wrong answers given",
                "uncertain rate",
                "others filed here (top-1)",
            ],
            rows,
            "overview",
        )
    )

    parts.append("<h2>Most confused pairs</h2>")
    parts.append(
        _table(
            ["true", "predicted", "offers"],
            [[_td(p["true"]), _td(p["predicted"]), _td(p["count"], True)] for p in report.confused_pairs],
            "confused-pairs",
        )
    )

    parts.append(
        '<h2>Ambiguous category groups</h2><p class="note">Categories confused with each other in both '
        "directions: candidates for a taxonomy merge, clearer labeling rules, or dictionary entries.</p>"
    )
    if report.ambiguous_groups:
        items = []
        for g in report.ambiguous_groups:
            pairs = "; ".join(f"{_e(p['a'])} → {_e(p['b'])}: {p['a_as_b']}, back: {p['b_as_a']}" for p in g["pairs"])
            same = " <b>(same leaf under different branches)</b>" if g["same_leaf_in_different_branches"] else ""
            items.append(
                f"<li>{' · '.join(_e(c) for c in g['categories'])}{same} — {g['errors']} errors ({pairs})</li>"
            )
        parts.append(f'<ul id="ambiguous-groups">{"".join(items)}</ul>')
    else:
        parts.append('<p id="ambiguous-groups">None found.</p>')

    parts.append(
        '<h2>Shops</h2><p class="note">Suggested weight of a shop\'s own category: how well its category '
        "predicts the label on held-out folds, rescaled so chance is 0 and perfect is 1 "
        "(<code>training/shops.py</code>).</p>"
    )
    parts.append(
        _table(
            ["shop", "offers", "error rate", "uncertain rate", "shop categories", "weight in use", "suggested weight"],
            [
                [
                    _td(r["mall_id"]),
                    _td(r["offers"], True),
                    _td(_pct(r["error_rate"]), True),
                    _td(_pct(r["uncertain_rate"]), True),
                    _td(r["mall_categories"], True),
                    _td(f"{r['weight_in_use']:.2f}", True),
                    _td("–" if r["suggested_weight"] is None else f"{r['suggested_weight']:.2f}", True),
                ]
                for r in report.shops
            ],
            "shops",
        )
    )

    parts.append("<h2>Categories in detail</h2>")
    for index, d in enumerate(report.details):
        st = d["stats"]
        parts.append(f'<section class="category" id="category-{index}"><h3>{_e(d["category"])}</h3>')
        parts.append(
            f'<p class="meta">error rate {_pct(st["error_rate"])} of {st["support"]} offers; '
            f"uncertain {_pct(st['uncertain_rate'])}; {st['wrongly_filed_here']} offers of other "
            f"categories predicted here.</p>"
        )
        if d["pushing_tokens"]:
            parts.append(
                "<p>Tokens that most often push this category's errors toward the wrong answer — "
                "offers of other categories filed here, and offers of this one filed elsewhere "
                "(total push: the sum of its SHAP values toward the wrong category; errors: how many of the "
                "explained errors have it among their three strongest pushes):</p>"
            )
            parts.append(
                _table(
                    ["token", "errors", "total push", "mostly toward"],
                    [
                        [_td(t["token"]), _td(t["errors"], True), _td(f"{t['total_push']:.3f}", True), _td(t["toward"])]
                        for t in d["pushing_tokens"]
                    ],
                )
            )
        if d["candidates"]:
            lines = "\n".join(
                f"{c['keyword']}\t{c['excluded']}\taudit: {c['violations']} of "
                f"{c['offers_with_keyword']} labeled offers with it are under it"
                for c in d["candidates"]
            )
            parts.append(
                "<p>Candidate dictionary entries (<code>category_exclusions.tsv</code> format), "
                f'for review:</p><pre class="candidates">{_e(lines)}</pre>'
            )
        parts.extend(_offer(o) for o in d["offers"])
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
