"""Accuracy-aware INT8 (``quantize --until-parity``): when the INT8 gate fails, try the options that usually
recover accuracy, then keep the fewest, most sensitive nodes in float until the gate passes.

1. The requested build, then each recovery option (per-channel weights; SmoothQuant at alpha 0.5 and 0.9; for
   static: the other calibration methods and symmetric activations), each judged by the real parity gate; the best
   is kept.
2. Sensitivity: each node the best build quantized is quantized alone, and its output error against the
   float graph on the evaluation data is its cost: the worst difference of any output (in units of that
   output's spread), after the labels it flips.
3. The most sensitive nodes stay in float: one, two, four, ... then a bisection to the fewest that pass.
   If the gate fails with every node but the least sensitive one in float, no INT8 variant can pass: stop.
4. Pruning: the ranking is an estimate from one node at a time, and nodes act together (one node in float can
   pass where two fail), so each node kept in float goes back to INT8 in turn, the least sensitive first, and
   stays there when the gate still passes. The result is minimal: no single node of it can be quantized again.

The manifest records each attempt, the nodes kept in float with their sensitivity, and the latency cost.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import QuantizeError
from ..manifest import Artifact, write_artifact
from .variants import MODES, QuantizeOptions, make_variant


SENSITIVITY_SAMPLES = 128


SMOOTH_ALPHAS = (0.5, 0.9)  # SmoothQuant's default, and one that moves most of the range into the weights


def recovery_options(mode: str, opts: QuantizeOptions, calibrated: bool = True) -> list[tuple[str, QuantizeOptions]]:
    """The options worth trying after ``opts`` failed, each a one-step change from it (SmoothQuant with per-channel
    weights, which absorb the ranges it moves; only where there is calibration data to measure them on)."""
    tries = [] if opts.per_channel else [("per-channel weights", replace(opts, per_channel=True))]
    if opts.smooth is None and calibrated:
        tries += [(f"SmoothQuant {a}, per-channel weights", replace(opts, per_channel=True, smooth=a))
                  for a in SMOOTH_ALPHAS]
    if mode == "static":
        for method in ("entropy", "percentile", "minmax"):
            if method != opts.calibration_method:
                tries.append((f"{method} calibration", replace(opts, calibration_method=method)))
        other = "int8" if opts.activation_type == "uint8" else "uint8"
        tries.append((f"{'symmetric' if other == 'int8' else 'asymmetric'} activations",
                      replace(opts, activation_type=other)))
    return tries


def quantized_nodes(quantized: Path) -> list[tuple[str, str]]:
    """(name, op type) of the nodes an INT8 build runs in INT8, by the names its quantizer gives them (which
    ``nodes_to_quantize`` / ``nodes_to_exclude`` take): a dynamic build renames a node X it quantizes to
    X_quant (a Gemm is first split, its MatMul named X_MatMul), or keeps X computing on quantized data (a Gather
    of INT8 embeddings) with a DequantizeLinear after it; a QDQ build feeds X from DequantizeLinear."""
    import onnx

    graph = onnx.load(str(quantized), load_external_data=False).graph
    quant_ops = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
    producer = {o: n for n in graph.node for o in n.output}
    dq_inputs = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    computes_quantized = {producer[i].name for i in dq_inputs.values()
                          if i in producer and producer[i].op_type not in quant_ops}  # e.g. a Gather of INT8 weights
    out = []
    for n in graph.node:
        if n.op_type in quant_ops:
            continue
        if n.name.endswith("_quant"):
            out.append((n.name[: -len("_quant")], n.op_type))
        elif n.name in computes_quantized:
            out.append((n.name, n.op_type))
        elif any(i in dq_inputs and dq_inputs[i] not in producer or
                 i in dq_inputs and producer[dq_inputs[i]].op_type in quant_ops for i in n.input):
            out.append((n.name, n.op_type))  # QDQ: fed by DequantizeLinear of a quantized activation or weight
    return out


def calibrated_once(opts: QuantizeOptions, folder: Path) -> QuantizeOptions:
    """``opts`` with a calibration cache in ``folder`` for its method, activation type and op types: a static search
    calibrates once per such choice and every later build reuses the ranges (a dynamic build has none)."""
    key = "-".join([opts.calibration_method, opts.activation_type, *opts.op_types, "x", *opts.exclude_op_types,
                    f"smooth{opts.smooth}"])  # a smoothed graph has other tensors and ranges
    return replace(opts, calibration_cache=str(folder / f"calibration-{key}.json"))


def _calibrated(art: Artifact, opts: QuantizeOptions, data: dict | None) -> bool:
    from .. import data as datasets

    return bool(opts.calibration_data) or not datasets.is_generated(data or art.manifest.data)


def _score(rec: dict) -> tuple:
    """Higher is better: passed, then agreement, then the smaller worst difference."""
    return (bool(rec["passed"]), rec.get("top1_agreement") or 0.0, -(rec.get("max_abs_diff") or 0.0))


def _p50_ms(art: Artifact, seconds: float = 0.5) -> float:
    from ..bench import feed_for, measure
    from ..runners import open_runner

    runner = open_runner(art)
    feed = feed_for(runner, 1)
    return float(np.median(measure(lambda: runner.infer(feed), seconds)))


def until_parity(art: Artifact, mode: str, out: str | Path, opts: QuantizeOptions | None = None,
                 data: dict | None = None, judge: dict | None = None, json_path: Path | None = None,
                 log=lambda msg: None) -> Artifact:
    """Build an INT8 variant of ``art`` that passes its parity gate (``judge``: parity_record's keyword
    arguments) with the fewest nodes kept in float; raises QuantizeError when none can."""
    from ..stages import gate_parity, parity_record

    if MODES.get(mode) is None or MODES[mode].precision != "int8":
        raise QuantizeError(f"--until-parity searches INT8 builds; mode '{mode}' is not one (use dynamic or static)")
    opts, judge, out = opts or QuantizeOptions(), judge or {}, Path(out)
    attempts: list[dict] = []
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = iter(range(10_000))

        def attempt(step: str, o: QuantizeOptions) -> tuple[Artifact | None, dict | None]:
            folder = tmp / f"a{next(n)}"
            try:
                cand = make_variant(art, mode, folder, calibrated_once(o, tmp), data=data)
            except QuantizeError as e:
                attempts.append({"step": step, "error": str(e)})
                log(f"{step}: build failed ({str(e)[:120]})")
                return None, None
            rec = parity_record(cand, **judge)
            attempts.append({"step": step, "excluded": len(o.exclude_nodes), "passed": rec["passed"],
                             "top1_agreement": rec["top1_agreement"], "max_abs_diff": rec["max_abs_diff"],
                             "failures": rec["failures"][:2]})
            agree = rec["top1_agreement"]
            log(f"{step}: {'passed' if rec['passed'] else 'failed'} ("
                + (f"agreement {agree:.4f}, " if agree is not None else "") + f"max |Δ| {rec['max_abs_diff']:.3g})")
            return cand, rec

        best, best_rec = attempt("as asked", opts)
        best_opts = opts
        if best is None:
            raise QuantizeError(attempts[0]["error"])
        if best_rec["weak"] and not best_rec["allow_weak"]:  # about the reference and the data, not the build
            raise QuantizeError(f"{art.path}: the INT8 gate cannot judge this model on this data ("
                                f"{'; '.join(best_rec['weak'])}); no choice of nodes changes that — supply data "
                                "the model separates (--data), a tighter --max-abs-diff, or --allow-weak-parity")
        if not best_rec["passed"]:
            for step, o in recovery_options(mode, opts, calibrated=_calibrated(art, opts, data)):
                cand, rec = attempt(step, o)
                if rec is not None and _score(rec) > _score(best_rec):
                    best, best_rec, best_opts = cand, rec, o
                if best_rec["passed"]:
                    break
        chosen, excluded = best_opts, []
        if not best_rec["passed"]:
            excluded = _exclude(art, mode, best, best_opts, data, judge, attempt, tmp, log, attempts)
            chosen = replace(best_opts, exclude_nodes=best_opts.exclude_nodes + [e["node"] for e in excluded])
        full = best  # the build with every node the options quantize: the latency the exclusions are weighed against
        final = make_variant(art, mode, out, calibrated_once(chosen, tmp), data=data)
        cost = None
        if excluded:
            cost = {"p50_ms_batch1": {"float": round(_p50_ms(art), 4), "int8_all_nodes": round(_p50_ms(full), 4),
                                      "int8_with_exclusions": round(_p50_ms(final), 4)}}
            p = cost["p50_ms_batch1"]
            cost["over_all_nodes"] = round(p["int8_with_exclusions"] / p["int8_all_nodes"], 4)
    final.manifest.extra["until_parity"] = {
        "options": {k: v for k, v in chosen.recorded().items() if k != "exclude_nodes"},
        "kept_in_float": excluded, "attempts": attempts, "latency": cost,
        "seconds": round(time.monotonic() - t_start, 1)}
    write_artifact(final.path, final.manifest)
    gate_parity(final, json_path=json_path, **judge)
    return final


def _exclude(art, mode, full, opts, data, judge, attempt, tmp, log, attempts) -> list[dict]:
    """The fewest most-sensitive nodes to keep in float so that the gate passes (see the module docstring)."""
    from ..comparison import collect
    from ..preprocess import preprocessed
    from ..runners import open_runner

    nodes = [(name, op) for name, op in quantized_nodes(full.model_path) if name not in opts.exclude_nodes]
    if len(nodes) < 2:
        raise QuantizeError(f"no INT8 variant of {art.path} passes parity: the {mode} build quantizes "
                            f"{len(nodes)} node(s), so nothing is left to keep in float "
                            f"({'; '.join(attempts[-1].get('failures') or [])})")
    # what the candidate is fed (raw samples through its recorded preprocessing); ranks nodes, the gate still
    # judges all the data
    feed = preprocessed(full, data or full.manifest.data, "test", SENSITIVITY_SAMPLES)
    first = art.manifest.outputs[0].name
    base = collect(open_runner(art), feed)
    scale = {k: float(np.std(v)) or float(np.abs(v).mean()) or 1.0 for k, v in base.items()}
    classifier = art.manifest.is_classifier
    sens = []
    for i, (name, op) in enumerate(nodes):
        folder = tmp / f"s{i}"
        one = make_variant(art, mode, folder, calibrated_once(replace(opts, op_types=[], exclude_op_types=[],
                                                                      exclude_nodes=[], nodes_only=[name]), tmp),
                           data=data)
        got = collect(open_runner(one), feed)
        # what the gate judges: the worst difference of any output (in units of that output's spread) and flips
        worst, moved = max((float(np.abs(got[k] - v).max()) / scale[k], k) for k, v in base.items())
        flips = float(np.mean(got[first].reshape(len(got[first]), -1).argmax(-1)
                              != base[first].reshape(len(base[first]), -1).argmax(-1))) if classifier else 0.0
        sens.append({"node": name, "int8_op": op, "sensitivity": round(worst, 6), "label_flips": round(flips, 4),
                     "why": f"quantized alone it moves '{moved}' by up to {worst:.3g} of its spread (max |Δ| / std)"
                            + (f" and changes {flips:.1%} of top-1 labels" if classifier else "")
                            + ", against the float graph"})
        shutil.rmtree(folder, ignore_errors=True)
    sens.sort(key=lambda s: (s["label_flips"], s["sensitivity"]), reverse=True)
    log(f"sensitivity of {len(sens)} quantized nodes measured; most sensitive: "
        + ", ".join(f"{s['node']} ({s['sensitivity']:.3g})" for s in sens[:3]))

    def passes(k: int) -> bool:
        return passes_with(sens[:k], f"{k} most sensitive node(s) in float")

    def passes_with(kept: list[dict], step: str) -> bool:
        o = replace(opts, exclude_nodes=opts.exclude_nodes + [s["node"] for s in kept])
        _, rec = attempt(step, o)
        return bool(rec and rec["passed"])

    most = len(sens) - 1
    if not passes(most):
        raise QuantizeError(f"no INT8 variant of {art.path} passes parity: even with {most} of its {len(sens)} "
                            f"quantized nodes kept in float (only {sens[-1]['node']} in INT8) the gate fails "
                            f"({'; '.join(attempts[-1].get('failures') or [])}); loosen the tolerance or keep "
                            "the model in FP32/FP16")
    lo, hi, k = 0, most, 1  # lo fails (the full build), hi passes
    while k < hi:
        if passes(k):
            hi = k
            break
        lo, k = k, k * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
    kept = sens[:hi]
    for s in reversed(sens[:hi]):  # pruning, the least sensitive first (step 4 above)
        if len(kept) == 1:
            break  # the build with no node in float is the one that failed
        fewer = [k for k in kept if k is not s]
        if passes_with(fewer, f"{s['node']} back to INT8 ({len(fewer)} in float)"):
            kept = fewer
    if len(kept) < hi:
        log(f"pruning returned {hi - len(kept)} of the {hi} node(s) to INT8: {len(kept)} stay in float")
    return kept
