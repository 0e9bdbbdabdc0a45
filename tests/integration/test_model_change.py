"""A model change under a steady stream: the node switches featurisers and model together, loses
nothing, leaves no gap, and refuses a bundle that fails its check while the old model serves on."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from core.bundle import PARITY_FILE, BundleConfig
from core.offer_files import offers_from_frame, read_offer_file
from producers.publish import publish_offers
from tests.conftest import read_prediction_messages

pytestmark = pytest.mark.integration


def retagged(bundle: Path, target: Path, version: str) -> Path:
    """A copy of ``bundle`` under another model version: a new bundle to the node, as a retrained
    one would be (the weights are the same, so its answers can be checked against the first)."""
    shutil.copytree(bundle, target)
    config = BundleConfig.read(target)
    config.model_copy(update={"model_version": version}).write(target)
    return target


def point(link: Path, target: Path) -> None:
    """Swap the symlink ``link`` to ``target`` atomically, as an operator deploying a bundle does."""
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def test_a_new_bundle_is_served_without_a_gap_and_a_broken_one_is_refused(
    bundle, marketplace, stream_settings, start_node, tmp_path
):
    first = json.loads((bundle / "config.json").read_text())["model_version"]
    second = retagged(bundle, tmp_path / "second", "20261207T000000-second")
    broken = retagged(bundle, tmp_path / "broken", "20261207T000000-broken")
    with np.load(broken / PARITY_FILE) as probe:  # its model.onnx no longer matches its export
        arrays = dict(probe)
    arrays["expected_logits"] = arrays["expected_logits"] + 1.0
    np.savez(broken / PARITY_FILE, **arrays)
    current = tmp_path / "current"
    current.symlink_to(bundle)

    node = start_node(workers=2, env={"CATSTREAM_MODEL_POLL_S": "1"}, model=current)
    offers = list(offers_from_frame(read_offer_file(marketplace).head(1200)))
    publisher = threading.Thread(
        target=publish_offers, args=(offers, stream_settings), kwargs={"rate": 40.0, "progress": False}
    )
    publisher.start()
    time.sleep(8)
    point(current, broken)
    time.sleep(6)
    point(current, second)
    publisher.join()
    expected = {offer.offer_id for offer in offers}
    messages = read_prediction_messages(stream_settings, expected)
    log = node.log()
    assert node.stop() == 0, log[-3000:]

    predictions = [(json.loads(m.value()), m.timestamp()[1], m.partition()) for m in messages]
    assert {p["offer_id"] for p, _, _ in predictions} == expected  # N in, N out
    versions = {p["model_version"] for p, _, _ in predictions}
    assert versions == {first, "20261207T000000-second"}, versions
    # In each partition (keyed by offer_id, the same partition in both topics), in the order the
    # offers were produced, the version switches exactly once: no offer after the switch went to the
    # old model, none before it to the new one.
    order = {offer.offer_id: i for i, offer in enumerate(offers)}
    by_partition = defaultdict(list)
    for prediction, _, partition in predictions:
        by_partition[partition].append((order[prediction["offer_id"]], prediction["model_version"]))
    for partition, sequence in by_partition.items():
        versions_in_order = [version for _, version in sorted(sequence)]
        switches = sum(a != b for a, b in itertools.pairwise(versions_in_order))
        assert switches == 1 and versions_in_order[0] == first, (partition, switches)
    # No gap: predictions kept coming at the publishing rate through the change.
    stamps = np.sort([timestamp for _, timestamp, _ in predictions]) / 1000.0
    steady = stamps[(stamps > stamps[0] + 5) & (stamps < stamps[-1] - 2)]
    assert np.max(np.diff(steady)) < 1.0, f"a gap of {np.max(np.diff(steady)):.2f} s"
    assert "refused model 20261207T000000-broken" in log and "does not reproduce the logits" in log
    assert "model generation 1 serves (version 20261207T000000-second)" in log
