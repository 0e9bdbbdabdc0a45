import json

from hypothesis import given, settings
from hypothesis import strategies as st

from core.schemas import MAX_OFFER_ID_CHARS, Offer, Prediction, Rejection, parse_offer

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
