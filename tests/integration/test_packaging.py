"""The package as users get it: a wheel installed into a fresh venv without the train extra, the
documentation site built strictly, the README within its bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from catstream.demo import start_node, stop_node
from core.offer_files import offers_from_frame, read_offer_file
from producers.publish import publish_offers
from tests.conftest import read_predictions

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run(*command: str, cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        command,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A venv holding the wheel built from this checkout and its serving dependencies only."""
    root = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO))
    (wheel,) = (root / "dist").glob("catstream-*.whl")
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "requirements.lock"), str(wheel))
    return python


def test_the_wheel_installs_without_torch_and_finds_its_dictionaries(serving_venv, tmp_path):
    probe = (
        "import importlib.util, json\n"
        "from dictionaries import DEFAULT_DIRECTORY\n"
        "print(json.dumps({'torch': importlib.util.find_spec('torch') is not None,\n"
        "                  'dictionaries': str(DEFAULT_DIRECTORY),\n"
        "                  'files': sorted(p.name for p in DEFAULT_DIRECTORY.iterdir())}))\n"
    )
    found = json.loads(run(str(serving_venv), "-c", probe, cwd=tmp_path).stdout)
    assert not found["torch"]
    assert "site-packages" in found["dictionaries"]  # the installed copy, not this checkout
    assert {"ambiguous_terms.tsv", "category_exclusions.tsv"} <= set(found["files"])
    assert "--preprocess-workers" in run(str(serving_venv), "-m", "catstream", "run", "--help", cwd=tmp_path).stdout


def test_the_installed_wheel_serves_a_bundle(serving_venv, bundle, marketplace, stream_settings, tmp_path):
    node = start_node(bundle, stream_settings, log_path=tmp_path / "node.log", workers=1, python=str(serving_venv))
    try:
        offers = list(offers_from_frame(read_offer_file(marketplace).head(40)))
        publish_offers(offers, stream_settings)
        predictions = read_predictions(stream_settings, {offer.offer_id for offer in offers})
    finally:
        code = stop_node(node)
    assert {p["offer_id"] for p in predictions} == {offer.offer_id for offer in offers}
    assert code == 0, (tmp_path / "node.log").read_text()[-3000:]


def test_the_documentation_site_builds_strictly(tmp_path):
    done = run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"), timeout=300)
    assert (tmp_path / "site" / "training" / "index.html").is_file(), done.stderr
    assert "dictionary directory" in (tmp_path / "site" / "training" / "index.html").read_text()


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    opening = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert [line.split()[:2] for line in opening] == [["make", "demo"], ["make", "test"]]
