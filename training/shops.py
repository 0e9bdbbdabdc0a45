"""How far each shop's own category ("mall category") can be trusted, estimated from history.

A reliable shop files the same kind of product under the same mall category, so its mall
category predicts the marketplace category well; an unreliable one files at random. For every
shop we measure the *purity* of the label given its mall category — the share of its offers
whose label is the most common label of their mall-category string — on held-out folds, so a
shop with one offer per string does not look perfect. The weight rescales purity between the
chance level (the share of the shop's most common label, weight 0) and 1 (weight 1).

The weight multiplies the mall-category branch of the model (input ``mall_weight``). Training
uses the same weights, so the model learns to lean on the title and image when a shop's
category is down-weighted; shops never seen in history get ``default`` (1.0).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["estimate_shop_weights"]


def estimate_shop_weights(
    frame: pd.DataFrame, *, min_offers: int = 30, folds: int = 2, seed: int = 0
) -> tuple[dict[str, float], pd.DataFrame]:
    """Weights per ``mall_id`` from a frame with ``mall_id, mall_category, label``; and the evidence table.

    Shops with fewer than ``min_offers`` offers are left out (they get the default weight).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for mall_id, offers in frame.groupby("mall_id", sort=True):
        if not mall_id or len(offers) < min_offers:
            continue
        fold = rng.integers(0, folds, len(offers))
        hits, chance_hits = 0, 0
        for k in range(folds):
            fit, held = offers[fold != k], offers[fold == k]
            # the most common label of each mall-category string, learned on the other folds
            mapping = fit.groupby("mall_category")["label"].agg(lambda s: s.value_counts().index[0])
            fallback = fit["label"].value_counts().index[0]
            predicted = held["mall_category"].map(mapping).fillna(fallback)
            hits += int((predicted == held["label"]).sum())
            chance_hits += int((held["label"] == fallback).sum())
        purity, chance = hits / len(offers), chance_hits / len(offers)
        weight = float(np.clip((purity - chance) / max(1e-9, 1.0 - chance), 0.0, 1.0))
        rows.append(
            {
                "mall_id": mall_id,
                "offers": len(offers),
                "mall_categories": offers["mall_category"].nunique(),
                "purity": purity,
                "chance": chance,
                "weight": weight,
            }
        )
    table = pd.DataFrame(rows, columns=["mall_id", "offers", "mall_categories", "purity", "chance", "weight"])
    return dict(zip(table["mall_id"], table["weight"].round(4), strict=True)), table
