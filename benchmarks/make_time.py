"""How long the README's set-up and test commands take here, for the docs to quote.

Usage: python benchmarks/make_time.py setup [--json PATH]   # make setup on a fresh clone, empty model cache, then again
       python benchmarks/make_time.py test  [--json PATH]   # make test in this checkout (after set-up)

``setup`` clones this checkout's last commit into a temporary folder and runs ``make setup`` there with nothing
cached (XDG_CACHE_HOME in the same folder: pip's cache and the model cache start empty; packages come from wherever
pip is configured to take them), then a second time (it only checks the cache): setup_fresh_minutes,
setup_again_seconds. ``test`` runs ``make test`` (which first runs ``make setup``: here that only checks) with a
JUnit XML report: test_minutes, tests_passed, tests_skipped, tests_skipped_gpu (those skipped for want of a GPU),
tests_failed. --json adds the figures to PATH (the other command's stay), each with the CPU and cores it ran on
(setup_cpu, setup_cores, test_cpu, test_cores).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from modelship.bench import write_figures
from modelship.machine import cores, kernel_facts

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list, cwd: Path, env: dict | None = None) -> float:
    start = time.monotonic()
    subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, check=True)
    return time.monotonic() - start


def setup() -> dict:
    with tempfile.TemporaryDirectory(prefix="modelship-setup-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {"XDG_CACHE_HOME": str(Path(tmp) / "cache")}
        fresh = timed(["make", "setup"], clone, env)
        again = timed(["make", "setup"], clone, env)
    return {"setup_fresh_minutes": fresh / 60, "setup_again_seconds": again}


def test() -> dict:
    with tempfile.TemporaryDirectory(prefix="modelship-test-") as tmp:
        junit = Path(tmp) / "junit.xml"
        addopts = f"{os.environ.get('PYTEST_ADDOPTS', '')} --junitxml={junit}".strip()
        start = time.monotonic()
        code = subprocess.run(["make", "test"], cwd=ROOT, env={**os.environ, "PYTEST_ADDOPTS": addopts}).returncode
        minutes = (time.monotonic() - start) / 60
        if code != 0 or not junit.is_file():
            sys.exit(f"make test failed (exit {code}): no figures written")
        suite = ET.parse(junit).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skips = [s.get("message", "") for s in suite.iter("skipped")]
    failed = counts["failures"] + counts["errors"]
    return {"test_minutes": minutes, "tests_passed": counts["tests"] - counts["skipped"] - failed,
            "tests_skipped": counts["skipped"], "tests_failed": failed,
            "tests_skipped_gpu": sum("GPU" in m or "CUDA" in m for m in skips)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("setup", "test"))
    ap.add_argument("--json", help="add the figures to this file")
    args = ap.parse_args()
    figures = setup() if args.what == "setup" else test()
    figures.update({f"{args.what}_cpu": kernel_facts()["cpu"], f"{args.what}_cores": cores()})
    print(json.dumps(figures, indent=1))
    if args.json:
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        write_figures(args.json, {**old, **figures})


if __name__ == "__main__":
    main()
