"""modelship in a user's own CI, tried as a user would: modelship built as a wheel (`pip wheel`) and installed into a
new virtual environment outside this repository; a small user project (a .pt2 model, its pyproject with
[tool.modelship] and a test file using the plugin's fixture and helpers, both taken from the docs (docs/how-to/ci.md) as written);
then the steps of examples/ci/github-actions.yml and the commands of examples/ci/gitlab-ci.yml run in order in a
fresh folder, and the JUnit file checked case by case. A label-shifted variant makes the job fail with that gate's
message in exactly its JUnit cases.

The new environment reaches the project's already installed dependencies (torch, onnxruntime, TorchServe, ...)
through a .pth file, so nothing is downloaded; modelship itself comes only from the wheel (no editable install is
visible there: the test asserts where it imports from)."""

import importlib.metadata
import json
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml

# each test runs a whole user pytest session with two TorchServes and Locust: with the other test workers on two cores
# that oversubscribes the machine (a 1-user load generator froze for seconds and measured nothing), so these run with
# `pytest -m slow` (about 5 minutes on their own), as the long soak does
pytestmark = [pytest.mark.serve, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "docs" / "how-to" / "ci.md"  # the page holding the user project's files
GATES = ("parity", "served agreement", "failures", "p95 SLO")


def readme_block(first_line: str) -> str:
    """The docs code block whose first line is ``first_line`` (a file name comment)."""
    blocks = re.findall(r"```\w*\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if b.startswith(first_line))


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory):
    """modelship's wheel installed into a new venv outside the repository."""
    base = tmp_path_factory.mktemp("user-env")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "wheels"), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    wheel = next((base / "wheels").glob("modelship-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True, timeout=300)
    site = next((base / "venv" / "lib").glob("python*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "project-deps.pth").write_text(deps + "\n")  # the dependencies, already installed; not modelship
    py = base / "venv" / "bin" / "python"
    # the new venv's own old setuptools would hide the newer one torch requires (and pip would go looking for it)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True, capture_output=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300,
                   capture_output=True)
    for dist in ("torchserve", "torch-model-archiver"):  # the console scripts pip makes when it installs them
        for ep in importlib.metadata.distribution(dist).entry_points:
            if ep.group == "console_scripts":
                module, func = ep.value.split(":")
                script = base / "venv" / "bin" / ep.name
                script.write_text(f"#!{py}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
                script.chmod(0o755)
    where = subprocess.run([str(py), "-c", "import modelship; print(modelship.__file__)"], capture_output=True,
                           text=True, check=True, cwd=base).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not this checkout
    return {"bin": base / "venv" / "bin", "wheel": wheel}


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A user's digits classifier as a torch.export program: an MLP trained here for a few seconds."""
    from modelship import data as datasets
    from modelship.manifest import TensorSpec

    torch.manual_seed(0)
    spec = [TensorSpec("pixels", "float32", ["batch", 1, 8, 8])]
    feed, y = datasets.load({"name": "digits"}, "train", spec)
    x, y = torch.from_numpy(feed["pixels"]), torch.from_numpy(y)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    folder = tmp_path_factory.mktemp("user-model")
    ep = torch.export.export(model.eval(), (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, folder / "model.pt2")
    return folder / "model.pt2"


def make_project(folder: Path, model: Path, extra_toml: str = "") -> Path:
    """The user project of the docs: model.pt2, its pyproject.toml and its tests, as written there."""
    (folder / "tests").mkdir(parents=True)
    (folder / "model.pt2").write_bytes(model.read_bytes())
    (folder / "pyproject.toml").write_text(readme_block("# pyproject.toml") + extra_toml)
    (folder / "tests" / "test_my_model.py").write_text(readme_block("# tests/test_my_model.py"))
    return folder


def run_steps(commands: list[str], cwd: Path, venv: dict, summary: Path | None = None) -> list:
    env = {"PATH": f"{venv['bin']}:/usr/local/bin:/usr/bin:/bin", "HOME": str(cwd), "MODELSHIP_PACKAGE":
           str(venv["wheel"]), "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    if summary is not None:
        env["GITHUB_STEP_SUMMARY"] = str(summary)
    done = []
    for cmd in commands:
        t0 = time.monotonic()
        p = subprocess.run(["bash", "-eo", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=900)
        done.append((cmd, p, round(time.monotonic() - t0, 1)))
        if p.returncode != 0:
            break
    return done


def github_commands() -> list[str]:
    workflow = yaml.safe_load((ROOT / "examples/ci/github-actions.yml").read_text())
    (job,) = workflow["jobs"].values()
    return [step["run"] for step in job["steps"] if "run" in step]  # `uses:` steps are the runner's set-up


def gitlab_commands() -> list[str]:
    (job,) = [j for j in yaml.safe_load((ROOT / "examples/ci/gitlab-ci.yml").read_text()).values() if "script" in j]
    return job["before_script"] + job["script"]


def cases(junit: Path) -> dict:
    """JUnit test cases by (classname, name): None when passed, else the failure message."""
    out = {}
    for tc in ET.parse(junit).getroot().iter("testcase"):
        failure = tc.find("failure")
        out[(tc.get("classname"), tc.get("name"))] = None if failure is None else failure.get("message") or ""
    return out


def gate_cases(found: dict) -> dict:
    return {(c.split(".")[-1], n): m for (c, n), m in found.items() if n in GATES}


def test_github_actions_example_runs_and_a_rerun_reuses_the_conversions(tmp_path, user_venv, user_model):
    project = make_project(tmp_path / "repo", user_model)
    summary = tmp_path / "summary.md"
    done = run_steps(github_commands(), project, user_venv, summary)
    for cmd, p, _ in done:
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    found = cases(project / "gates.xml")
    gates = gate_cases(found)
    assert set(gates) == {(v, g) for v in ("onnx", "int8-dynamic", "fp16") for g in GATES}  # one case per gate
    assert all(m is None for m in gates.values()), gates
    own = {n for (c, n) in found if n.startswith("test_")}  # the docs' test file ran in the same session
    assert own == {"test_the_onnx_export_keeps_its_answers", "test_served_answers_are_right_and_fast"}
    assert "modelship gates: 12 passed, 0 failed" in summary.read_text()
    assert (project / "modelship-gates" / "model" / "int8-dynamic" / "locust_u1.html").is_file()
    first = next(s for cmd, _, s in done if "--modelship" in cmd)

    # the same job again, nothing changed: the conversions come from the cache, only serving is measured again
    built = sorted(p.stat().st_mtime for p in (project / ".modelship-cache").rglob("model.onnx"))
    again = run_steps(["python -m pytest --modelship --junitxml=gates2.xml -p no:cacheprovider pyproject.toml"], project,
                      user_venv)  # the gates alone (the project's own tests are not collected from pyproject.toml)
    cmd, p, second = again[0]
    assert p.returncode == 0, p.stdout[-3000:]
    assert sorted(p.stat().st_mtime for p in (project / ".modelship-cache").rglob("model.onnx")) == built
    assert gate_cases(cases(project / "gates2.xml")) == gates
    (tmp_path / "times.json").write_text(json.dumps({"first_s": first, "cached_s": second}))
    print(f"the job's pytest step (own tests + 12 gates, converting): {first} s; the gates again, cached: {second} s")


def test_gitlab_ci_example_runs(tmp_path, user_venv, user_model):
    project = make_project(tmp_path / "repo", user_model)
    done = run_steps(gitlab_commands(), project, user_venv)
    for cmd, p, _ in done:
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    gates = gate_cases(cases(project / "gates.xml"))
    assert len(gates) == 12 and all(m is None for m in gates.values())


def test_a_label_shifted_variant_fails_exactly_its_gates(tmp_path, user_venv, user_model):
    """A candidate artifact whose classifier rows are rolled by one class: its parity and served-agreement cases
    fail with those gates' messages; every other case passes; the job exits non-zero."""
    import modelship as ms
    from conftest import label_shifted

    ms.export(user_model, tmp_path / "exported", task="classification", data="digits")
    shifted = label_shifted(tmp_path / "exported", tmp_path / "shifted").path
    project = make_project(tmp_path / "repo", user_model, f'candidates = {{shifted = "{shifted}"}}\n')
    done = run_steps(github_commands(), project, user_venv)
    cmd, p, _ = done[-1]
    assert "--modelship" in cmd and p.returncode == 1, f"{cmd}\n{p.stdout[-3000:]}"
    gates = gate_cases(cases(project / "gates.xml"))
    failed = {k: m for k, m in gates.items() if m is not None}
    assert set(failed) == {("shifted", "parity"), ("shifted", "served agreement")}, failed
    assert "top-1 agreement 0." in failed["shifted", "parity"] and "< 1" in failed["shifted", "parity"]
    assert failed["shifted", "served agreement"].startswith("users=1: agreement: 0.")
    assert all(m is None for k, m in gates.items() if k[0] != "shifted")
