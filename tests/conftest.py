"""Shared fixtures: a synthetic marketplace, a small trained bundle, the embedded broker, nodes."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import pytest

from catstream.demo import start_node as start_node_process
from core.broker import EmbeddedBroker
from core.kafka import ensure_topics, read_topic, wait_for_broker
from core.settings import Settings

TEST_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def marketplace(tmp_path_factory) -> Path:
    from producers.synthetic import write_marketplace

    return write_marketplace(tmp_path_factory.mktemp("marketplace"), offers=1500, seed=7, progress=False)


@pytest.fixture(scope="session")
def bundle(marketplace, tmp_path_factory) -> Path:
    from training.train import train_bundle

    out = tmp_path_factory.mktemp("bundle")
    train_bundle(marketplace, out, small_training_options(tmp_path_factory.mktemp("feature-cache")), progress=False)
    return out


@pytest.fixture(scope="session")
def embedded_bundle(marketplace, bundle, tmp_path_factory) -> Path:
    """A copy of the small bundle with a small embedder attached (one epoch, 16 dimensions)."""
    import shutil

    from training.embedder_export import write_embedded_model
    from training.embeddings import EmbedderOptions, fit_embedder, prepare_embedding_data

    copy = Path(shutil.copytree(bundle, tmp_path_factory.mktemp("embedded") / "bundle"))
    options = EmbedderOptions(dim=16, epochs=1, batch_pairs=64)
    data = prepare_embedding_data(marketplace, copy, options=options, progress=False)
    model, _ = fit_embedder(data, options, progress=False)
    differences = write_embedded_model(copy, model, copy / "embedder")
    assert max(differences.values()) < 1e-4
    return copy


def small_training_options(feature_cache: Path, **overrides):
    """Options that train on the 1500-offer marketplace in seconds."""
    from training.options import TrainOptions

    values = dict(
        label_columns=["category"],
        image_size=TEST_IMAGE_SIZE,
        epochs=5,
        vocab_size=4000,
        threads=2,
        cleaning="drop",
        cleaning_folds=2,
        season_balance=True,
        target_precision=0.98,
        feature_cache=str(feature_cache),
    )
    return TrainOptions(**(values | overrides))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as running:
        wait_for_broker(Settings(bootstrap_servers=running.bootstrap_servers))
        yield running


@pytest.fixture()
def stream_settings(broker) -> Settings:
    """Fresh topics and consumer group per test, so tests never see each other's messages."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        bootstrap_servers=broker.bootstrap_servers,
        offers_topic=f"offers-{run}",
        categorized_topic=f"offers.categorized-{run}",
        dead_letter_topic=f"offers.dlq-{run}",
        matched_topic=f"offers.matched-{run}",
        consumer_group=f"catstream-test-{run}",
        topic_partitions=4,
    )
    ensure_topics(settings)
    return settings


class NodeProcess:
    """``catstream run`` in a subprocess, as a user starts it."""

    def __init__(self, bundle: Path, settings: Settings, log_path: Path, workers: int, env: dict[str, str]):
        self.log_path = log_path
        self.process = start_node_process(bundle, settings, log_path=log_path, workers=workers, extra_env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self, timeout_s: float = 60.0) -> dict[int, int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = {int(i): int(pid) for i, pid in re.findall(r"preprocess-(\d+) pid=(\d+) started", self.log())}
            if pids:
                return pids
            time.sleep(0.2)
        raise TimeoutError(f"no worker started; log:\n{self.log()}")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=timeout_s)
        return self.process.returncode


@pytest.fixture()
def start_node(bundle, stream_settings, tmp_path):
    nodes: list[NodeProcess] = []

    def start(*, workers: int = 1, env: dict[str, str] | None = None, model: Path | None = None) -> NodeProcess:
        node = NodeProcess(model or bundle, stream_settings, tmp_path / f"node-{len(nodes)}.log", workers, env or {})
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()


def read_prediction_messages(settings: Settings, expected_ids: set[str], *, timeout_s: float = 120.0) -> list:
    """Every prediction message (with its Kafka timestamp and partition) until each expected
    offer_id has one (or the timeout)."""
    return read_topic(
        settings,
        settings.categorized_topic,
        timeout_s=timeout_s,
        until=lambda ms: expected_ids <= {m.key().decode() for m in ms},
    )


def read_predictions(settings: Settings, expected_ids: set[str], *, timeout_s: float = 120.0) -> list[dict]:
    """Every prediction until each expected offer_id has one (or the timeout)."""
    return [json.loads(m.value()) for m in read_prediction_messages(settings, expected_ids, timeout_s=timeout_s)]
