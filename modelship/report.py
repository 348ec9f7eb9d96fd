"""The pipeline report: report.json, report.md, a self-contained report.html with plots, and report.png (the
report at a glance, one picture)."""

from __future__ import annotations

import base64
import html
import json
import shutil
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .manifest import size_mb


def _rows(arts: dict, results: dict, benches: dict, name: str) -> list[dict]:
    rows = []
    for key, art in arts.items():
        if not hasattr(art, "manifest"):
            continue
        man = art.manifest
        par = man.parity or {}
        acc = par.get("accuracy", man.extra.get("test_accuracy"))
        lt = results.get(key, {})
        b1 = next((b for b in benches.get(key, []) if b["batch"] == 1), {})
        b32 = next((b for b in benches.get(key, []) if b["batch"] == 32), {})
        rows.append({
            "variant": key, "model": "text" if key.startswith("text") else name, "artifact": str(art.path), "format": man.format, "precision": man.precision,
            "size_mb": size_mb(art.model_path),
            "parameters": man.extra.get("parameters"),
            # a root PyTorch model is the reference itself: nothing judged it, so it says "root", never "pass"
            "parity_passed": par.get("passed", "root" if man.format == "torch" and not man.reference else None),
            "reference": Path(par.get("reference") or lt.get("reference") or art.path).name,
            "weak": par.get("weak") or [],
            # the batch gate: the same answers alone and inside batches (False: served with batch size 1)
            "same_at_any_batch": (par.get("batch") or {}).get("passed"),
            "top1_agreement": par.get("top1_agreement"), "max_abs_diff": par.get("max_abs_diff"),
            "accuracy": acc, "reference_accuracy": par.get("reference_accuracy"),
            "served_p50_ms": lt.get("p50_ms"), "served_p95_ms": lt.get("p95_ms"), "served_p99_ms": lt.get("p99_ms"),
            "rps": lt.get("rps"), "requests": lt.get("requests"), "failures": lt.get("failures"),
            "served_agreement": lt.get("top1_agreement"), "served_max_abs_diff": lt.get("max_abs_diff"),
            "served_p99_abs_diff": lt.get("p99_abs_diff"), "served_mismatches": lt.get("mismatches"),
            "loadtest_passed": lt.get("passed"),
            "inproc_p50_ms_b1": b1.get("p50_ms"), "inproc_items_per_s_b32": b32.get("throughput_per_s"),
            "majority_baseline": man.extra.get("majority_baseline"),
            "judged_on": par.get("judged_on"), "served_on": lt.get("served_on"),
            "kernels_differ": lt.get("kernels_differ") or [],
        })
    for r in rows:  # a user's PyTorch model: its accuracy as measured when its variants were judged against it
        if r["accuracy"] is None and r["format"] == "torch":
            r["accuracy"] = next((o["reference_accuracy"] for o in rows if o["reference"] == Path(r["artifact"]).name
                                  and o["reference_accuracy"] is not None), None)
    return rows


def _plots(out: Path, rows: list[dict], results: dict) -> dict[str, Path]:
    """The main model's variants' latency against accuracy, and every served variant's latency distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    pts = [r for r in rows if r["served_p50_ms"] is not None and r["accuracy"] is not None and r["model"] != "text"]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        sizes = np.array([r["size_mb"] or 0.01 for r in pts])
        ax.scatter([r["served_p50_ms"] for r in pts], [r["accuracy"] * 100 for r in pts],
                        s=60 + 900 * sizes / max(sizes.max(), 1e-9), c=range(len(pts)), cmap="tab10", alpha=0.7,
                        edgecolors="black")
        for i, r in enumerate(sorted(pts, key=lambda r: r["served_p50_ms"])):  # alternate sides: near points stay legible
            ax.annotate(f"{r['variant']}\n{r['size_mb']:.2f} MB", (r["served_p50_ms"], r["accuracy"] * 100),
                        textcoords="offset points", xytext=(8, 10 if i % 2 else -22), fontsize=8)
        ax.margins(x=0.15, y=0.25)
        ax.set_xlabel("served p50 latency (ms)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("latency vs accuracy (marker area ∝ model file size)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files["latency_vs_accuracy"] = out / "latency_vs_accuracy.png"
        fig.savefig(files["latency_vs_accuracy"], dpi=110)
        plt.close(fig)
    hist = {k: np.array(v["latencies_ms"]) for k, v in results.items() if v.get("latencies_ms")}
    if hist:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        hi = max(np.percentile(v, 99.5) for v in hist.values())
        bins = np.linspace(0, hi, 60)
        for k, v in hist.items():
            ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{k} (p50 {np.median(v):.2f} ms)")
        ax.set_xlabel("served latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title("served latency distribution per variant")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files["latency_histograms"] = out / "latency_histograms.png"
        fig.savefig(files["latency_histograms"], dpi=110)
        plt.close(fig)
    return files


def fastest_within_budget(rows: list[dict], budget: float) -> dict | None:
    """Among the main model's variants (not the built-in text model's): the lowest served p50 within ``budget``
    of the PyTorch model's accuracy (without labels: the lowest among those whose every answer passed)."""
    ref = next((r["accuracy"] for r in rows if r["variant"] == "torch"), None)
    ok = [r for r in rows if r["model"] != "text" and r["served_p50_ms"] is not None and r["loadtest_passed"]
          and (ref is None or (r["accuracy"] is not None and r["accuracy"] >= ref - budget))]
    return min(ok, key=lambda r: r["served_p50_ms"]) if ok else None


COLS = [("variant", "variant", None), ("precision", "precision", None), ("size_mb", "size MB", ".3f"),
        ("reference", "judged against", None), ("parity_passed", "parity", None),
        ("same_at_any_batch", "any batch", None),
        ("top1_agreement", "agreement", ".4f"), ("max_abs_diff", "max |Δ|", ".2g"), ("accuracy", "accuracy", ".4f"),
        ("served_p50_ms", "p50 ms", ".2f"), ("served_p95_ms", "p95 ms", ".2f"), ("served_p99_ms", "p99 ms", ".2f"),
        ("rps", "req/s", ".1f"), ("served_agreement", "served agreement", ".4f"),
        ("served_max_abs_diff", "served max |Δ|", ".2g"), ("inproc_p50_ms_b1", "in-process p50 ms (b=1)", ".3f")]


def cell(v, spec):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "pass" if v else "FAIL"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def recommendation(tuned: dict | None) -> dict | None:
    """modelship tune's winner: the served configuration with the most requests/s inside the SLO."""
    best = (tuned or {}).get("best")
    if not best:
        return None
    return {"variant": best["config"]["variant"], "config": best["config"], "rps": best["rps"], "users": best["users"],
            "p95_ms": best["p95_ms"], "slo_p95_ms": tuned["slo_p95_ms"], "agreement": best["agreement"],
            "mar": tuned.get("winner_mar"), "trials": len(tuned["trials"]), "pareto": [t["name"] for t in tuned["pareto"]]}


def build(out: Path, name: str, cfg, steps, arts, results, benches, tuned: dict | None = None) -> dict:
    rows = _rows(arts, results, benches, name)
    best = fastest_within_budget(rows, cfg.accuracy_budget)
    plots = _plots(out, rows, results)
    if tuned and tuned.get("plot"):  # beside the report, so report.md's link works
        plots["tune_pareto"] = out / "tune_pareto.png"
        shutil.copyfile(tuned["plot"], plots["tune_pareto"])
    failed = [s for s in steps if s.status != "ok"]
    report = {
        "model": name, "config": asdict(cfg), "variants": rows,
        "fastest_within_budget": best and {"variant": best["variant"], "served_p50_ms": best["served_p50_ms"],
                                           "accuracy": best["accuracy"], "budget": cfg.accuracy_budget},
        "recommendation": recommendation(tuned),
        "steps": [asdict(s) for s in steps], "failed_steps": [s.name for s in failed],
        "loadtests": {k: {kk: vv for kk, vv in v.items() if kk not in ("latencies_ms", "levels")} for k, v in results.items()},
        "benchmarks": benches, "plots": {k: str(v) for k, v in plots.items()}, "passed": not failed,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(_markdown(report, rows, plots))
    (out / "report.html").write_text(_html(report, rows, plots))
    _snapshot(out / "report.png", report, rows, plots)
    return report


SNAPSHOT_COLS = ("variant", "precision", "parity_passed", "same_at_any_batch", "top1_agreement", "served_p50_ms",
                 "served_agreement", "size_mb")


def _snapshot(path: Path, report: dict, rows: list[dict], plots: dict) -> None:
    """report.png: the report at a glance, as one picture (for a README, a pull request, a chat): its verdict, the
    variants' gates and served figures, and the latency-vs-accuracy plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    spec = {k: (h, f) for k, h, f in COLS}
    plot = plots.get("latency_vs_accuracy")
    table_h, plot_h = 0.25 * (len(rows) + 1), 4.6 if plot else 0.0
    height = 1.1 + table_h + plot_h + 0.2
    fig = plt.figure(figsize=(11, height))
    fig.suptitle(f"modelship report — {report['model']}", x=0.02, ha="left", fontsize=14, fontweight="bold")
    fig.text(0.02, 1 - 0.45 / height, textwrap.fill(verdict(report), 150), fontsize=8.5, va="top")
    ax = fig.add_axes((0.02, (plot_h + 0.2) / height, 0.96, table_h / height))
    ax.axis("off")
    cells = [[cell(r[k], spec[k][1]) for k in SNAPSHOT_COLS] for r in rows]
    table = ax.table(cellText=cells, colLabels=[spec[k][0] for k in SNAPSHOT_COLS], bbox=(0, 0, 1, 1),
                     cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    for (i, _), c in table.get_celld().items():
        c.set_edgecolor("#cccccc")
        if i == 0:
            c.set_facecolor("#f3f3f3")
        elif c.get_text().get_text() == "FAIL":
            c.set_facecolor("#fde8e8")
    if plot:
        img = fig.add_axes((0.2, 0.1 / height, 0.6, 4.4 / height))
        img.imshow(mpimg.imread(plot))
        img.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def verdict(report) -> str:
    rec = report.get("recommendation")
    if rec:
        c = rec["config"]
        return (f"Recommended (modelship tune, {rec['trials']} configurations measured, every answer checked): "
                f"{rec['variant']} with batch size {c['batch_size']}, batch delay {c['max_batch_delay_ms']} ms, "
                f"{c['workers']} worker(s) × {c['threads']} thread(s): {rec['rps']:.1f} req/s at {rec['users']} "
                f"users, p95 {rec['p95_ms']:.1f} ms (SLO {rec['slo_p95_ms']:g} ms). " + _fastest(report))
    return _fastest(report)


def _fastest(report) -> str:
    b = report["fastest_within_budget"]
    if not b:
        return "No variant passed its load test within the accuracy budget."
    if b["accuracy"] is None:  # no labels: every served answer was judged against the PyTorch model instead
        return (f"Fastest variant whose every served answer matched the PyTorch model: {b['variant']} "
                f"(served p50 {b['served_p50_ms']:.2f} ms; no labels, so no accuracy).")
    return (f"Fastest variant within {b['budget'] * 100:.1f} accuracy points of the PyTorch model: "
            f"{b['variant']} (served p50 {b['served_p50_ms']:.2f} ms, accuracy {b['accuracy'] * 100:.2f}%).")


TEXT_VARIANTS = {"text-torch": "PyTorch", "text-onnx": "ONNX", "text-int8": "INT8", "text-student": "student"}


def text_summary(rows: list[dict]) -> str:
    """The text model: held-out accuracy on real labels, then each served text variant (teacher, its ONNX, INT8,
    the distilled student): accuracy, agreement of its served answers to raw texts, served p50."""
    t = {r["variant"]: r for r in rows if r["model"] == "text"}
    if not t:
        return ""
    torch_row = t.get("text-torch", {})
    line = (f"Text model (all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes critics' reviews): held-out accuracy "
            f"{cell(torch_row.get('accuracy'), '.4f')} on real labels (majority baseline "
            f"{cell(torch_row.get('majority_baseline'), '.4f')}).")
    served = [(TEXT_VARIANTS.get(k, k), r) for k, r in t.items() if r.get("served_agreement") is not None]
    if served:
        line += " Served with raw text in: " + "; ".join(
            f"{name} accuracy {cell(r['accuracy'], '.4f')}, agreement {r['served_agreement']:.4f} with the PyTorch "
            f"model over {r['requests']} answers, p50 {cell(r['served_p50_ms'], '.2f')} ms" for name, r in served) + "."
    advice = text_advice(rows)
    return f"{line} {advice}" if advice else line


def text_advice(rows: list[dict], kept: float = 0.97) -> str:
    """Which text variant to ship: the fastest whose load test passed and that keeps ``kept`` of the PyTorch
    model's held-out accuracy, next to the most accurate; for a p95 SLO between their p95s, the most accurate
    that meets it."""
    t = {r["variant"]: r for r in rows if r["model"] == "text"}
    ref = (t.get("text-torch") or {}).get("accuracy")
    ok = [r for r in t.values() if r.get("loadtest_passed") and r.get("served_p95_ms") is not None
          and r.get("accuracy") is not None and (ref is None or r["accuracy"] >= kept * ref)]
    if not ok:
        return ""
    fastest = min(ok, key=lambda r: r["served_p95_ms"])
    best = max(ok, key=lambda r: (round(r["accuracy"], 4), -r["served_p95_ms"]))
    name = lambda r: f"{r['variant']} (accuracy {r['accuracy']:.4f}, served p95 {r['served_p95_ms']:.1f} ms)"  # noqa: E731
    if fastest is best:
        return f"Ship {name(best)}: the fastest text variant is also the most accurate."
    return (f"Ship {name(best)} where its p95 meets the SLO; under a tighter SLO (down to "
            f"{fastest['served_p95_ms']:.1f} ms), {name(fastest)}, which keeps {kept:.0%} of the PyTorch model's "
            "accuracy.")


def machines(rows: list[dict]) -> list[str]:
    """Where each verdict was judged and where its answers were served; a variant served with other INT8 arithmetic,
    runtime or provider than it was judged with is named: its load test is the evidence for the serving machine."""
    from .machine import describe

    out = []
    judged = {describe(r["judged_on"]) for r in rows if r["judged_on"]}
    served = {describe(r["served_on"]) for r in rows if r["served_on"]}
    if judged:
        out.append(f"Parity judged on: {'; '.join(sorted(judged))}.")
    if served:
        out.append(f"Served on: {'; '.join(sorted(served))}.")
    for r in rows:
        if r["kernels_differ"]:
            out.append(f"{r['variant']}: served elsewhere than judged ({'; '.join(r['kernels_differ'])}); its served "
                       "load test, every answer checked, is the evidence for the serving machine.")
    return out


def _markdown(report, rows, plots) -> str:
    lines = [f"# modelship report — {report['model']}", "", verdict(report), "", text_summary(rows), "",
             *[f"{m}  " for m in machines(rows)], "",
             "| " + " | ".join(h.replace("|", "\\|") for _, h, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(cell(r[k], f) for k, _, f in COLS) + " |" for r in rows]
    lines += ["", "## Steps", "", "| step | status | seconds | error |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {(s['error'] or '').replace('|', '/')[:300]} |"
              for s in report["steps"]]
    lines += [""] + [f"![{k}]({Path(p).name})" for k, p in plots.items()] + [""]
    return "\n".join(lines)


def _html(report, rows, plots) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLS)
    rec = report.get("recommendation")
    best = rec["variant"] if rec else (report["fastest_within_budget"] or {}).get("variant")
    body = "".join("<tr" + (' class="best"' if best in (r["variant"], f"{r['model']}-{r['variant']}") else "") + ">" +
                   "".join(f"<td class='{'bad' if cell(r[k], f) == 'FAIL' else ''}'>{html.escape(cell(r[k], f))}</td>"
                           for k, _, f in COLS) + "</tr>" for r in rows)
    steps = "".join(f"<tr class='{s['status']}'><td>{html.escape(s['name'])}</td><td>{s['status']}</td>"
                    f"<td>{s['seconds']}</td><td>{html.escape((s['error'] or '')[:400])}</td></tr>"
                    for s in report["steps"])
    imgs = "".join(f"<figure><img alt='{k}' src='data:image/png;base64,"
                   f"{base64.b64encode(Path(p).read_bytes()).decode()}'><figcaption>{k.replace('_', ' ')}</figcaption></figure>"
                   for k, p in plots.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>modelship report — {report['model']}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:14px}}th{{background:#f3f3f3}}
tr.best td{{background:#e6f6e6;font-weight:600}}td.bad,tr.failed td{{background:#fde8e8}}tr.skipped td{{color:#888}}
figure{{display:inline-block;margin:0 1em 1em 0}}img{{max-width:640px;border:1px solid #ddd}}.verdict{{font-size:1.15em}}</style>
</head><body><h1>modelship report — {html.escape(report['model'])}</h1>
<p class="verdict">{html.escape(verdict(report))}</p><p>{html.escape(text_summary(rows))}</p>
{"".join(f"<p>{html.escape(m)}</p>" for m in machines(rows))}
<h2>Variants</h2><table><tr>{head}</tr>{body}</table>
<h2>Plots</h2>{imgs}
<h2>Steps</h2><table><tr><th>step</th><th>status</th><th>seconds</th><th>error</th></tr>{steps}</table>
</body></html>
"""
