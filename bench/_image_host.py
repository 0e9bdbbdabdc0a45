"""A remote image host for the benchmarks: serves image files over HTTP/1.1 (kept-alive
connections) on 127.0.0.1, each answer after a fixed delay.

It runs in a process of its own, on asyncio: a request costs it some tens of microseconds of CPU
and no thread, so on a small machine the host takes little from the node it serves, and the
benchmark reports what it does take (its process CPU time). Started by :class:`SlowImageHost`;
run alone for a look:

    .venv/bin/python bench/_image_host.py --files LIST.json --delay-ms 30   # prints its port
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_MAX_HEAD = 16_384


class SlowImageHost:
    """The host's process, serving ``files`` as ``/0.jpg``, ``/1.jpg``, … (by position; a missing
    file answers 404), each answer ``delay_s`` after its request. :attr:`base` is its URL and
    :attr:`pid` its process, whose CPU time the benchmark reads."""

    def __init__(self, files: list[Path], delay_s: float):
        descriptor, listing = tempfile.mkstemp(suffix=".json")
        with open(descriptor, "w") as handle:
            json.dump([str(file) for file in files], handle)
        self._listing = Path(listing)
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--files", listing, "--delay-ms", str(delay_s * 1000.0)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._process.stdout.readline() if self._process.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the image host did not start (it said {line!r})")
        self.base = f"http://127.0.0.1:{int(line)}"
        self.pid = self._process.pid

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._listing.unlink(missing_ok=True)


def _answers(files: list[str]) -> dict[bytes, bytes]:
    answers = {}
    for number, name in enumerate(files):
        path = Path(name)
        if path.is_file():
            body = path.read_bytes()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
            answers[f"/{number}.jpg".encode()] = head.encode() + body
    return answers


async def _serve(answers: dict[bytes, bytes], delay_s: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # one request at a time per connection, as HTTP/1.1 clients send them
                head = await reader.readuntil(b"\r\n\r\n")
                if len(head) > _MAX_HEAD:
                    break
                parts = head.split(b"\r\n", 1)[0].split(b" ")
                await asyncio.sleep(delay_s)
                writer.write(answers.get(parts[1], _NOT_FOUND) if len(parts) == 3 else _NOT_FOUND)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0, backlog=1024, limit=_MAX_HEAD)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=Path, required=True, help="JSON list of the image files, in URL order")
    parser.add_argument("--delay-ms", type=float, default=30.0, help="delay before each answer (default 30)")
    args = parser.parse_args()
    answers = _answers(json.loads(args.files.read_text()))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(answers, args.delay_ms / 1000.0))


if __name__ == "__main__":
    main()
