"""``make mutants``' verdict: every mutant of the verdict code that the fast tests (tests/test_verdicts.py) let
survive must be one tests/equivalent_mutants.toml explains as equivalent (same behaviour for every input the code
can get); prints the score and exits 1 on any survivor left unexplained. Run after ``mutmut run``."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mutmut(*args) -> str:
    return subprocess.run([str(Path(sys.executable).with_name("mutmut")), *args], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout


def statuses() -> dict[str, str]:
    found = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+__mutmut_\d+): (.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def added_lines(name: str) -> list[str]:
    return [l[1:].strip() for l in mutmut("show", name).splitlines() if l.startswith("+") and not l.startswith("+++")]


def function_of(name: str) -> str:
    return name.rsplit("__mutmut_", 1)[0]


def explained(name: str, rules: list[dict]) -> dict | None:
    """The rule that explains mutant ``name``: same function, and its mutated line exactly (stripped)."""
    lines = None
    for rule in rules:
        if function_of(name) != rule["function"]:
            continue
        lines = added_lines(name) if lines is None else lines
        if rule["mutated"].strip() in lines:
            return rule
    return None


def main() -> int:
    config = tomllib.loads((ROOT / "tests" / "equivalent_mutants.toml").read_text())
    rules, verdict = config["equivalent"], set(config["verdict_functions"])
    found = statuses()
    survived = sorted(n for n, s in found.items() if s == "survived")
    killed = sum(1 for s in found.values() if s in ("killed", "timeout", "segfault"))
    untested = [n for n, s in found.items() if s == "no tests"]
    missed = sorted(n for n in untested if function_of(n) in verdict)  # verdict code no fast test runs
    unexplained = [n for n in survived if explained(n, rules) is None]
    other = sorted(n for n, s in found.items() if s not in ("killed", "timeout", "segfault", "survived", "no tests"))
    equivalent = len(survived) - len(unexplained)
    judged = killed + len(unexplained) + len(missed)
    print(f"mutants: {len(found)}; in code no fast test runs (promote's transaction, the shadow's thread: tested "
          f"with servers): {len(untested) - len(missed)}; killed {killed}; equivalent (explained in "
          f"tests/equivalent_mutants.toml) {equivalent}; survived {len(unexplained)}; verdict code untested "
          f"{len(missed)}; other {len(other)}")
    print(f"score: {killed}/{judged} non-equivalent mutants of the verdict code killed "
          f"({100 * killed / max(judged, 1):.1f} %)")
    for n in unexplained + missed + other:
        print(f"\n{found[n]}: {n}\n{mutmut('show', n)}")
    return 1 if unexplained or missed or other else 0


if __name__ == "__main__":
    sys.exit(main())
