"""The scale-out offer index: a Qdrant collection, for when one machine is not enough.

``QdrantIndex.connect("http://qdrant:6333")`` points it at a cluster (sharding and replication
are the cluster's: ``shards``/``replication_factor`` are passed when the collection is created).
``":memory:"`` or a directory runs qdrant-client's local mode in the process, which is what the
contract tests use here (no Qdrant server installs offline on this machine).

- One point per offer, id ``uuid5(offer_id)``, one named vector per space, distance ``DOT`` on
  L2-normalised vectors (the same scores as the Faiss engine).
- Category filters match the payload field ``categories``, which holds every prefix of the
  offer's path, so a leaf and each of its ancestors are one keyword match (indexed on a server).
- Offsets live in a small side collection ``<collection>__offsets``, written after the points:
  Qdrant has acknowledged every upsert before the offsets that cover it are saved.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from core.offer_index import (
    Hit,
    IndexedOffer,
    IndexUnavailableError,
    OfferIndexError,
    Offsets,
    category_prefixes,
    checked_queries,
    normalised,
)

__all__ = ["QdrantIndex"]

_NAMESPACE = uuid.UUID("5b0c4f6e-2a51-4a4f-9a0e-6f3f6c1d2b7a")
_OFFSETS_POINT = 1


# Statuses that say "not now" rather than "not this request".
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class _GuardedClient:
    """A Qdrant client whose calls raise :class:`IndexUnavailableError` when the server cannot be
    reached or answers that it cannot serve now; any other error passes through unchanged."""

    def __init__(self, client: QdrantClient):
        self._inner = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except (ResponseHandlingException, httpx.TransportError, ConnectionError) as error:
                raise IndexUnavailableError(f"Qdrant cannot be reached ({type(error).__name__}: {error})") from error
            except UnexpectedResponse as error:
                if error.status_code in _RETRYABLE_STATUSES:
                    raise IndexUnavailableError(f"Qdrant answered {error.status_code}: try again later") from error
                raise

        return cast(Callable[..., Any], call)


def _point_id(offer_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, offer_id))


class QdrantIndex:
    """The Qdrant engine of :class:`core.offer_index.OfferIndex`."""

    def __init__(
        self,
        client: QdrantClient,
        *,
        collection: str,
        spaces: Mapping[str, int],
        shards: int | None = None,
        replication_factor: int | None = None,
    ) -> None:
        client = client if isinstance(client, _GuardedClient) else cast(QdrantClient, _GuardedClient(client))
        self.client = client
        self.collection = collection
        self.spaces = {name: int(dimension) for name, dimension in spaces.items()}
        self._offsets_collection = f"{collection}__offsets"
        if client.collection_exists(collection):
            described = client.get_collection(collection).config.params.vectors
            held = (
                {name: params.size for name, params in (described or {}).items()} if isinstance(described, dict) else {}
            )
            if held != self.spaces:
                raise OfferIndexError(
                    f"Qdrant collection {collection!r} holds spaces {held}, but {self.spaces} were asked for"
                )
        else:
            client.create_collection(
                collection,
                vectors_config={
                    name: models.VectorParams(size=dimension, distance=models.Distance.DOT)
                    for name, dimension in self.spaces.items()
                },
                shard_number=shards,
                replication_factor=replication_factor,
            )
            if not _is_local(client):  # local mode scans payloads; a server wants the index
                client.create_payload_index(collection, "categories", models.PayloadSchemaType.KEYWORD)
                client.create_payload_index(collection, "offer_id", models.PayloadSchemaType.KEYWORD)
        if not client.collection_exists(self._offsets_collection):
            client.create_collection(
                self._offsets_collection, vectors_config=models.VectorParams(size=1, distance=models.Distance.DOT)
            )

    @staticmethod
    def client_for(location: str, *, api_key: str | None = None) -> QdrantClient:
        """A client for an ``http(s)://`` URL, ``":memory:"`` or a local-mode directory, whose
        calls raise :class:`IndexUnavailableError` while a server cannot be reached."""
        if location.startswith(("http://", "https://")):
            # No version probe at construction: it would be one more request to a server that
            # may be down, and a warning per retry.
            client = QdrantClient(url=location, api_key=api_key, timeout=10, check_compatibility=False)
        elif location == ":memory:":
            client = QdrantClient(location=":memory:")
        else:
            client = QdrantClient(path=location)
        return cast(QdrantClient, _GuardedClient(client))

    @staticmethod
    def saved_spaces(client: QdrantClient, collection: str) -> dict[str, int] | None:
        """The spaces of an existing collection, None when there is none."""
        if not client.collection_exists(collection):
            return None
        described = client.get_collection(collection).config.params.vectors
        return {name: params.size for name, params in described.items()} if isinstance(described, dict) else {}

    @classmethod
    def connect(
        cls,
        location: str,
        *,
        collection: str,
        spaces: Mapping[str, int],
        api_key: str | None = None,
        **options: int | None,
    ) -> QdrantIndex:
        """``location``: an ``http(s)://`` URL of a Qdrant server, ``":memory:"``, or a directory
        for the in-process local mode."""
        return cls(cls.client_for(location, api_key=api_key), collection=collection, spaces=spaces, **options)

    # -- the contract ------------------------------------------------------------------------

    def upsert(self, offers: Sequence[IndexedOffer]) -> None:
        if not offers:
            return
        latest = {offer.offer_id: offer for offer in offers}  # a later copy in one batch wins
        points = []
        for offer in latest.values():
            missing = set(self.spaces) - set(offer.vectors)
            if missing:
                raise OfferIndexError(f"offer {offer.offer_id!r} has no vector for space(s) {sorted(missing)}")
            vectors = {
                name: normalised(offer.vectors[name], dimension=dimension, what=f"offer {offer.offer_id!r}")[0].tolist()
                for name, dimension in self.spaces.items()
            }
            points.append(
                models.PointStruct(
                    id=_point_id(offer.offer_id),
                    vector=vectors,
                    payload={
                        "offer_id": offer.offer_id,
                        "category": offer.category,
                        "categories": category_prefixes(offer.category),
                        "product": offer.product,
                        "image_sha": offer.image_sha,
                        "listed_at": offer.listed_at,
                        "title": offer.title,
                    },
                )
            )
        self.client.upsert(self.collection, points=points, wait=True)

    def delete(self, offer_ids: Iterable[str]) -> int:
        ids = [_point_id(offer_id) for offer_id in dict.fromkeys(offer_ids)]
        if not ids:
            return 0
        held = self.client.retrieve(self.collection, ids=ids, with_payload=False, with_vectors=False)
        if held:
            self.client.delete(
                self.collection, points_selector=models.PointIdsList(points=[point.id for point in held]), wait=True
            )
        return len(held)

    def get(self, offer_id: str) -> IndexedOffer | None:
        found = self.client.retrieve(self.collection, ids=[_point_id(offer_id)], with_payload=True, with_vectors=True)
        if not found:
            return None
        payload = found[0].payload or {}
        vectors = found[0].vector if isinstance(found[0].vector, dict) else {}
        return IndexedOffer(
            offer_id=payload["offer_id"],
            category=payload["category"],
            vectors={name: np.asarray(vector, dtype=np.float32) for name, vector in vectors.items()},
            product=payload.get("product"),
            image_sha=payload.get("image_sha"),
            listed_at=payload.get("listed_at"),
            title=payload.get("title"),
        )

    def titles(self) -> Iterator[tuple[str, str]]:
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection, limit=1000, offset=offset, with_payload=["offer_id", "title"], with_vectors=False
            )
            for point in points:
                payload = point.payload or {}
                if payload.get("title"):
                    yield payload["offer_id"], payload["title"]
            if offset is None:
                return

    def count(self, category: str | None = None) -> int:
        return self.client.count(self.collection, count_filter=_category_filter(category), exact=True).count

    def __len__(self) -> int:
        return self.count()

    def search(self, space: str, queries: np.ndarray, *, k: int, category: str | None = None) -> list[list[Hit]]:
        queries = checked_queries(self.spaces, space, queries, k)
        requests = [
            models.QueryRequest(
                query=query.tolist(), using=space, filter=_category_filter(category), limit=k, with_payload=True
            )
            for query in queries
        ]
        responses = self.client.query_batch_points(self.collection, requests=requests)
        return [[_hit(point) for point in response.points] for response in responses]

    def save(self, offsets: Offsets) -> None:
        self.client.upsert(
            self._offsets_collection,
            points=[
                models.PointStruct(
                    id=_OFFSETS_POINT,
                    vector=[1.0],
                    payload={
                        "offsets": [
                            [topic, partition, offset] for (topic, partition), offset in sorted(offsets.items())
                        ]
                    },
                )
            ],
            wait=True,
        )

    def offsets(self) -> Offsets:
        found = self.client.retrieve(self._offsets_collection, ids=[_OFFSETS_POINT], with_payload=True)
        if not found:
            return {}
        return {
            (topic, int(partition)): int(offset) for topic, partition, offset in (found[0].payload or {})["offsets"]
        }

    def close(self) -> None:
        self.client.close()


def _category_filter(category: str | None) -> models.Filter | None:
    if category is None:
        return None
    return models.Filter(must=[models.FieldCondition(key="categories", match=models.MatchValue(value=category))])


def _hit(point: models.ScoredPoint) -> Hit:
    payload = point.payload or {}
    return Hit(
        offer_id=payload["offer_id"],
        score=float(point.score),
        category=payload["category"],
        product=payload.get("product"),
        image_sha=payload.get("image_sha"),
        listed_at=payload.get("listed_at"),
    )


def _is_local(client: QdrantClient) -> bool:
    inner = client._inner if isinstance(client, _GuardedClient) else client
    return type(inner._client).__name__ == "QdrantLocal"
