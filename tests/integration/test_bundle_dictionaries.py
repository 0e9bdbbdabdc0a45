"""Reviewed dictionaries deployed without retraining (CATSTREAM_DICTIONARIES_DIR, the chart's ConfigMap)."""

from __future__ import annotations

import pytest

from core.bundle import BundleError, ModelBundle
from core.features import Featurizer
from core.schemas import Offer

pytestmark = pytest.mark.integration


def test_dictionary_directory_replaces_the_bundles(bundle, tmp_path):
    shipped = ModelBundle.load(bundle)
    target = shipped.labels[0]
    (tmp_path / "category_exclusions.tsv").write_text(f"zzqx\t{target}\tdeployed rule\n")
    (tmp_path / "ambiguous_terms.tsv").write_text("")

    deployed = ModelBundle.load(bundle, dictionaries_dir=tmp_path)
    assert [rule.keyword for rule in deployed.dictionaries.exclusions] == [("zzqx",)]
    offer = Offer(offer_id="o1", title="zzqx thing", mall_id="m")
    mask = Featurizer.from_bundle(deployed).featurize(offer).exclusion
    assert mask[deployed.labels.index(target)] and mask.sum() == 1
    assert not Featurizer.from_bundle(shipped).featurize(offer).exclusion[shipped.labels.index(target)]


def test_missing_dictionary_directory_is_an_error_not_an_empty_dictionary(bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        ModelBundle.load(bundle, dictionaries_dir=tmp_path / "nope")
