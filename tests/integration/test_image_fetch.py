"""Image URLs from messages are untrusted: real servers on loopback that stall, drip, redirect
elsewhere, or answer what no image host would; the fetch must end within its deadline with a
status, never leak what a server sent, and never connect where the policy forbids."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable

import pytest
from PIL import Image

from core.image_fetcher import ImageFetcher, is_remote
from core.images import ImagePolicy, ImageUnavailableError, fetch_image_bytes, load_image

pytestmark = pytest.mark.integration

LOOPBACK = ImagePolicy(allow_private=True, timeout_s=1.5)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """A TCP server on loopback whose ``answer(connection)`` does whatever the test needs; it
    counts the connections it accepted."""

    def __init__(self, answer: Callable[[socket.socket], None]):
        self.answer = answer
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        try:
            connection.recv(65536)  # the request
            self.answer(connection)
        except OSError:
            pass
        finally:
            connection.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture()
def serve():
    servers: list[Server] = []

    def start(answer: Callable[[socket.socket], None]) -> Server:
        servers.append(Server(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def http_response(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n").encode() + body


def fetch(url: str, policy: ImagePolicy = LOOPBACK) -> tuple[str | None, float]:
    """``(status, seconds)``: None for a used image."""
    started = time.monotonic()
    try:
        load_image(image_url=url, image_b64=None, size=16, policy=policy)
        return None, time.monotonic() - started
    except ImageUnavailableError as error:
        assert error.status and error.detail
        return error.status, time.monotonic() - started


def test_an_image_host_is_fetched_when_the_policy_allows_it(serve):
    server = serve(lambda c: c.sendall(http_response(png(), headers="Content-Type: image/png\r\n")))
    assert fetch(f"{server.url}/x.png") == (None, pytest.approx(0, abs=1.0))


def test_loopback_is_refused_by_default_and_no_connection_is_made(serve):
    server = serve(lambda c: c.sendall(http_response(png())))
    for url in (
        f"{server.url}/x.png",
        f"http://localhost:{server.port}/x.png",
        f"http://[::ffff:127.0.0.1]:{server.port}/",
    ):
        status, _ = fetch(url, ImagePolicy())
        assert status == "refused", url
    assert server.connections == 0


def test_a_host_off_the_allowlist_is_refused(serve):
    server = serve(lambda c: c.sendall(http_response(png())))
    allowed = ImagePolicy(allow_private=True, allowed_hosts=("cdn.example.com", "*.images.example.com"))
    assert fetch(f"{server.url}/x.png", allowed)[0] == "refused"
    assert server.connections == 0
    assert fetch(f"{server.url}/x.png", ImagePolicy(allow_private=True, allowed_hosts=("127.0.0.1",)))[0] is None


def test_a_server_that_never_answers_is_cut_off_at_the_deadline(serve):
    server = serve(lambda c: time.sleep(30))
    status, seconds = fetch(f"{server.url}/x.png")
    assert status == "unreachable" and 1.4 < seconds < 2.5


@pytest.mark.parametrize("drip", ["headers", "body"])
def test_a_server_that_drips_is_cut_off_at_the_deadline_not_per_read(serve, drip):
    def answer(connection: socket.socket) -> None:
        whole = http_response(png())
        start = whole.index(b"\r\n\r\n") + 4 if drip == "body" else 0
        connection.sendall(whole[:start])
        for byte in whole[start:]:
            connection.sendall(bytes([byte]))
            time.sleep(0.2)  # each read gets a byte well within any per-read timeout

    server = serve(answer)
    status, seconds = fetch(f"{server.url}/x.png")
    assert status == "unreachable" and 1.4 < seconds < 2.5


def test_a_redirect_to_another_scheme_is_refused_before_connecting(serve):
    ftp = serve(lambda c: c.sendall(b"220 ready\r\n"))
    server = serve(lambda c: c.sendall(http_response(b"", "302 Found", f"Location: ftp://127.0.0.1:{ftp.port}/x\r\n")))
    assert fetch(f"{server.url}/x.png")[0] == "refused"
    assert ftp.connections == 0


def test_redirects_are_followed_to_http_only_and_only_so_often(serve):
    image = serve(lambda c: c.sendall(http_response(png())))
    hop = serve(lambda c: c.sendall(http_response(b"", "301 Moved", f"Location: {image.url}/x.png\r\n")))
    assert fetch(f"{hop.url}/x.png")[0] is None
    loop: list[Server] = []
    loop.append(serve(lambda c: c.sendall(http_response(b"", "302 Found", f"Location: {loop[0].url}/again\r\n"))))
    status, _ = fetch(f"{loop[0].url}/x.png", ImagePolicy(allow_private=True, max_redirects=2))
    assert status == "unreachable" and loop[0].connections == 3


def test_every_redirect_hop_is_held_to_the_policy(serve):
    elsewhere = serve(lambda c: c.sendall(http_response(png())))
    hop = serve(
        lambda c: c.sendall(http_response(b"", "302 Found", f"Location: http://localhost:{elsewhere.port}/x\r\n"))
    )
    only_the_first = ImagePolicy(allow_private=True, allowed_hosts=("127.0.0.1",))
    assert fetch(f"{hop.url}/x.png", only_the_first)[0] == "refused"
    assert elsewhere.connections == 0


@pytest.mark.parametrize(
    "banner",
    [
        b"SSH-2.0-OpenSSH_9.6 internal-bastion\r\n",
        b"+OK redis-secret-banner\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nshort-secret-body",
    ],
)
def test_what_an_internal_service_answers_never_reaches_the_reason(serve, banner):
    server = serve(lambda c: c.sendall(banner))
    with pytest.raises(ImageUnavailableError) as info:
        load_image(image_url=f"{server.url}/x.png", image_b64=None, size=16, policy=LOOPBACK)
    assert info.value.status in ("unreachable", "undecodable")
    for secret in (b"OpenSSH", b"bastion", b"redis", b"secret"):
        assert secret.decode() not in str(info.value)


def test_an_error_status_or_an_oversized_body_is_not_read(serve):
    assert fetch(f"{serve(lambda c: c.sendall(http_response(b'no', '404 Not Found'))).url}/x")[0] == "unreachable"
    big = serve(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"))
    status, seconds = fetch(f"{big.url}/x", ImagePolicy(allow_private=True, max_bytes=1000))
    assert status == "too_large" and seconds < 1.0


def test_a_slow_host_holds_up_only_its_own_fetches_and_never_more_than_its_share(serve):
    """The worker's concurrent fetcher: eight fetches to a host that answers after 0.8 s, then
    eight to a fast one. The fast ones are all back while the slow host still works through its
    line, at most two at a time; every fetch gives the image's bytes or a status."""
    image = png()
    running, most = 0, 0
    lock = threading.Lock()

    def slow(connection: socket.socket) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.8)
        with lock:
            running -= 1
        connection.sendall(http_response(image))

    slow_host, fast_host = serve(slow), serve(lambda c: c.sendall(http_response(image)))
    fetcher = ImageFetcher(LOOPBACK, threads=4, per_host=2)
    started = time.monotonic()
    for n in range(8):
        fetcher.submit(("slow", n), f"{slow_host.url}/{n}.png")
    for n in range(8):
        fetcher.submit(("fast", n), f"{fast_host.url}/{n}.png")
    fetcher.submit(("refused", 0), "ftp://127.0.0.1/x.png")
    done: dict[tuple[str, int], tuple[object, float]] = {}
    while len(done) < 17 and time.monotonic() - started < 10:
        for key, result in fetcher.completed():
            done[key] = (result, time.monotonic() - started)
        time.sleep(0.01)
    fetcher.close()
    assert len(done) == 17 and fetcher.pending == 0
    assert all(done[("fast", n)][0] == image for n in range(8)) and all(done[("slow", n)][0] == image for n in range(8))
    assert max(done[("fast", n)][1] for n in range(8)) < 0.6  # before the first slow answer
    slowest = max(done[("slow", n)][1] for n in range(8))
    assert 3.0 < slowest < 6.0  # four rounds of 0.8 s, two at a time
    assert most == 2 and slow_host.connections == 8
    assert (
        isinstance(done[("refused", 0)][0], ImageUnavailableError)
        and done[("refused", 0)][0].status == "unsupported_url"
    )
    assert not is_remote("/etc/passwd") and not is_remote(None) and is_remote("HTTPS://cdn.example.com/a.jpg")


def test_a_host_that_keeps_connections_alive_serves_many_images_on_one(serve):
    """Keep-alive: one connection for five images of the same host; a host that drops a kept
    connection without a word is answered on a fresh one, and one that says close gets a fresh
    connection each time. Every fetch gives the whole image."""
    image = png()
    keep_alive_response = f"HTTP/1.1 200 OK\r\nContent-Length: {len(image)}\r\n\r\n".encode() + image

    def keep_alive(connection: socket.socket) -> None:
        connection.sendall(keep_alive_response)  # the first request was read by the server
        while connection.recv(65536):
            connection.sendall(keep_alive_response)

    def drops_silently(connection: socket.socket) -> None:
        connection.sendall(keep_alive_response)  # says nothing of closing, then closes

    kept, dropping = serve(keep_alive), serve(drops_silently)
    closing = serve(lambda c: c.sendall(http_response(image)))
    for server in (kept, dropping, closing):
        for n in range(5):
            assert fetch_image_bytes(f"{server.url}/{n}.png", policy=LOOPBACK) == image
            time.sleep(0.05)  # the dropping host has closed its side by the next fetch
    assert (kept.connections, dropping.connections, closing.connections) == (1, 5, 5)
