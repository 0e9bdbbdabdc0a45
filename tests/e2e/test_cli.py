"""The ``catstream`` command as a user runs it: real subprocesses, real broker, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import read_predictions

pytestmark = pytest.mark.integration

SUBCOMMANDS = (
    "broker",
    "synth",
    "train",
    "evaluate",
    "audit",
    "ablation",
    "tune",
    "train-embedder",
    "evaluate-retrieval",
    "history",
    "mine-exclusions",
    "promote",
    "produce",
    "run",
    "index",
    "query",
    "demo",
)


def catstream(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catstream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_help_documents_every_subcommand_and_env_fallbacks():
    top = catstream("--help")
    assert top.returncode == 0
    for name in SUBCOMMANDS:
        assert name in top.stdout
        assert catstream(name, "--help").returncode == 0
    run_help = catstream("run", "--help").stdout
    assert "CATSTREAM_BOOTSTRAP_SERVERS" in run_help and "CATSTREAM_PREPROCESS_WORKERS" in run_help


def test_synth_is_deterministic_per_seed(tmp_path):
    for name in ("a", "b"):
        assert catstream("synth", "--out", str(tmp_path / name), "--offers", "40", "--seed", "3").returncode == 0
    first, second = (tmp_path / "a" / "offers.csv").read_bytes(), (tmp_path / "b" / "offers.csv").read_bytes()
    assert first == second
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert images and all(p.read_bytes() == (tmp_path / "b" / "images" / p.name).read_bytes() for p in images)
    text = first.decode()
    assert any("\uac00" <= ch <= "\ud7a3" for ch in text)  # Korean titles
    assert catstream("synth", "--out", str(tmp_path / "c"), "--offers", "40", "--seed", "4").returncode == 0
    assert (tmp_path / "c" / "offers.csv").read_bytes() != first


def test_bad_cli_input_gives_a_readable_error(tmp_path, marketplace):
    missing = catstream("train", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    wrong = catstream("train", "--data", str(marketplace), "--out", str(tmp_path / "m"), "--label-column", "nope")
    assert wrong.returncode == 2 and "missing column(s) nope" in wrong.stderr
    bad_threshold = catstream(
        "evaluate", "--model", str(tmp_path / "m"), "--data", str(marketplace), "--threshold", "1.5"
    )
    assert bad_threshold.returncode == 2 and "1.5 is outside [0, 1]" in bad_threshold.stderr
    no_model = catstream("run", "--model", str(tmp_path / "absent"), "--bootstrap-servers", "127.0.0.1:1")
    assert no_model.returncode == 2 and "Traceback" not in no_model.stderr


def test_audit_command_writes_the_report_and_rejects_unknown_categories(tmp_path, bundle, marketplace):
    out = tmp_path / "audit"
    done = catstream(
        "audit",
        "--model",
        str(bundle),
        "--data",
        str(marketplace),
        "--out",
        str(out),
        "--worst",
        "2",
        "--samples",
        "2",
        "--max-evals",
        "100",
        "--no-tracking",
    )
    assert done.returncode == 0, done.stderr
    assert "audited" in done.stdout and "errors explained" in done.stdout
    assert {p.name for p in out.iterdir()} == {"audit.html", "audit.json", "candidates"}
    assert (out / "candidates" / "category_exclusions.tsv").is_file()
    unknown = catstream(
        "audit",
        "--model",
        str(bundle),
        "--data",
        str(marketplace),
        "--out",
        str(out),
        "--category",
        "Nope > Never",
        "--no-tracking",
    )
    assert unknown.returncode == 2 and "not categories of this model: Nope > Never" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_produce_command_feeds_the_running_node(marketplace, stream_settings, start_node):
    node = start_node(workers=1)
    env = {"CATSTREAM_OFFERS_TOPIC": stream_settings.offers_topic}
    result = catstream(
        "produce",
        "--data",
        str(marketplace),
        "--limit",
        "80",
        "--rate",
        "400",
        "--bootstrap-servers",
        stream_settings.bootstrap_servers,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "published 80 offers" in result.stdout
    import pandas as pd

    ids = set(pd.read_csv(marketplace, dtype=str)["offer_id"].head(80))
    assert {p["offer_id"] for p in read_predictions(stream_settings, ids)} == ids
    assert node.stop() == 0


def test_demo_runs_the_whole_chain_and_leaves_nothing_behind(tmp_path):
    before = set(Path("/dev/shm").glob("catstream-queue-*"))
    result = catstream(
        "demo", "--out", str(tmp_path / "demo"), "--offers", "250", "--train-offers", "800", "--image-size", "64"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["offers_categorized"] == 250
    assert summary["dead_lettered"] == 5
    assert summary["node_exit_code"] == 0
    assert summary["accuracy_top1"] > 0.8
    for key in ("offers_per_second", "latency_end_to_end_ms", "latency_in_node_ms", "uncertain_rate"):
        assert key in summary and "offers/s" in result.stdout
    assert 0.0 <= summary["uncertain_with_parent_rate"] <= summary["uncertain_rate"]
    assert set(Path("/dev/shm").glob("catstream-queue-*")) == before  # queue file removed
