import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.schemas import MAX_OFFER_ID_CHARS, Offer, Prediction, Rejection, dead_letter, parse_offer

LIMIT = 100_000


def test_korean_offer_round_trips():
    offer = Offer(
        offer_id="o-1",
        title="여성 블랙 원피스 무료배송",
        mall_id="mall-hana",
        mall_category="원피스 카테고리/Clothing",
        image_url="file:///x.jpg",
        listed_at="2026-07-01",
        extra={"price": 19000},
    )
    parsed = parse_offer(offer.to_bytes(), max_bytes=LIMIT)
    assert parsed == offer


def test_integer_offer_id_is_accepted_as_string():
    parsed = parse_offer(b'{"offer_id": 1164, "title": "Nike Men Jersey"}', max_bytes=LIMIT)
    assert isinstance(parsed, Offer) and parsed.offer_id == "1164"


def test_unknown_fields_are_kept_in_extra():
    parsed = parse_offer(b'{"offer_id": "a", "title": "t", "brand": "Puma"}', max_bytes=LIMIT)
    assert parsed.extra == {"brand": "Puma"}


def test_rejections_have_readable_reasons():
    cases = {
        b"{not json": "malformed JSON",
        b'{"offer_id": "a"}': "title is missing",
        b'{"offer_id": "a", "title": "  "}': "title is empty",
        b'{"offer_id": "a", "title": 5}': "title is missing or not a string",
        b'{"title": "x"}': "offer_id",
        b'{"offer_id": true, "title": "x"}': "offer_id",
        b'{"offer_id": "a", "title": "x", "image_url": 3}': "image_url must be a string",
        b'{"offer_id": "a", "title": "x", "schema_version": 9}': "schema_version",
        b"[1, 2]": "expected a JSON object",
        b'{"offer_id": "a", "title": "\xed\x95"}': "not UTF-8",
        b'{"offer_id": "a", "title": NaN}': "malformed JSON",
        None: "empty message",
    }
    for raw, reason in cases.items():
        result = parse_offer(raw, max_bytes=LIMIT)
        assert isinstance(result, Rejection), raw
        assert reason in result.reason, (raw, result.reason)


def test_oversized_message_is_rejected_before_parsing():
    raw = json.dumps({"offer_id": "a", "title": "x" * 500}).encode()
    result = parse_offer(raw, max_bytes=100)
    assert isinstance(result, Rejection) and result.error_type == "OversizedMessage"


def test_offer_id_length_is_bounded():
    raw = json.dumps({"offer_id": "x" * (MAX_OFFER_ID_CHARS + 1), "title": "t"}).encode()
    assert isinstance(parse_offer(raw, max_bytes=LIMIT), Rejection)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_give_an_offer_or_a_rejection(raw):
    result = parse_offer(raw, max_bytes=200)
    assert isinstance(result, (Offer, Rejection))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["offer_id", "title", "mall_id", "image_url", "listed_at", "x"]), json_values))
def test_any_json_object_gives_an_offer_or_a_rejection(document):
    result = parse_offer(json.dumps(document).encode(), max_bytes=LIMIT)
    assert isinstance(result, (Offer, Rejection))
    if isinstance(result, Offer):
        assert result.title.strip() and result.offer_id


def test_prediction_is_valid_json_even_with_non_finite_confidence():
    prediction = Prediction(
        offer_id="a",
        category="uncertain",
        confidence=float("nan"),
        top3=[("A", 0.5)],
        model_version="v",
        image_used=False,
        image_status="missing",
        timings_ms={"x": 1.0},
    )
    document = json.loads(prediction.to_bytes())
    assert document["confidence"] == 0.0 and document["image_status"] == "missing"


REJECTION = Rejection("malformed JSON: Expecting value", "JSONDecodeError")


def letter_of(value, *, key=b"k", headers=None, max_bytes=900_000):
    return dead_letter(
        key, value, headers, stage="parse", rejection=REJECTION, source="offers/0/7", max_bytes=max_bytes
    )


def test_a_dead_letter_that_fits_is_whole():
    letter = letter_of(b"{not json", headers=[("trace", b"abc")])
    assert (letter.key, letter.value) == (b"k", b"{not json")
    assert dict(letter.headers) == {
        "trace": b"abc",
        "catstream.stage": b"parse",
        "catstream.reason": b"malformed JSON: Expecting value",
        "catstream.error_type": b"JSONDecodeError",
        "catstream.source": b"offers/0/7",
    }


def test_a_dead_letter_too_large_is_cut_and_says_what_it_was():
    value = bytes(range(256)) * 4700  # 1.2 MB, as a shop's broken message may be
    letter = letter_of(value, max_bytes=900_000)
    headers = dict(letter.headers)
    assert letter.size <= 900_000 - 512 and len(letter.value) > 800_000
    assert value.startswith(letter.value)
    assert headers["catstream.original_bytes"] == str(len(value)).encode()
    assert headers["catstream.original_sha256"] == hashlib.sha256(value).hexdigest().encode()
    assert headers["catstream.truncated"] == b"value" and headers["catstream.stage"] == b"parse"


def test_huge_keys_and_headers_are_cut_too():
    letter = letter_of(
        b"x" * 10_000, key=b"k" * 50_000, headers=[(f"h{i}", b"v" * 1000) for i in range(200)], max_bytes=16_384
    )
    assert letter.size <= 16_384 and len(letter.key) <= 16_384 // 4
    assert dict(letter.headers)["catstream.truncated"] == b"value,headers,key"
    assert dict(letter.headers)["catstream.original_bytes"] == b"10000"


@settings(max_examples=200)
@given(
    st.binary(max_size=5000),
    st.one_of(st.none(), st.binary(max_size=3000)),
    st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=500)), max_size=20),
    st.integers(min_value=4096, max_value=8192),
)
def test_any_message_gives_a_dead_letter_within_its_budget(value, key, headers, budget):
    letter = dead_letter(key, value, headers, stage="parse", rejection=REJECTION, source="s", max_bytes=budget)
    assert letter.size + 16 * len(letter.headers) <= budget
    assert dict(letter.headers)["catstream.stage"] == b"parse"


def test_prediction_vectors_round_trip_in_float16_and_fused_is_rebuilt():
    import numpy as np

    from core.schemas import decode_vectors, encode_vectors

    rng = np.random.default_rng(0)
    image, text = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 16)))
    document = json.loads(json.dumps({"vectors": encode_vectors({"image": image, "text": text})}))
    vectors = decode_vectors(document)
    assert set(vectors) == {"image", "text", "fused"} and vectors["fused"].dtype == np.float32
    np.testing.assert_allclose(vectors["image"], image, atol=1e-3)
    np.testing.assert_allclose(vectors["fused"], np.concatenate([image, text]) / np.sqrt(2), atol=1e-3)
    assert decode_vectors({}) == {}
    with pytest.raises(ValueError, match="dtype float16"):
        decode_vectors({"vectors": {"dtype": "float64", "image": "AAAA"}})
    with pytest.raises(ValueError, match="whole number"):
        decode_vectors({"vectors": {"dtype": "float16", "image": "AA=="}})  # one byte
