"""Publishing offers to Kafka, and the synthetic marketplace used by the demo and tests."""

from producers.publish import publish_offers, publish_raw

__all__ = ["publish_offers", "publish_raw"]
