"""The layers of the package, kept by import-linter (its contract in pyproject.toml): each layer imports only the
ones below it, so there is no import cycle, and e.g. serve/ never imports tune or pipeline. The check fails on a
cycle or an upward import added on purpose to a copy of the package."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def lint(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    """import-linter over the `modelship` package found in ``package_parent``, with the project's contract."""
    shutil.copy(ROOT / "pyproject.toml", cwd / "pyproject.toml")
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), str(cwd / "pyproject.toml"),
                           "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(package_parent)})


def test_the_package_keeps_its_layers(tmp_path):
    p = lint(ROOT, tmp_path)
    assert p.returncode == 0 and "modelship layers KEPT" in p.stdout, p.stdout + p.stderr
    assert "serving rooms KEPT" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("module,line,why", [
    ("serving/archive.py", "from ..tuning import Space", "modelship.serving is not allowed to import modelship.tuning"),
    ("manifest.py", "from .preprocess import carry",  # the cycle manifest -> preprocess -> models -> manifest
     "modelship.manifest is not allowed to import modelship.preprocess"),
    ("serving/handler.py", "from modelship.serving.lifecycle import start",  # a front reaching into the lifecycle
     "modelship.serving.handler is not allowed to import modelship.serving.lifecycle"),
    ("serving/state.py", "from .torchserve import TorchServe",  # the state below the client that reads it
     "modelship.serving.state is not allowed to import modelship.serving.torchserve"),
])
def test_an_upward_import_or_a_cycle_fails_the_check(tmp_path, module, line, why):
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "modelship", copy / "modelship", ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "modelship" / module
    target.write_text(target.read_text() + f"\n{line}  # added on purpose\n")
    p = lint(copy, tmp_path)
    assert p.returncode == 1 and "BROKEN" in p.stdout, p.stdout + p.stderr
    assert why in p.stdout
