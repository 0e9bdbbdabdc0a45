"""What a node leaves behind and how it exits: stale shared-memory files of a killed node are
removed by the next one, no semaphores are created, the broker command stops its broker, and a
process killed at drain makes the exit code non-zero."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.offer_files import offers_from_frame, read_offer_file
from producers.publish import publish_offers
from tests.conftest import read_predictions

pytestmark = pytest.mark.integration


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_killed_nodes_files_are_removed_by_the_next_and_no_semaphores_are_made(
    marketplace, stream_settings, start_node, tmp_path
):
    queue_dir = tmp_path / "shm"
    queue_dir.mkdir()
    semaphores = set(Path("/dev/shm").glob("sem.*"))
    env = {"CATSTREAM_QUEUE_DIR": str(queue_dir), "CATSTREAM_DRAIN_TIMEOUT_S": "3"}
    first = start_node(workers=1, env=env)
    children = set(first.worker_pids().values())
    wait_for(lambda: len(list(queue_dir.glob("catstream-*"))) == 2, 60, "the first node's queue and board")
    children |= {int(pid) for pid in re.findall(r"inference pid=(\d+)", first.log())}
    assert len(children) == 2
    left = set(queue_dir.glob("catstream-*"))
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    # Orphans notice the supervisor is gone and leave within the drain bound: none lingers.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in children), 20, "orphans to exit")
    assert set(queue_dir.glob("catstream-*")) == left  # SIGKILL: nothing cleaned up

    second = start_node(workers=1, env=env)
    offers = list(offers_from_frame(read_offer_file(marketplace).head(30)))
    publish_offers(offers, stream_settings, progress=False)
    read_predictions(stream_settings, {o.offer_id for o in offers})
    assert not left & set(queue_dir.glob("catstream-*")), "the killed node's files are still there"
    assert all(f"removed {path}" in second.log() for path in left)
    assert second.stop() == 0
    assert not list(queue_dir.glob("catstream-*"))  # the orderly stop removes its own
    assert set(Path("/dev/shm").glob("sem.*")) <= semaphores  # no POSIX semaphore was created


def test_a_worker_killed_at_drain_makes_the_exit_code_non_zero(marketplace, stream_settings, start_node):
    node = start_node(workers=1, env={"CATSTREAM_DRAIN_TIMEOUT_S": "2"})
    (worker,) = node.worker_pids().values()
    offers = list(offers_from_frame(read_offer_file(marketplace).head(20)))
    publish_offers(offers, stream_settings, progress=False)
    read_predictions(stream_settings, {o.offer_id for o in offers})
    os.kill(worker, signal.SIGSTOP)  # it will not answer SIGTERM in time
    try:
        code = node.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    assert code != 0
    assert re.search(r"preprocess-0 pid=\d+ did not stop in time; killing it", node.log())


def test_the_broker_command_stops_its_broker_on_sigterm(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "catstream", "broker", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = process.stdout.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    time.sleep(0.5)
    with pytest.raises(OSError):  # nothing holds the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_a_stop_signal_landing_at_any_line_of_the_supervisors_wait_is_taken(bundle, stream_settings):
    """A signal handler runs on the main thread between two bytecodes. One that took a lock the
    interrupted code held (Event.set() inside Event.wait()) hung the supervisor for good: it
    ignored SIGTERM until killed. Here the handler runs at every line of the wait, in a thread
    that must come back."""
    from catstream.node import Node

    node = Node(stream_settings, str(bundle))
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    node.install_signal_handlers()
    handler = signal.getsignal(signal.SIGTERM)
    for signum, previous in saved.items():
        signal.signal(signum, previous)
    answers = []

    def every_line(frame, event, _arg):
        if event == "line":
            handler(signal.SIGTERM, frame)
        return every_line

    def wait_once():
        sys.settrace(every_line)
        try:
            answers.append(node._stopped_after(0.05))
        finally:
            sys.settrace(None)

    waiter = threading.Thread(target=wait_once, daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive(), "the stop handler blocked the supervisor's wait"
    assert answers == [True]
