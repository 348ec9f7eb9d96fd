"""Accuracy-aware INT8 (``quantize --until-parity``): when the INT8 gate fails, try the options that usually
recover accuracy, then keep the fewest, most sensitive nodes in float until the gate passes.

1. The requested build, then each recovery option (per-channel weights; for dynamic: per-row activations;
   SmoothQuant at alpha 0.5 and 0.9; for static: the other calibration methods and symmetric activations), each
   judged by the real parity gate and the batch gate; the first that passes both ends it, else the best is kept
   (a build that passes parity with answers that move with their batch is served with batch size 1).
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
from ..batch_gate import failed
from .variants import MODES, QuantizeOptions, make_variant


SENSITIVITY_SAMPLES = 128


SMOOTH_ALPHAS = (0.5, 0.9)  # SmoothQuant's default, and one that moves most of the range into the weights


def recovery_options(mode: str, opts: QuantizeOptions, calibrated: bool = True) -> list[tuple[str, QuantizeOptions]]:
    """The options worth trying after ``opts`` failed, each a one-step change from it (SmoothQuant with per-channel
    weights, which absorb the ranges it moves; only where there is calibration data to measure them on)."""
    tries = [] if opts.per_channel else [("per-channel weights", replace(opts, per_channel=True))]
    if mode == "dynamic" and opts.activations == "per-tensor":  # each sample's activations scaled on their own
        tries.append(("per-row activations", replace(opts, activations="per-row", per_channel=False)))
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
        elif n.op_type == "MatMulNBits" and n.name.endswith("_Q8"):  # a per-row build's MatMul X is X_Q8
            out.append((n.name[: -len("_Q8")], "MatMul"))
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


def _same_at_any_batch(rec: dict) -> bool:
    return not failed(rec)


def _ok(rec: dict) -> bool:
    """What the search looks for: parity passed, and answers that do not move with their batch."""
    return bool(rec["passed"]) and _same_at_any_batch(rec)


def _score(rec: dict) -> tuple:
    """Higher is better: passed, then the batch gate, then agreement, then the smaller worst difference."""
    return (bool(rec["passed"]), _same_at_any_batch(rec), rec.get("top1_agreement") or 0.0,
            -(rec.get("max_abs_diff") or 0.0))


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
    if MODES.get(mode) is None or MODES[mode].precision != "int8":
        raise QuantizeError(f"--until-parity searches INT8 builds; mode '{mode}' is not one (use dynamic or static)")
    with tempfile.TemporaryDirectory() as tmp:
        return Search(art, mode, Path(tmp), data, judge or {}, log).run(opts or QuantizeOptions(), Path(out),
                                                                          json_path)


class Search:
    """One --until-parity search: the artifact, mode, data and gate it builds and judges against, its scratch
    folder, and every attempt it made (recorded in the result's manifest)."""

    def __init__(self, art: Artifact, mode: str, tmp: Path, data: dict | None, judge: dict, log):
        self.art, self.mode, self.tmp, self.data, self.judge, self.log = art, mode, tmp, data, judge, log
        self.attempts: list[dict] = []

    def build(self, o: QuantizeOptions, folder: Path) -> Artifact:
        return make_variant(self.art, self.mode, folder, calibrated_once(o, self.tmp), data=self.data)

    def attempt(self, step: str, o: QuantizeOptions) -> tuple[Artifact | None, dict | None]:
        """A build with ``o``, judged by the real gate; (None, None) when it cannot be built."""
        from ..stages import parity_record

        try:
            cand = self.build(o, self.tmp / f"a{len(self.attempts)}")
        except QuantizeError as e:
            self.attempts.append({"step": step, "error": str(e)})
            self.log(f"{step}: build failed ({str(e)[:120]})")
            return None, None
        rec = parity_record(cand, **self.judge)
        self.attempts.append({"step": step, "excluded": len(o.exclude_nodes), "passed": rec["passed"],
                              "top1_agreement": rec["top1_agreement"], "max_abs_diff": rec["max_abs_diff"],
                              "same_at_any_batch": _same_at_any_batch(rec), "failures": rec["failures"][:2]})
        agree = rec["top1_agreement"]
        self.log(f"{step}: {'passed' if rec['passed'] else 'failed'} ("
                 + (f"agreement {agree:.4f}, " if agree is not None else "") + f"max |Δ| {rec['max_abs_diff']:.3g}"
                 + ("" if _same_at_any_batch(rec) else "; answers move with their batch") + ")")
        return cand, rec

    def best_options(self, opts: QuantizeOptions) -> tuple[Artifact, dict, QuantizeOptions]:
        """The requested build, then each recovery option until one passes: the best build, its record, options."""
        best, best_rec = self.attempt("as asked", opts)
        if best is None:
            raise QuantizeError(self.attempts[0]["error"])
        if best_rec["weak"] and not best_rec["allow_weak"]:  # about the reference and the data, not the build
            raise QuantizeError(f"{self.art.path}: the INT8 gate cannot judge this model on this data ("
                                f"{'; '.join(best_rec['weak'])}); no choice of nodes changes that — supply data "
                                "the model separates (--data), a tighter --max-abs-diff, or --allow-weak-parity")
        best_opts = opts
        if not _ok(best_rec):  # failed, or passed with answers that move with their batch: try the others
            for step, o in recovery_options(self.mode, opts, calibrated=_calibrated(self.art, opts, self.data)):
                cand, rec = self.attempt(step, o)
                if rec is not None and _score(rec) > _score(best_rec):
                    best, best_rec, best_opts = cand, rec, o
                if _ok(best_rec):
                    break
        return best, best_rec, best_opts

    def run(self, opts: QuantizeOptions, out: Path, json_path: Path | None) -> Artifact:
        from ..stages import gate_parity

        t_start = time.monotonic()
        best, best_rec, best_opts = self.best_options(opts)
        chosen, excluded = best_opts, []
        if not best_rec["passed"]:
            excluded = self.exclude(best, best_opts, batch=_same_at_any_batch(best_rec))
            chosen = replace(best_opts, exclude_nodes=best_opts.exclude_nodes + [e["node"] for e in excluded])
        final = make_variant(self.art, self.mode, out, calibrated_once(chosen, self.tmp), data=self.data)
        final.manifest.extra["until_parity"] = {
            "options": {k: v for k, v in chosen.recorded().items() if k != "exclude_nodes"},
            "kept_in_float": excluded, "attempts": self.attempts, "latency": self.cost(best, final) if excluded else
            None, "seconds": round(time.monotonic() - t_start, 1)}
        write_artifact(final.path, final.manifest)
        gate_parity(final, json_path=json_path, **self.judge)
        return final

    def cost(self, full: Artifact, final: Artifact) -> dict:
        """What keeping nodes in float costs: p50 at batch 1 of float, every node in INT8, the result."""
        p = {"float": round(_p50_ms(self.art), 4), "int8_all_nodes": round(_p50_ms(full), 4),
             "int8_with_exclusions": round(_p50_ms(final), 4)}
        return {"p50_ms_batch1": p, "over_all_nodes": round(p["int8_with_exclusions"] / p["int8_all_nodes"], 4)}

    def sensitivity(self, full: Artifact, opts: QuantizeOptions, nodes: list) -> list[dict]:
        """Each node quantized alone: its worst output difference (in units of that output's spread) and the labels
        it flips against the float graph, most sensitive first."""
        from ..comparison import collect
        from ..preprocess import preprocessed
        from ..runners import open_runner

        # what the candidate is fed (raw samples through its recorded preprocessing); ranks nodes, the gate still
        # judges all the data
        feed = preprocessed(full, self.data or full.manifest.data, "test", SENSITIVITY_SAMPLES)
        first = self.art.manifest.outputs[0].name
        base = collect(open_runner(self.art), feed)
        scale = {k: float(np.std(v)) or float(np.abs(v).mean()) or 1.0 for k, v in base.items()}
        classifier = self.art.manifest.is_classifier
        sens = []
        for i, (name, op) in enumerate(nodes):
            folder = self.tmp / f"s{i}"
            one = self.build(replace(opts, op_types=[], exclude_op_types=[], exclude_nodes=[], nodes_only=[name]),
                             folder)
            got = collect(open_runner(one), feed)
            worst, moved = max((float(np.abs(got[k] - v).max()) / scale[k], k) for k, v in base.items())
            flips = float(np.mean(got[first].reshape(len(got[first]), -1).argmax(-1)
                                  != base[first].reshape(len(base[first]), -1).argmax(-1))) if classifier else 0.0
            sens.append({"node": name, "int8_op": op, "sensitivity": round(worst, 6), "label_flips": round(flips, 4),
                         "why": f"quantized alone it moves '{moved}' by up to {worst:.3g} of its spread (max |Δ| / "
                                "std)" + (f" and changes {flips:.1%} of top-1 labels" if classifier else "")
                                + ", against the float graph"})
            shutil.rmtree(folder, ignore_errors=True)
        sens.sort(key=lambda s: (s["label_flips"], s["sensitivity"]), reverse=True)
        self.log(f"sensitivity of {len(sens)} quantized nodes measured; most sensitive: "
                 + ", ".join(f"{s['node']} ({s['sensitivity']:.3g})" for s in sens[:3]))
        return sens

    def exclude(self, full: Artifact, opts: QuantizeOptions, batch: bool = False) -> list[dict]:
        """The fewest most-sensitive nodes to keep in float so that the gate passes (see the module docstring); with
        ``batch``, the batch gate too (a per-row build keeps its answers at any batch with any node in float; a
        per-tensor build never does, so it is judged on parity alone and served with batch size 1)."""
        nodes = [(name, op) for name, op in quantized_nodes(full.model_path) if name not in opts.exclude_nodes]
        if len(nodes) < 2:
            raise QuantizeError(f"no INT8 variant of {self.art.path} passes parity: the {self.mode} build quantizes "
                                f"{len(nodes)} node(s), so nothing is left to keep in float "
                                f"({'; '.join(self.attempts[-1].get('failures') or [])})")
        sens = self.sensitivity(full, opts, nodes)

        def passes(kept: list[dict], step: str) -> bool:
            o = replace(opts, exclude_nodes=opts.exclude_nodes + [s["node"] for s in kept])
            rec = self.attempt(step, o)[1]  # parity, and the batch gate where the full build passed it
            return rec is not None and bool(rec["passed"]) and (_same_at_any_batch(rec) or not batch)

        most = len(sens) - 1
        if not passes(sens[:most], f"{most} most sensitive node(s) in float"):
            raise QuantizeError(f"no INT8 variant of {self.art.path} passes parity: even with {most} of its "
                                f"{len(sens)} quantized nodes kept in float (only {sens[-1]['node']} in INT8) the "
                                f"gate fails ({'; '.join(self.attempts[-1].get('failures') or [])}); loosen the "
                                "tolerance or keep the model in FP32/FP16")
        hi = self.fewest(lambda k: passes(sens[:k], f"{k} most sensitive node(s) in float"), most)
        kept = sens[:hi]
        for s in reversed(sens[:hi]):  # pruning, the least sensitive first (step 4 above)
            if len(kept) == 1:
                break  # the build with no node in float is the one that failed
            fewer = [k for k in kept if k is not s]
            if passes(fewer, f"{s['node']} back to INT8 ({len(fewer)} in float)"):
                kept = fewer
        if len(kept) < hi:
            self.log(f"pruning returned {hi - len(kept)} of the {hi} node(s) to INT8: {len(kept)} stay in float")
        return kept

    @staticmethod
    def fewest(passes, most: int) -> int:
        """The smallest k in 1..most for which ``passes(k)`` holds (it holds at ``most``, not at 0): doubling, then a
        bisection."""
        lo, hi, k = 0, most, 1
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
        return hi
