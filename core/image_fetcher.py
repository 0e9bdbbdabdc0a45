"""Image URLs fetched concurrently, so that one slow or dead image host holds up only its own offers.

A preprocess worker hands each offer's ``http(s)`` image URL to an :class:`ImageFetcher` and goes
on consuming; it featurises the offer once the bytes (or the reason there are none) come back.
The fetcher runs up to ``threads`` fetches at once, at most ``per_host`` of them to one host (name
and port): the
rest of a busy host's fetches wait in that host's own line, never in front of other hosts'. Each
fetch is :func:`core.images.fetch_image_bytes` under the worker's :class:`ImagePolicy`, with its
total deadline, address checks and redirect rules; a fetch never raises, it ends with bytes or an
:class:`ImageUnavailableError`.

Offers complete out of order; the worker's offset tracker already lets a partition's offset pass
only below its oldest unfinished offer.
"""

from __future__ import annotations

import queue
import threading
import urllib.parse
from collections import deque
from collections.abc import Hashable

from core.images import ImagePolicy, ImageUnavailableError, fetch_image_bytes

__all__ = ["ImageFetcher", "is_remote"]

Fetched = bytes | ImageUnavailableError


def is_remote(url: str | None) -> bool:
    """Whether ``url`` is fetched over the network (``http(s)``), rather than read or refused at once."""
    return bool(url) and urllib.parse.urlsplit(str(url)).scheme.lower() in ("http", "https")


class ImageFetcher:
    """Fetches by key: :meth:`submit` never blocks, :meth:`completed` hands back what finished."""

    def __init__(self, policy: ImagePolicy, *, threads: int = 64, per_host: int = 32):
        if threads < 1 or per_host < 1:
            raise ValueError(f"threads and per_host must be at least 1, got {threads} and {per_host}")
        self.policy = policy
        self.per_host = per_host
        self.threads = threads
        # Daemon threads, started as needed: a process that exits never waits for a fetch still
        # running to its deadline (its offer was not committed, so Kafka delivers it again).
        self._tasks: queue.SimpleQueue[tuple[Hashable, str, str] | None] = queue.SimpleQueue()
        self._started = 0
        self._closed = False
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}  # host -> fetches running
        self._waiting: dict[str, deque[tuple[Hashable, str]]] = {}  # host -> fetches in its line
        self._done: deque[tuple[Hashable, Fetched]] = deque()
        self._pending = 0

    def submit(self, key: Hashable, url: str) -> None:
        """Fetch ``url``; its result comes back under ``key``."""
        host = self._host(url)
        with self._lock:
            self._pending += 1
            if self._active.get(host, 0) < self.per_host:
                self._active[host] = self._active.get(host, 0) + 1
                self._start(key, url, host)
            else:
                self._waiting.setdefault(host, deque()).append((key, url))

    def completed(self) -> list[tuple[Hashable, Fetched]]:
        """Every fetch finished since the last call: ``(key, bytes or ImageUnavailableError)``."""
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._pending -= len(done)
        return done

    @property
    def pending(self) -> int:
        """Fetches submitted and not yet handed back by :meth:`completed`."""
        with self._lock:
            return self._pending

    def close(self) -> None:
        """Stop: waiting fetches are dropped, running ones end at their deadline unattended."""
        with self._lock:
            self._closed = True
            self._waiting.clear()
            for _ in range(self._started):
                self._tasks.put(None)

    # -- internals ----------------------------------------------------------------------------------

    @staticmethod
    def _host(url: str) -> str:
        """The host a fetch counts against: name and port (as browsers count their connections)."""
        try:
            parts = urllib.parse.urlsplit(url)
            return f"{(parts.hostname or '').lower()}:{parts.port or ''}"
        except ValueError:
            return ""

    def _start(self, key: Hashable, url: str, host: str) -> None:
        """Queue a fetch for the threads (under the lock), starting one more thread if all are busy."""
        self._tasks.put((key, url, host))
        running = sum(self._active.values())
        if self._started < min(self.threads, running):
            self._started += 1
            threading.Thread(target=self._serve, name=f"image-fetch-{self._started}", daemon=True).start()

    def _serve(self) -> None:
        while (task := self._tasks.get()) is not None:
            self._run(*task)

    def _run(self, key: Hashable, url: str, host: str) -> None:
        try:
            result: Fetched = fetch_image_bytes(url, policy=self.policy)
        except ImageUnavailableError as error:
            result = error
        except Exception as error:  # a fetch must end with a status, whatever went wrong
            result = ImageUnavailableError("unreachable", f"the image fetch failed ({type(error).__name__})")
        with self._lock:
            self._done.append((key, result))
            line = self._waiting.get(host)
            if line and not self._closed:
                next_key, next_url = line.popleft()
                if not line:
                    del self._waiting[host]
                self._tasks.put((next_key, next_url, host))  # the host's turn passes on
            else:
                self._active[host] -= 1
                if not self._active[host]:
                    del self._active[host]
