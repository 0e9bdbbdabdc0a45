"""The layers point down only: entry points → stages → core, checked on every import statement
of every module (function-level imports included: one that dodges a cycle is still a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE, ENTRY = "core", "catstream"
STAGES = ("producers", "preprocess_workers", "gpu_workers", "training", "retrieval")
DATA = "dictionaries"


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of the repository that ``path`` imports, wherever the import stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & {CORE, ENTRY, DATA, *STAGES}


def modules_of(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_every_layer_is_scanned():
    for package in (CORE, ENTRY, *STAGES):
        assert modules_of(package), package


@pytest.mark.parametrize("path", modules_of(CORE), ids=lambda p: p.name)
def test_the_core_imports_no_stage_and_no_entry_point(path):
    assert imported_packages(path) <= {CORE}, path


@pytest.mark.parametrize("path", [p for s in STAGES for p in modules_of(s)], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_stage_imports_the_core_and_itself_only(path):
    own = path.relative_to(REPO).parts[0]
    assert imported_packages(path) <= {CORE, DATA, own}, path


def test_the_check_catches_a_back_arrow(tmp_path):
    module = tmp_path / "sneaky.py"
    module.write_text("def helper():\n    from training.train import train_bundle\n    return train_bundle\n")
    assert imported_packages(module) == {"training"}


def test_serving_imports_neither_torch_nor_training():
    """``catstream run`` in a fresh interpreter: its parser, the node supervisor and both worker
    stages it spawns, the scorer and the registry lookup."""
    probe = (
        "import sys\n"
        "import catstream.cli as cli\n"
        "args = cli._build_parser(cli._command_of(['run', '--model', 'm'])).parse_args(['run', '--model', 'm'])\n"
        "import catstream.node, core.broker, core.registry, core.scoring\n"
        "import preprocess_workers.worker, gpu_workers.worker\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'training', 'mlflow')]\n"
        "print(','.join(sorted(loaded)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


@pytest.mark.parametrize("module", ["training.evaluate", "training.audit"])
def test_evaluate_and_audit_do_not_load_torch(module):
    """They score the served ONNX model; only training needs PyTorch."""
    probe = f"import sys\nimport {module}\nprint('torch' in sys.modules)\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
