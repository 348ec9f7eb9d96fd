"""How the command line shows results: rich tables of parity records, load tests, tune trials, distillation and
in-process benchmarks (``modelship.cli`` prints them; the API returns the records)."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table


def _fmt(v, spec=".4g"):
    return "—" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def table(title: str, columns, rows, left=()) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def _yes(ok) -> str:
    return "[green]yes[/]" if ok else "[red]NO[/]"


def _batch(rec: dict | None) -> str:
    """The batch gate's verdict: the same answers alone and inside batches (NO: serve with batch size 1)."""
    if not rec or rec.get("passed") is None:
        return "—"
    return "[green]yes[/]" if rec["passed"] else "[yellow]NO: batch 1[/]"


def batch_lines(records: list[dict]) -> list[str]:
    """The batch gate's failures, one line each: what moved, by how much, in which batch."""
    from .batch_gate import failed

    return [f"[yellow]{Path(r['artifact']).name}: {failed(r)['message']}[/]" for r in records if failed(r)]


def parity_table(records: list[dict], title: str = "parity") -> Table:
    cols = ("artifact", "backend", "precision", "reference", "samples", "max_abs_diff", "top1_agreement", "accuracy",
            "reference_accuracy", "weak", "any batch", "passed")
    return table(title, cols, [(Path(r["artifact"]).name, r["backend"], r["precision"],
                                Path(r.get("reference") or "—").name, str(r["samples"]), _fmt(r["max_abs_diff"]),
                                _fmt(r["top1_agreement"]), _fmt(r["accuracy"]), _fmt(r["reference_accuracy"]),
                                f"{len(r['weak'])}{' (accepted)' if r.get('allow_weak') else ''}" if r.get("weak") else "—",
                                _batch(r.get("batch")), _yes(r["passed"])) for r in records], left=("artifact", "reference"))


def bench_table(rows: list[dict]) -> Table:
    return table("bench", ("artifact", "backend", "precision", "batch", "p50 ms", "p95 ms", "p99 ms", "items/s"),
                 [(Path(r["artifact"]).name, r["backend"], r["precision"], str(r["batch"]), f"{r['p50_ms']:.3f}",
                   f"{r['p95_ms']:.3f}", f"{r['p99_ms']:.3f}", f"{r['throughput_per_s']:.0f}") for r in rows],
                 left=("artifact",))


def until_parity_lines(found: dict) -> list[str]:
    """What ``quantize --until-parity`` kept in float, and what it cost."""
    kept = found["kept_in_float"]
    lines = [f"kept in float: {len(kept)} node(s)" + "".join(f"\n  {k['node']} ({k['why']})" for k in kept)]
    if found["latency"]:
        p = found["latency"]["p50_ms_batch1"]
        lines.append(f"latency (batch 1, p50): float {p['float']:.3f} ms, INT8 every node {p['int8_all_nodes']:.3f} ms, "
                     f"with these in float {p['int8_with_exclusions']:.3f} ms")
    return lines


def distill_table(art) -> Table:
    report = art.manifest.extra["distillation"]
    return table(f"distill → {art.path}", ("model", "arch", "parameters", "test accuracy", "p50 ms (torch, batch 1)"),
                 [(k.replace("_", " "), report[k]["arch"], f"{report[k]['parameters']:,}",
                   "—" if report[k]["accuracy"] is None else f"{report[k]['accuracy']:.4f}", f"{report[k]['p50_ms']:.3f}")
                  for k in ("teacher", "student", "student_without_distillation") if k in report],
                 left=("model",))


def loadtest_table(r: dict, model: str, workers: int = 0) -> Table:
    return table(f"loadtest {model} vs {Path(r['reference']).name}" + (f" ({workers} Locust workers)" if workers else ""),
                 ("users", "requests", "failures", "rps", "p50 ms", "p95 ms", "p99 ms", "checked", "mismatches",
                  "agreement", "max |Δ|", "p99 |Δ|", "passed"),
                 [(str(lv["users"]), str(lv["requests"]), str(lv["failures"]), _fmt(lv["rps"], ".1f"),
                   _fmt(lv["p50_ms"], ".2f"), _fmt(lv["p95_ms"], ".2f"), _fmt(lv["p99_ms"], ".2f"), str(lv["checked"]),
                   str(lv["mismatches"]), _fmt(lv["top1_agreement"]), _fmt(lv["max_abs_diff"], ".2g"),
                   _fmt(lv["p99_abs_diff"], ".2g"), _yes(lv["passed"])) for lv in r["levels"]])


def loadtest_lines(r: dict) -> list[str]:
    """A worker fault and its recovery, worker memory, and a serving machine other than the judging one."""
    lines = []
    for lv in r["levels"]:
        f, m = lv.get("fault"), lv.get("memory") or {}
        if f:
            lines.append(f"users={lv['users']}: worker {f.get('killed_pid')} killed at {f.get('killed_at_s')} s; "
                         f"recovered in {f.get('recovery_s')} s (replacement ready {f.get('worker_replaced_s')} s), "
                         f"answer after recovery correct: {f.get('answer_after_recovery_correct')}; {lv['failures']} of "
                         f"{lv['requests']} requests failed" + (f"; {f['error']}" if "error" in f else ""))
        if m.get("growth") is not None:
            lines.append(f"users={lv['users']}: worker memory {m['start_mb']:.0f} -> {m['end_mb']:.0f} MiB "
                         f"({m['growth']:+.1%}, peak {m['peak_mb']:.0f} MiB, {m['samples']} samples)")
    lines += [f"[yellow]served elsewhere than judged[/]: {line}; this load test's checked answers are the evidence "
              "for the serving machine" for line in r.get("kernels_differ") or []]
    return lines


def tune_table(r: dict) -> Table:
    front = {t["name"] for t in r["pareto"]}
    return table(f"tune: SLO p95 {r['slo_p95_ms']:g} ms, {r['cores']} cores",
                 ("configuration", "users", "rps", "p50 ms", "p95 ms", "p99 ms", "checked", "agreement", "max |Δ|",
                  "size MB", "result"),
                 [(t["name"], str(t["users"]), _fmt(t["rps"], ".1f"), _fmt(t["p50_ms"], ".2f"), _fmt(t["p95_ms"], ".2f"),
                   _fmt(t["p99_ms"], ".2f"), str(t["checked"]), _fmt(t["agreement"]), _fmt(t["max_abs_diff"], ".2g"),
                   _fmt(t["size_mb"], ".2f"), ("[green]Pareto[/]" if t["name"] in front else "[green]ok[/]")
                   if t["passed"] else f"[red]{escape(t['reason'][:60])}[/]") for t in r["trials"]],
                 left=("configuration", "result"))


def pipeline_table(report: dict) -> Table:
    from .report import COLS, cell

    return table(f"pipeline {report['model']}", [h for _, h, _ in COLS],
                 [[cell(r[k], f) for k, _, f in COLS] for r in report["variants"]])


def promote_table(r) -> Table:
    """What a promote judged: the current version beside the candidate."""
    t = Table(title=f"promote {r.model}: version {r.version} {r.decision.upper()}")
    for c in ("", f"version {r.previous} (current)", f"version {r.version} (candidate)"):
        t.add_column(c)
    f = lambda v, spec: "—" if v is None else format(v, spec)
    t.add_row("answers judged", str(r.samples), str(r.samples))
    if r.burst:
        t.add_row("answered in a burst (batched)", "", str(r.burst))
    if r.live:
        t.add_row("live requests replayed", str(r.live), str(r.live))
    t.add_row("p95 ms", f(r.p95_ms_current, ".1f"), f(r.p95_ms_candidate, ".1f")
              + (f" (SLO {r.slo_p95_ms:g})" if r.slo_p95_ms is not None else ""))
    t.add_row("agreement with the reference", "", f(r.agreement_reference, ".4f"))
    t.add_row("answers beyond its tolerance", "", str(r.beyond_tolerance))
    t.add_row("agreement with the current", "", f(r.agreement_current, ".4f"))
    t.add_row("max |diff| vs reference / current", "", f"{f(r.max_abs_diff_reference, '.3g')} / "
                                                      f"{f(r.max_abs_diff_current, '.3g')}")
    for x in r.failures:
        t.add_row(f"[red]{x['kind']}[/]", "", x["message"])
    return t
