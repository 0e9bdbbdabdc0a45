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
from core.scoring import BoundBatch, OnnxClassifier, padded_sizes
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


def test_bound_batches_see_each_new_batch_and_give_what_plain_runs_give(marketplace, embedded_bundle):
    """I/O binding on the CPU binds the inputs to the caller's memory and the outputs to arrays of
    its own: a run must read the batch now in that memory (refilled in place, or moved), never the
    one that was there when it was bound, and give what a plain run of the same shape gives."""
    bundle = ModelBundle.load(embedded_bundle)
    offers = list(offers_from_frame(read_offer_file(marketplace).head(48)))
    inputs = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files()).batch(offers).inputs
    plain = OnnxClassifier(bundle, embeddings=True, pad_to=(8, 16))
    bound = OnnxClassifier(bundle, embeddings=True, pad_to=(8, 16))
    bound.io_binding = True
    buffers = {name: np.empty((16, *array.shape[1:]), dtype=array.dtype) for name, array in inputs.items()}

    def expect(batch, logits, vectors):
        expected_logits, expected_vectors = plain.score(batch)
        np.testing.assert_allclose(logits, expected_logits, rtol=1e-6, atol=1e-6)
        for space, vector in vectors.items():
            np.testing.assert_allclose(vector, expected_vectors[space], rtol=1e-6, atol=1e-6)

    seen = []
    for start in (0, 16, 32):  # three batches refilled into the same memory, as the gather buffers are
        for name, array in inputs.items():
            buffers[name][:] = array[start : start + 16]
        logits, vectors = bound.score(buffers, bound=0)
        expect({name: array[start : start + 16] for name, array in inputs.items()}, logits, vectors)
        seen.append(logits.copy())
    assert not np.allclose(seen[0], seen[1]) and not np.allclose(seen[1], seen[2])
    moved = {name: array[:16].copy() for name, array in inputs.items()}  # the same key, other memory
    expect(moved, *bound.score(moved, bound=0))
    short = {name: array[20:25] for name, array in inputs.items()}  # 5 rows, padded to 8, a second key
    logits, vectors = bound.score(short, bound=1)
    assert logits.shape == (5, len(bundle.labels))
    expect(short, logits, vectors)
    # each key's outputs are its own: the loop decides for one buffer set's batch while the other's runs
    first = {name: array[:16] for name, array in inputs.items()}
    kept = bound.score(first, bound=0)
    bound.score({name: array[16:32] for name, array in inputs.items()}, bound=1)
    expect(first, *kept)


def test_a_binding_with_input_buffers_of_its_own_refills_them_before_each_run(marketplace, embedded_bundle):
    """The accelerator's way (each input copied into a buffer the binding owns, then run), on host
    memory: every run must give what a plain run of the same batch gives, whether the batch comes
    in the same arrays refilled or in new ones."""
    bundle = ModelBundle.load(embedded_bundle)
    offers = list(offers_from_frame(read_offer_file(marketplace).head(24)))
    inputs = Featurizer.from_bundle(bundle, image_policy=ImagePolicy.for_offer_files()).batch(offers).inputs
    session = OnnxClassifier(bundle, embeddings=True).session
    names = [item.name for item in session.get_inputs()]
    outputs = [item.name for item in session.get_outputs()]
    batches = [{name: inputs[name][start : start + 8] for name in names} for start in (0, 8, 16)]
    binding = BoundBatch(session, batches[0], outputs, device="cpu", own_inputs=True)
    refilled = {name: array.copy() for name, array in batches[0].items()}
    for batch in [*batches, *batches[::-1]]:
        for name in names:
            refilled[name][:] = batch[name]
        for given in (batch, refilled):
            for got, expected in zip(binding.run(given), session.run(outputs, batch), strict=True):
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
