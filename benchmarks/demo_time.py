"""How long `make demo` took, read from its report (runs/demo/report.json): the whole run and each stage, in
seconds, for the docs to quote.

Usage: python benchmarks/demo_time.py [runs/demo] [--json PATH]
--json writes total_minutes, text_minutes (every stage of the built-in text model), stage_seconds[NAME] for each
step, variants (how many were served), cpu (where it ran), and the built-in text model's held-out accuracy and
majority-class baseline as this run built it (text_accuracy, text_majority_baseline).
"""

import argparse
import json
from pathlib import Path

from modelship.bench import write_figures
from modelship.machine import kernel_facts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    report = json.loads((Path(args.run) / "report.json").read_text())
    steps = {s["name"]: s["seconds"] for s in report["steps"]}
    text = sum(v for k, v in steps.items() if "text" in k)
    rows = {r["variant"]: r for r in report["variants"]}
    figures = {"total_minutes": sum(steps.values()) / 60, "text_minutes": text / 60,
               "text_accuracy": (rows.get("text-torch") or {}).get("accuracy"),
               "text_majority_baseline": (rows.get("text-torch") or {}).get("majority_baseline"),
               "variants": len(report["loadtests"]), "passed": report["passed"], "cpu": kernel_facts()["cpu"],
               **{f"stage_seconds[{k}]": v for k, v in steps.items()}}
    for k, v in steps.items():
        print(f"  {k:32s} {v:8.1f} s")
    print(f"make demo: {figures['total_minutes']:.1f} minutes ({figures['text_minutes']:.1f} for the text model), "
          f"{figures['variants']} variants load-tested, passed: {report['passed']}")
    write_figures(args.json, figures)


if __name__ == "__main__":
    main()
