"""The index's query service, served by ``catstream index`` from the index it keeps current.

    GET  /similar/{offer_id}?k=10   similar products: the offer's leaf, then siblings, then higher
    POST /search {"q", "k", "category"?, "rank_on"?}
                                    text to offers; ``rank_on`` "text" (titles, the default) or
                                    "image" (pictures only: finds new offers by what they show)
    POST /match {offer document}    candidate duplicates of an offer, as ``offers.matched`` has them
    GET  /healthz, /readyz, /metrics

Bad input is a 4xx with the reason: an unknown ``offer_id`` is 404; an empty query, ``k`` outside
1..1000, a body that is not a JSON object or an offer that does not parse is 400; a body over
1 MB is 413. ``/search`` and ``/match`` need a bundle with an embedder (``--model``); without one
they answer 503, as every query and ``/readyz`` do while the index engine cannot be reached.
The index is shared with the indexer under one lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from catstream.health import CONNECTION_TIMEOUT_S, BoundedHTTPServer
from core.offer_index import IndexedOffer, IndexUnavailableError, OfferIndex
from core.schemas import Rejection, parse_offer
from core.scoring import OfferEmbedder
from core.similar import similar_offers
from core.title_index import TitleIndex
from retrieval.indexer import candidates_of

__all__ = ["MAX_BODY_BYTES", "MAX_K", "QueryError", "QueryService", "k_of"]

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BODY_BYTES = 1_000_000
_LATENCY_BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 1000)


class QueryError(ValueError):
    """A query that cannot be answered as asked; ``status`` is its HTTP status (4xx, or 503 while
    the index or the query model is missing). ``catstream query`` prints it as a readable error."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def k_of(value: Any) -> int:
    """A result count from a request, or the :class:`QueryError` saying why it is not one."""
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise QueryError(400, f"k must be an integer, got {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise QueryError(400, f"k must be in 1..{MAX_K}, got {k}")
    return k


class QueryService:
    """Answers queries against ``index()`` (None until the indexer has one) under ``lock``."""

    def __init__(
        self,
        index: Callable[[], OfferIndex | None],
        lock: threading.Lock,
        *,
        embedder: OfferEmbedder | None = None,
        indexer_counts: Callable[[], dict[str, int]] = dict,
        unavailable: Callable[[], str | None] = lambda: None,
        titles: Callable[[], TitleIndex | None] = lambda: None,
    ):
        self.index = index
        self.lock = lock
        self.embedder = embedder
        self.indexer_counts = indexer_counts
        self.unavailable = unavailable  # why the index engine cannot be reached now, or None
        self.titles = titles  # the lexical candidate source /match uses, when there is one
        self.requests: Counter[tuple[str, int]] = Counter()
        self.latency: Counter[tuple[str, float]] = Counter()  # (route, bucket upper bound) -> count
        self._server: BoundedHTTPServer | None = None
        self.port = 0

    # -- the operations, also what the CLI and tests call --------------------------------------

    def similar(self, offer_id: str, k: int) -> dict[str, Any]:
        with self.lock:
            index = self._ready()
            query = index.get(offer_id)
            if query is None:
                raise QueryError(404, f"no offer {offer_id!r} in the index")
            found = similar_offers(
                index, query, k=k, space="fused" if "fused" in index.spaces else next(iter(index.spaces))
            )
        return {
            "offer_id": offer_id,
            "category": query.category,
            "results": [
                {
                    "offer_id": s.hit.offer_id,
                    "score": round(s.hit.score, 5),
                    "category": s.hit.category,
                    "level": s.level,
                }
                for s in found
            ],
        }

    def search(self, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("q")
        if not isinstance(text, str) or not text.strip():
            raise QueryError(400, "q must be a non-empty string")
        k = k_of(body.get("k", 10))
        category = body.get("category")
        if category is not None and not isinstance(category, str):
            raise QueryError(400, "category must be a category path string")
        rank_on = body.get("rank_on", "text")
        if rank_on not in ("text", "image"):
            raise QueryError(400, f"rank_on must be text or image, got {rank_on!r}")
        vector = self._embedder().embed_text([text])[0]
        with self.lock:
            hits = self._ready().search(rank_on, vector, k=k, category=category)[0]
        return {
            "q": text,
            "rank_on": rank_on,
            "results": [{"offer_id": h.offer_id, "score": round(h.score, 5), "category": h.category} for h in hits],
        }

    def match(self, raw: bytes, k: int) -> dict[str, Any]:
        offer = parse_offer(raw, max_bytes=MAX_BODY_BYTES)
        if isinstance(offer, Rejection):
            raise QueryError(400, f"not an offer: {offer.reason}")
        vectors = self._embedder().embed([offer])
        with self.lock:
            index = self._ready()
            probe = IndexedOffer(
                offer.offer_id, "", {space: vectors[space][0] for space in index.spaces}, title=offer.title
            )
            candidates = candidates_of(index, [probe], k=k, titles=self.titles())[0]
        return {"offer_id": offer.offer_id, "candidates": candidates}

    def _ready(self) -> OfferIndex:
        index = self.index()
        if index is None:
            raise QueryError(503, "the index is empty: no prediction with vectors seen yet")
        return index

    def _embedder(self) -> OfferEmbedder:
        if self.embedder is None:
            raise QueryError(503, "no model to embed queries: start catstream index with --model BUNDLE")
        return self.embedder

    # -- HTTP ------------------------------------------------------------------------------------

    def metrics(self) -> str:
        lines = [
            "# HELP catstream_index_offers Offers in the index.",
            "# TYPE catstream_index_offers gauge",
        ]
        with self.lock:
            index = self.index()
            lines.append(f"catstream_index_offers {index.count() if index is not None else 0}")
        lines += [
            "# HELP catstream_indexer_events_total What the indexer did.",
            "# TYPE catstream_indexer_events_total counter",
        ]
        lines += [
            f'catstream_indexer_events_total{{event="{name}"}} {value}'
            for name, value in sorted(self.indexer_counts().items())
        ]
        lines += [
            "# HELP catstream_query_requests_total Query requests by route and status.",
            "# TYPE catstream_query_requests_total counter",
        ]
        lines += [
            f'catstream_query_requests_total{{route="{route}",status="{status}"}} {count}'
            for (route, status), count in sorted(self.requests.items())
        ]
        lines += ["# HELP catstream_query_latency_ms Query latency.", "# TYPE catstream_query_latency_ms histogram"]
        for route in sorted({route for route, _ in self.latency}):
            cumulative = 0
            for bound in (*_LATENCY_BUCKETS_MS, float("inf")):
                cumulative += self.latency[(route, bound)]
                label = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'catstream_query_latency_ms_bucket{{route="{route}",le="{label}"}} {cumulative}')
        return "\n".join(lines) + "\n"

    def start(self, host: str, port: int) -> QueryService:
        service = self

        class Handler(BaseHTTPRequestHandler):
            timeout = CONNECTION_TIMEOUT_S

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

            def _answer(self, method: str) -> None:
                started = time.perf_counter()
                url = urlsplit(self.path)
                route = url.path.split("/")[1] if url.path.count("/") >= 1 else ""
                try:
                    status, body = 200, self._route(method, url)
                except QueryError as error:
                    status, body = error.status, {"error": str(error)}
                except IndexUnavailableError as error:
                    status, body = 503, {"error": str(error)}
                except Exception as error:
                    log.exception("query failed")
                    status, body = 500, {"error": f"{type(error).__name__}: {error}"}
                if isinstance(body, str):
                    self._reply(status, body.encode(), "text/plain; version=0.0.4")
                else:
                    self._reply(status, json.dumps(body).encode(), "application/json")
                service.requests[(route, status)] += 1
                elapsed = (time.perf_counter() - started) * 1000
                bucket = next((b for b in _LATENCY_BUCKETS_MS if elapsed <= b), float("inf"))
                service.latency[(route, bucket)] += 1

            def _route(self, method: str, url) -> dict[str, Any] | str:
                parts = url.path.strip("/").split("/")
                query = parse_qs(url.query)
                if method == "GET" and parts[0] == "similar" and len(parts) == 2:
                    return service.similar(unquote(parts[1]), k_of(query.get("k", ["10"])[0]))
                if method == "GET" and url.path == "/healthz":
                    return "ok\n"
                if method == "GET" and url.path == "/readyz":
                    reason = service.unavailable()
                    if reason is not None:
                        raise QueryError(503, f"the offer index cannot be reached: {reason}")
                    with service.lock:
                        ready = service.index() is not None
                    if not ready:
                        raise QueryError(503, "no index yet")
                    return "ok\n"
                if method == "GET" and url.path == "/metrics":
                    return service.metrics()
                if method == "POST" and url.path in ("/search", "/match"):
                    raw = self._body()
                    if url.path == "/match":
                        return service.match(raw, k_of(query.get("k", ["10"])[0]))
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        raise QueryError(400, "the body is not JSON") from None
                    if not isinstance(body, dict):
                        raise QueryError(400, "the body must be a JSON object")
                    return service.search(body)
                raise QueryError(
                    404, "not found; try /similar/ID, POST /search, POST /match, /healthz, /readyz, /metrics"
                )

            def _body(self) -> bytes:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    raise QueryError(400, "Content-Length is not a number") from None
                if length > MAX_BODY_BYTES:
                    # Read a moderately large body away, so the client sees the 413 rather than a
                    # broken pipe; a huge one is cut off with the connection.
                    if length <= 4 * MAX_BODY_BYTES:
                        self.rfile.read(length)
                    else:
                        self.close_connection = True
                    raise QueryError(413, f"a body of {length} bytes is over {MAX_BODY_BYTES}")
                return self.rfile.read(length)

            def _reply(self, code: int, data: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._server = BoundedHTTPServer((host, port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="queries", daemon=True).start()
        log.info("query service on http://%s:%d (/similar/ID, /search, /match)", host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
