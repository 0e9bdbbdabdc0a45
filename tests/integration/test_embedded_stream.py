"""A bundle with the embedder attached, served by a real node on the embedded broker: every
prediction carries the offer's image, text and fused vectors from the same ONNX pass, equal to
the attached graph's offline output, and the categories are the classifier's own. Each also
carries its product key and image hash, which similar-product search uses to leave duplicates out."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from core.bundle import ModelBundle
from core.features import Featurizer
from core.images import ImagePolicy, image_bytes
from core.offer_files import offers_from_frame, read_offer_file
from core.schemas import decode_vectors
from core.scoring import OnnxClassifier, padded_sizes
from core.text import product_key
from producers.publish import publish_offers
from tests.conftest import read_predictions

pytestmark = pytest.mark.integration


def test_predictions_carry_the_vectors_of_the_same_pass(marketplace, embedded_bundle, stream_settings, start_node):
    offers = list(offers_from_frame(read_offer_file(marketplace).head(120)))
    node = start_node(model=embedded_bundle)
    publish_offers(offers, stream_settings, progress=False)
    predictions = {p["offer_id"]: p for p in read_predictions(stream_settings, {o.offer_id for o in offers})}
    assert node.stop() == 0
    assert len(predictions) == len(offers)

    bundle = ModelBundle.load(embedded_bundle)
    featurizer = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files())
    batch = featurizer.batch(offers)
    attached = OnnxClassifier(bundle, embeddings=True)
    assert attached.spaces == ("image", "text", "fused")
    logits, expected = attached.score(batch.inputs)
    plain_logits = OnnxClassifier(bundle).logits(batch.inputs)
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-5, atol=1e-5)  # attaching changes no category
    for row, offer in enumerate(offers):
        vectors = decode_vectors(predictions[offer.offer_id])
        assert {space: len(v) for space, v in vectors.items()} == {"image": 16, "text": 16, "fused": 32}
        for space, vector in vectors.items():
            np.testing.assert_allclose(vector, expected[space][row], atol=2e-3)  # float16 on the wire
            assert abs(np.linalg.norm(vector) - 1.0) < 5e-3
        assert predictions[offer.offer_id]["product"] == product_key(offer.title)
        assert predictions[offer.offer_id]["title"] == offer.title
        if offer.image_url or offer.image_b64:
            data = image_bytes(
                image_url=offer.image_url, image_b64=offer.image_b64, policy=ImagePolicy.for_offer_files()
            )
            assert predictions[offer.offer_id]["image_sha"] == hashlib.sha256(data).hexdigest()
        else:
            assert predictions[offer.offer_id]["image_sha"] is None
    assert len({p["product"] for p in predictions.values()}) > 1
    assert sum(p["image_sha"] is not None for p in predictions.values()) > len(offers) // 2


def test_a_bundle_without_an_embedder_sends_no_vectors(marketplace, bundle, stream_settings, start_node):
    offers = list(offers_from_frame(read_offer_file(marketplace).head(20)))
    node = start_node(model=bundle)
    publish_offers(offers, stream_settings, progress=False)
    predictions = read_predictions(stream_settings, {o.offer_id for o in offers})
    assert node.stop() == 0
    assert predictions and all("vectors" not in p and decode_vectors(p) == {} for p in predictions)


def test_padded_batches_give_exactly_the_rows_of_unpadded_ones(marketplace, embedded_bundle):
    """On an accelerator the node pads each batch to a fixed size; the padding rows must never
    reach an offer: every size from 1 to 20, padded to 8/16/32, gives the unpadded rows."""
    bundle = ModelBundle.load(embedded_bundle)
    offers = list(offers_from_frame(read_offer_file(marketplace).head(20)))
    inputs = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files()).batch(offers).inputs
    plain = OnnxClassifier(bundle, embeddings=True)
    padded = OnnxClassifier(bundle, embeddings=True, pad_to=padded_sizes(32))
    assert padded.pad_to == (8, 16, 32) and not padded.accelerated
    assert padded.warm_up({name: array[:1] for name, array in inputs.items()}) == [8, 16, 32]
    for rows in range(1, 21):
        batch = {name: array[:rows] for name, array in inputs.items()}
        (logits, vectors), (expected_logits, expected_vectors) = padded.score(batch), plain.score(batch)
        assert logits.shape == expected_logits.shape == (rows, len(bundle.labels))
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)
        for space, vector in vectors.items():
            assert vector.shape == expected_vectors[space].shape
            np.testing.assert_allclose(vector, expected_vectors[space], rtol=1e-5, atol=1e-5)
