"""Image loading and resizing shared by training and preprocessing.

Returns ``(3, S, S)`` uint8 arrays; normalisation happens inside the model graph, so the queue
moves a quarter of the bytes that float32 tensors would need.

Stream messages come from shops and are untrusted, so an image reference in a message is held to
an :class:`ImagePolicy`:

- only ``http(s)`` URLs and inline bytes (``image_b64``); a local path or ``file://`` URL is read
  only under a configured root, and only if it is a regular file there (never a device or a pipe);
- the host must be on the allowlist when there is one, and every address it resolves to must be
  public: loopback, private, link-local, multicast, reserved and unspecified addresses are refused
  after DNS resolution, on the first request and on every redirect, unless allowed explicitly;
  the connection goes to the address that was checked, so a second DNS answer cannot redirect it;
- redirects go only to ``http(s)`` and only so many times;
- one deadline bounds the whole fetch (DNS, connect, TLS, headers, body): a host that answers a
  byte at a time is cut off when it passes, whatever each read takes;
- a connection is kept alive for the next image only per host name, port and checked address,
  and never reopened by name (http.client's auto-open is off);
- reasons name what went wrong in the project's words, never bytes a server sent.

Every failure raises :class:`ImageUnavailableError` with a status; the featuriser then categorises
the offer from its text. Decoding is bounded too: by bytes, and by pixels per format (JPEG decodes
at a reduced scale, the other formats in full; the limits are measured, docs/operations).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import concurrent.futures
import contextlib
import heapq
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_STATUSES",
    "IMAGE_USED",
    "ImagePolicy",
    "ImageUnavailableError",
    "decode_image",
    "fetch_image_bytes",
    "image_bytes",
    "load_image",
]

IMAGE_USED = "used"
# Every image_status a prediction can carry: the image was used, or why it was not.
IMAGE_STATUSES = (
    IMAGE_USED,
    "absent",  # the offer has no image
    "missing",  # a local file that is not there (under the configured root)
    "unreachable",  # the host did not answer, answered an error, or took longer than the deadline
    "undecodable",  # not an image this worker decodes
    "too_large",  # more bytes or pixels than the limits allow
    "unsupported_url",  # a URL of another scheme, or one that cannot be parsed
    "refused",  # the policy forbids it: a local path, a non-public address, a host not on the allowlist
)
_SCHEMES = ("http", "https")
_USER_AGENT = "catstream-image-fetch"
_CHUNK = 1 << 16
# getaddrinfo cannot be given a timeout, so it runs here and the fetch waits only until its deadline.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-dns")


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """What one image may cost, and where it may come from."""

    max_bytes: int = 10_000_000
    max_pixels: int = 40_000_000  # for JPEG, which decodes at a reduced scale
    max_full_decode_pixels: int = 4_000_000  # for every other format, decoded in full (2000 x 2000)
    timeout_s: float = 3.0  # the whole fetch: DNS, connect, TLS, headers and body
    max_redirects: int = 3
    allowed_hosts: tuple[str, ...] = ()  # empty: any host; "example.com" or "*.example.com"
    allow_private: bool = False  # loopback, private, link-local, ... addresses
    local_root: Path | None = None  # local paths and file:// URLs are read only under it

    @classmethod
    def for_offer_files(cls) -> ImagePolicy:
        """The policy for offer files an operator passes on the command line (training,
        evaluation, audits, benchmarks): their images are local files, and trusted."""
        return cls(local_root=Path("/"), allow_private=True)


class ImageUnavailableError(Exception):
    """The image cannot be used; ``status`` is a short machine-readable reason."""

    def __init__(self, status: str, detail: str):
        if status not in IMAGE_STATUSES:
            raise ValueError(f"unknown image status {status!r}")
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def fetch_image_bytes(url: str, *, policy: ImagePolicy, base_dir: Path | None = None) -> bytes:
    """Bytes of an image given as an ``http(s)://`` URL, or as a path or ``file://`` URL under the
    policy's local root (relative paths against ``base_dir``)."""
    try:
        parsed = urllib.parse.urlsplit(url)
        scheme = parsed.scheme.lower()
    except ValueError:
        raise ImageUnavailableError("unsupported_url", "the image URL cannot be parsed") from None
    if scheme in _SCHEMES:
        return _fetch_http(url, policy)
    if scheme == "file":
        return _read_local(Path(urllib.request.url2pathname(parsed.path)), policy, base_dir=None)
    if scheme == "" or (len(scheme) == 1 and url[1:2] == ":"):  # a plain path (or a Windows drive)
        return _read_local(Path(url), policy, base_dir=base_dir)
    raise ImageUnavailableError("unsupported_url", "only http(s) image URLs are fetched")


def _read_local(path: Path, policy: ImagePolicy, *, base_dir: Path | None) -> bytes:
    if policy.local_root is None:
        raise ImageUnavailableError("refused", "local image paths are not read (no image root is configured)")
    if not path.is_absolute():
        if base_dir is None:
            raise ImageUnavailableError("refused", "a relative image path needs the offer file's directory")
        path = base_dir / path
    root = policy.local_root.resolve()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ImageUnavailableError("missing", "no such image file") from None
    if not resolved.is_relative_to(root):
        raise ImageUnavailableError("refused", "the image path is outside the image root")
    try:
        # O_NONBLOCK: opening a pipe or a terminal must not wait; only regular files are read.
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise ImageUnavailableError("missing", "the image file cannot be opened") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ImageUnavailableError("refused", "the image path is not a regular file")
        data = handle.read(policy.max_bytes + 1)
    if len(data) > policy.max_bytes:
        raise ImageUnavailableError("too_large", f"more than {policy.max_bytes} bytes")
    return data


def _fetch_http(url: str, policy: ImagePolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        if not host:
            raise ImageUnavailableError("unsupported_url", "the image URL has no host")
        _check_allowed_host(host, policy)
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise ImageUnavailableError("unsupported_url", "the image URL has an invalid port") from None
        address = _public_address(host, port, policy, deadline)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        status, location, body = _exchange(parts.scheme.lower(), host, address, port, target, policy, deadline)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise ImageUnavailableError("unreachable", f"HTTP {status} without a location")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).scheme.lower() not in _SCHEMES:
                raise ImageUnavailableError("refused", "a redirect to a URL that is not http(s)")
            continue
        if status != 200:
            raise ImageUnavailableError("unreachable", f"HTTP {status}")
        return body
    raise ImageUnavailableError("unreachable", f"more than {policy.max_redirects} redirects")


def _check_allowed_host(host: str, policy: ImagePolicy) -> None:
    if not policy.allowed_hosts:
        return
    name = host.lower().rstrip(".")
    for allowed in policy.allowed_hosts:
        pattern = allowed.lower().rstrip(".")
        if name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return
    raise ImageUnavailableError("refused", "the image host is not on the allowlist")


def _public_address(host: str, port: int, policy: ImagePolicy, deadline: float) -> str:
    """The address to connect to: every address ``host`` resolves to must be public (unless the
    policy allows private ones), so that no DNS answer can point the fetch at an internal host."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [literal]
    except ValueError:
        future = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            found = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise ImageUnavailableError("unreachable", "the image host's name did not resolve in time") from None
        except (OSError, UnicodeError):
            raise ImageUnavailableError("unreachable", "the image host's name does not resolve") from None
        addresses = [ipaddress.ip_address(str(entry[4][0]).split("%")[0]) for entry in found]
    if not addresses:
        raise ImageUnavailableError("unreachable", "the image host's name does not resolve")
    if not policy.allow_private and not all(_is_public(address) for address in addresses):
        raise ImageUnavailableError("refused", "the image host is not a public address")
    return str(addresses[0])


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


class _Watchdog:
    """One thread that shuts sockets down when their deadlines pass, whatever call is blocked on
    them: a fetch registers its socket instead of starting a timer thread of its own."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._deadlines: list[tuple[float, int, _Guard]] = []  # a heap by deadline
        self._count = 0
        self._thread: threading.Thread | None = None

    def watch(self, guard: _Guard) -> None:
        with self._condition:
            self._count += 1
            heapq.heappush(self._deadlines, (guard.deadline, self._count, guard))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="image-deadlines", daemon=True)
                self._thread.start()
            # Woken only for a new earliest deadline: fetches share one timeout, so nearly every
            # guard goes behind the others, and the thread sleeps through them instead of waking
            # (for the GIL) once per fetch. Guards that finished are dropped when it next wakes.
            if self._deadlines[0][2] is guard:
                self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                while self._deadlines and (self._deadlines[0][2].done or self._deadlines[0][0] <= now):
                    _, _, guard = heapq.heappop(self._deadlines)
                    if not guard.done:
                        guard.expire()
                self._condition.wait(self._deadlines[0][0] - now if self._deadlines else None)


class _Guard:
    """Shuts a socket down when the deadline passes, whatever call is blocked on it."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self._socket: socket.socket | None = None
        self.expired = False
        self.done = False

    def watch(self, sock: socket.socket) -> None:
        self._socket = sock
        _WATCHDOG.watch(self)

    def rebind(self, sock: socket.socket) -> None:
        """Cut ``sock`` instead (the TLS socket that took over the watched one's descriptor)."""
        self._socket = sock
        if self.expired:
            self.expire()

    def expire(self) -> None:
        self.expired = True
        sock = self._socket  # once: the fetch may cancel meanwhile
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing left to cut off
                sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.done = True  # the watchdog drops it when it next wakes
        self._socket = None


_WATCHDOG = _Watchdog()


class _Connections:
    """Idle keep-alive connections, by scheme, host name, port and the address that was checked:
    a connection is only ever reused for the same checked address, never opened by name."""

    def __init__(self, *, idle_s: float = 20.0, per_key: int = 32):
        self.idle_s = idle_s
        self.per_key = per_key
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int, str], list[tuple[float, http.client.HTTPConnection]]] = {}

    def take(self, key: tuple[str, str, int, str]) -> http.client.HTTPConnection | None:
        stale = []
        found = None
        with self._lock:
            held = self._idle.get(key, [])
            while held and found is None:
                since, connection = held.pop()
                if time.monotonic() - since < self.idle_s:
                    found = connection
                else:
                    stale.append(connection)
        for connection in stale:
            connection.close()
        return found

    def close(self) -> None:
        """Close every idle connection (at exit)."""
        with self._lock:
            held = [connection for pairs in self._idle.values() for _, connection in pairs]
            self._idle.clear()
        for connection in held:
            connection.close()

    def give(self, key: tuple[str, str, int, str], connection: http.client.HTTPConnection) -> None:
        with self._lock:
            held = self._idle.setdefault(key, [])
            if len(held) < self.per_key:
                held.append((time.monotonic(), connection))
                return
        connection.close()


_CONNECTIONS = _Connections()
atexit.register(_CONNECTIONS.close)
# What a reused connection the host closed meanwhile raises before any answer: sent again, fresh.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _exchange(
    scheme: str, host: str, address: str, port: int, target: str, policy: ImagePolicy, deadline: float
) -> tuple[int, str | None, bytes]:
    """One GET of ``target`` from ``address`` (checked) for ``host``: ``(status, location, body)``.

    The connection is kept for the next image of the same host and address when the host allows
    it and the whole image was read; a kept one the host has closed meanwhile is replaced once."""
    key = (scheme, host.lower(), port, address)
    reused = _CONNECTIONS.take(key)
    try:
        return _exchange_on(reused, key, target, policy, deadline)
    except _StaleConnectionError:
        return _exchange_on(None, key, target, policy, deadline)


class _StaleConnectionError(Exception):
    """A reused connection was found closed before any answer."""


def _exchange_on(
    reused: http.client.HTTPConnection | None,
    key: tuple[str, str, int, str],
    target: str,
    policy: ImagePolicy,
    deadline: float,
) -> tuple[int, str | None, bytes]:
    scheme, host, port, address = key
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if reused is not None:
            reused.close()
        raise ImageUnavailableError("unreachable", f"no image within {policy.timeout_s:g} s")
    guard = _Guard(deadline)
    connection = reused
    sock = None
    keep = False
    answered = False
    try:
        if connection is None:
            sock = socket.create_connection((address, port), timeout=remaining)
            guard.watch(sock)
            if scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
                guard.rebind(sock)  # the TLS socket now holds the descriptor
            connection = http.client.HTTPConnection(host, port, timeout=max(0.01, deadline - time.monotonic()))
            connection.sock = sock  # the checked address, with the host name for Host and TLS
        else:
            guard.watch(connection.sock)
        connection.auto_open = 0  # never a connection of its own, by name: only the checked address
        sock = connection.sock
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        connection.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": "image/*"})
        response = connection.getresponse()
        answered = True
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise ImageUnavailableError("too_large", f"more than {policy.max_bytes} bytes")
        body = bytearray()
        while len(body) <= policy.max_bytes:
            if time.monotonic() >= deadline:
                raise ImageUnavailableError("unreachable", f"no whole image within {policy.timeout_s:g} s")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            body += chunk
        if guard.expired:  # the guard cut the connection: what arrived is not the whole image
            raise ImageUnavailableError("unreachable", f"no whole image within {policy.timeout_s:g} s")
        if len(body) > policy.max_bytes:
            raise ImageUnavailableError("too_large", f"more than {policy.max_bytes} bytes")
        if declared and declared.isdigit() and len(body) < int(declared):
            raise ImageUnavailableError("unreachable", "the image host closed the connection before the whole image")
        if response.length == 0:  # all its declared bytes read: the connection is free for the next request
            response.close()
        keep = not response.will_close and response.isclosed()
        return 200, None, bytes(body)
    except ImageUnavailableError:
        raise
    except _STALE:
        if reused is not None and not answered and not guard.expired and time.monotonic() < deadline:
            raise _StaleConnectionError() from None
        raise ImageUnavailableError("unreachable", "the image host closed the connection") from None
    except Exception as error:  # whatever the server sent; its bytes never reach the reason
        if guard.expired or time.monotonic() >= deadline:
            raise ImageUnavailableError("unreachable", f"no whole image within {policy.timeout_s:g} s") from None
        raise ImageUnavailableError("unreachable", f"the image host failed ({type(error).__name__})") from None
    finally:
        guard.cancel()
        if connection is not None:
            if keep and not guard.expired:
                _CONNECTIONS.give(key, connection)
            else:
                connection.close()
        elif sock is not None:
            sock.close()


def decode_image(data: bytes, size: int, *, policy: ImagePolicy) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to a ``(3, size, size)`` uint8 RGB array (stretched to square)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
            # JPEG decodes straight at 1/2, 1/4 or 1/8 scale (draft): a large photo costs little.
            # Every other format decodes every pixel, so it gets the lower bound.
            bound = policy.max_pixels if image.format in ("JPEG", "MPO") else policy.max_full_decode_pixels
            if pixels > bound:
                raise ImageUnavailableError("too_large", f"{image.width}x{image.height} pixels ({image.format})")
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except ImageUnavailableError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ImageUnavailableError("undecodable", f"not a decodable image ({type(error).__name__})") from error
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def load_image(
    *, image_url: str | None, image_b64: str | None, size: int, policy: ImagePolicy, base_dir: Path | None = None
) -> np.ndarray:
    """The offer's image as ``(3, size, size)`` uint8, or :class:`ImageUnavailableError`."""
    data = image_bytes(image_url=image_url, image_b64=image_b64, policy=policy, base_dir=base_dir)
    return decode_image(data, size, policy=policy)


def image_bytes(
    *, image_url: str | None, image_b64: str | None, policy: ImagePolicy, base_dir: Path | None = None
) -> bytes:
    """The offer's image bytes, inline or fetched under ``policy``, or :class:`ImageUnavailableError`."""
    if image_b64:
        if len(image_b64) > 4 * (policy.max_bytes // 3 + 1):
            raise ImageUnavailableError("too_large", f"more than {policy.max_bytes} bytes")
        try:
            data = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ImageUnavailableError("undecodable", "the inline image is not valid base64") from None
        if len(data) > policy.max_bytes:
            raise ImageUnavailableError("too_large", f"more than {policy.max_bytes} bytes")
    elif image_url:
        data = fetch_image_bytes(image_url, policy=policy, base_dir=base_dir)
    else:
        raise ImageUnavailableError("absent", "the offer has no image")
    return data
