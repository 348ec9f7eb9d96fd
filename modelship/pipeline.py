"""``modelship pipeline``: train → export → quantize (dynamic, static, fp16) → distill, and the built-in text
model (train, export) → archive all → serve → load-test each served variant (digit PNGs, raw review texts) →
stop, then a report. A failed step is recorded, not hidden:
steps that need its output are skipped and the report says why."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ModelshipError


@dataclass
class PipelineConfig:
    arch: str = "cnn"
    loadtest_seconds: float = 10.0
    users: int = 4
    accuracy_budget: float = 0.01  # "fastest variant within this accuracy drop of the reference"
    bench_seconds: float = 0.5
    port: int | None = None
    text: bool = True  # also the built-in text model (MiniLM + drug reviews), served and load-tested with raw text


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    error: str | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class Run:
    """What the steps share: the artifacts made so far (by key), the served model names, the results."""

    cfg: PipelineConfig
    out: Path
    arts: dict = field(default_factory=dict)
    served: dict = field(default_factory=dict)  # variant key -> served model name
    results: dict = field(default_factory=dict)  # variant key -> load-test result
    benches: dict = field(default_factory=dict)  # variant key -> in-process bench rows

    @property
    def name(self) -> str:
        return f"digits-{self.cfg.arch}"

    def served_name(self, key: str) -> str:
        return f"drugreview-{key}" if key.startswith("text") else f"{self.name}-{key}"

    @property
    def state(self) -> Path:
        return self.out / "serve-state"


def _train(key: str):
    """Train the digits model (key "torch") or the built-in text model ("text-torch")."""
    def step(run: Run):
        from .models.train import train_artifact

        arch = "text" if key.startswith("text") else run.cfg.arch
        art = run.arts[key] = train_artifact(arch, run.out / run.served_name(key))
        return {k: v for k, v in art.manifest.extra.items() if k in ("test_accuracy", "majority_baseline", "test_samples")}
    return step


def _export(key: str, src_key: str):
    def step(run: Run):
        from .export.onnx_export import export
        from .models.checkpoints import open_source
        from .stages import gate_parity

        src, module = open_source(run.arts[src_key].path)
        art = export(src, module, run.out / run.served_name(key))
        gate_parity(art, reference=(src, module))  # on the evaluation data: digit PNGs, raw review texts
        run.arts[key] = art
    return step


def _variant(key: str, src_key: str, mode: str):
    def step(run: Run):
        from .quantize.variants import make_variant
        from .stages import gate_parity

        art = make_variant(run.arts[src_key], mode, run.out / f"{run.name}-{key}")
        gate_parity(art)
        run.arts[key] = art
    return step


def _distill(run: Run):
    from .export.onnx_export import export
    from .models.checkpoints import open_source
    from .parity import DEFAULT_TOLERANCES
    from .quantize.distill import distill
    from .stages import gate_parity

    art, report = distill(run.arts["torch"].path, run.out / f"{run.name}-student-torch")
    gate_parity(art, reference=open_source(run.arts["torch"].path), tolerance=DEFAULT_TOLERANCES["student"])
    src, module = open_source(art.path)
    onnx_art = export(src, module, run.out / f"{run.name}-student-onnx")
    gate_parity(onnx_art, parent=(src, module))  # judged against the teacher; the conversion against itself
    run.arts["student"] = onnx_art
    return {"distillation": report}


SERVED = ("torch", "onnx", "int8-dynamic", "int8-static", "fp16", "student", "text-onnx")


def _archive(run: Run):
    from .serve.archive import archive

    store = run.out / "model-store"
    for key in SERVED:
        if key in run.arts:
            archive(run.arts[key], store, name=run.served_name(key))
            run.served[key] = run.served_name(key)
    run.arts["store"] = store
    return {"models": dict(run.served)}


def _serve(run: Run):
    from .serve import server

    port = run.cfg.port or server.free_port()
    run.arts["server"] = server.start(run.arts["store"], run.state, server.ServeConfig(port=port))
    return {k: v for k, v in run.arts["server"].items() if "token" not in k}


def _loadtest(run: Run, key: str):
    from .loadtests.runner import loadtest
    from .loadtests.summary import Gates

    r = loadtest(run.state, run.served[key], run.out / "loadtests" / key, users=(run.cfg.users,),
                 duration_s=run.cfg.loadtest_seconds, gates=Gates())
    run.results[key] = r
    if not r["passed"]:
        raise ModelshipError("; ".join(r["gate_failures"]))
    return {k: r[k] for k in ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "top1_agreement",
                              "max_abs_diff", "mismatches", "reference")}


def _stop(run: Run):
    from .serve import server

    server.stop(run.state)


def _bench(run: Run):
    from .bench import bench
    from .runners import open_runner

    for key, art in run.arts.items():
        if hasattr(art, "manifest"):
            run.benches[key] = bench(open_runner(art), (1, 32), run.cfg.bench_seconds)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable  # fn(run), or fn(run, key) for a per-variant stage
    needs: tuple = ()  # keys of run.arts that earlier stages must have made
    per_variant: bool = False  # one step per served variant, named "NAME KEY"
    cleanup: bool = False  # runs even when the pipeline is interrupted (once its needs are met)
    text: bool = False  # the built-in text model's stage (left out with --no-text)


STAGES = [
    Stage("train", _train("torch")),
    Stage("export", _export("onnx", "torch"), ("torch",)),
    Stage("quantize dynamic", _variant("int8-dynamic", "onnx", "dynamic"), ("onnx",)),
    Stage("quantize static", _variant("int8-static", "onnx", "static"), ("onnx",)),
    Stage("quantize fp16", _variant("fp16", "onnx", "fp16"), ("onnx",)),
    Stage("distill", _distill, ("torch",)),
    Stage("train text", _train("text-torch"), text=True),
    Stage("export text", _export("text-onnx", "text-torch"), ("text-torch",), text=True),
    Stage("archive", _archive, ("torch",)),
    Stage("serve", _serve, ("store",)),
    Stage("loadtest", _loadtest, ("server",), per_variant=True),
    Stage("stop", _stop, ("server",), cleanup=True),
    Stage("bench in-process", _bench),
]


def _step(run: Run, steps: list, label: str, fn, needs, progress) -> None:
    s = Step(label)
    steps.append(s)
    missing = [n for n in needs if n not in run.arts]
    if missing:
        s.status, s.error = "skipped", f"needs {', '.join(missing)}, which failed"
    else:
        t0 = time.perf_counter()
        try:
            s.detail = fn() or {}
            s.status = "ok"
        except ModelshipError as e:
            s.status, s.error = "failed", str(e)
        except Exception as e:  # noqa: BLE001 — recorded in the report, never hidden
            s.status, s.error = "failed", f"{type(e).__name__}: {e}"
            s.detail = {"traceback": traceback.format_exc(limit=5)}
        s.seconds = round(time.perf_counter() - t0, 2)
    if progress:
        progress(s)


def run(out: str | Path, config: PipelineConfig | None = None, progress=None) -> dict:
    """Every stage in order; a cleanup stage (stop the server) also runs when the pipeline is interrupted."""
    from .report import build

    r = Run(config or PipelineConfig(), Path(out).resolve())
    r.out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    done = set()
    try:
        for st in STAGES:
            if st.text and not r.cfg.text:
                continue
            if st.cleanup and not all(n in r.arts for n in st.needs):
                continue  # nothing to clean up (as the stop step was before: only once a server ran)
            for key in (list(r.served) if st.per_variant else [None]):
                fn = (lambda st=st, key=key: st.fn(r, key)) if st.per_variant else (lambda st=st: st.fn(r))
                _step(r, steps, f"{st.name} {key}" if key else st.name, fn, st.needs, progress)
            done.add(st.name)
    finally:
        for st in STAGES:
            if st.cleanup and st.name not in done and all(n in r.arts for n in st.needs):
                st.fn(r)
    return build(r.out, r.cfg, steps, r.arts, r.results, r.benches)
