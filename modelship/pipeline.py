"""``modelship pipeline``: train → export → quantize (dynamic, static, fp16) → distill → archive all →
serve → load-test each served variant → stop, then a report. A failed step is recorded, not hidden:
steps that need its output are skipped and the report says why."""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelshipError


@dataclass
class PipelineConfig:
    arch: str = "cnn"
    loadtest_seconds: float = 10.0
    users: int = 4
    accuracy_budget: float = 0.01  # "fastest variant within this accuracy drop of the reference"
    bench_seconds: float = 0.5
    port: int | None = None


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    error: str | None = None
    detail: dict = field(default_factory=dict)


def run(out: str | Path, config: PipelineConfig | None = None, progress=None) -> dict:
    from .bench import bench
    from .export.onnx_export import export
    from .loadtests.runner import Gates, loadtest
    from .models.checkpoints import open_source
    from .models.train import train_artifact
    from .parity import DEFAULT_TOLERANCES
    from .quantize.distill import distill
    from .quantize.variants import make_variant
    from .runners import open_runner
    from .serve import server
    from .serve.archive import archive
    from .stages import gate_parity

    cfg = config or PipelineConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = f"digits-{cfg.arch}"
    arts: dict[str, object] = {}
    steps: list[Step] = []
    state = out / "serve-state"

    def step(label: str, fn, needs=()):
        s = Step(label)
        steps.append(s)
        missing = [n for n in needs if n not in arts]
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
        return s

    def variant(key, src_key, mode):
        def fn():
            art = make_variant(arts[src_key], mode, out / f"{name}-{key}")
            gate_parity(art)
            arts[key] = art
        return fn

    def do_train():
        arts["torch"] = train_artifact(cfg.arch, out / f"{name}-torch")

    def do_export():
        src, module = open_source(arts["torch"].path)
        art = export(src, module, out / f"{name}-onnx")
        gate_parity(art, reference=(src, module))
        arts["onnx"] = art

    def do_distill():
        art, report = distill(arts["torch"].path, out / f"{name}-student-torch")
        teacher = open_source(arts["torch"].path)
        gate_parity(art, reference=teacher, tolerance=DEFAULT_TOLERANCES["student"])
        src, module = open_source(art.path)
        onnx_art = export(src, module, out / f"{name}-student-onnx")
        gate_parity(onnx_art, parent=(src, module))  # judged against the teacher; the conversion against itself
        arts["student"] = onnx_art
        return {"distillation": report}

    served = {}

    def do_archive():
        store = out / "model-store"
        for key in ("torch", "onnx", "int8-dynamic", "int8-static", "fp16", "student"):
            if key in arts:
                archive(arts[key], store, name=f"{name}-{key}")
                served[key] = f"{name}-{key}"
        arts["store"] = store
        return {"models": dict(served)}

    def do_serve():
        port = cfg.port or server.free_port()
        arts["server"] = server.start(arts["store"], state, server.ServeConfig(port=port))
        return {k: v for k, v in arts["server"].items() if "token" not in k}

    results: dict[str, dict] = {}

    def do_load(key):
        def fn():
            r = loadtest(state, served[key], out / "loadtests" / key, users=(cfg.users,),
                         duration_s=cfg.loadtest_seconds, gates=Gates())
            results[key] = r
            if not r["passed"]:
                raise ModelshipError("; ".join(r["gate_failures"]))
            return {k: r[k] for k in ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "top1_agreement",
                                      "max_abs_diff", "mismatches", "reference")}
        return fn

    def do_stop():
        server.stop(state)

    benches: dict[str, list] = {}

    def do_bench():
        for key, art in arts.items():
            if hasattr(art, "manifest"):
                benches[key] = bench(open_runner(art), (1, 32), cfg.bench_seconds)

    step("train", do_train)
    step("export", do_export, needs=("torch",))
    step("quantize dynamic", variant("int8-dynamic", "onnx", "dynamic"), needs=("onnx",))
    step("quantize static", variant("int8-static", "onnx", "static"), needs=("onnx",))
    step("quantize fp16", variant("fp16", "onnx", "fp16"), needs=("onnx",))
    step("distill", do_distill, needs=("torch",))
    step("archive", do_archive, needs=("torch",))
    step("serve", do_serve, needs=("store",))
    try:
        for key in list(served):
            step(f"loadtest {key}", do_load(key), needs=("server",))
    finally:
        if "server" in arts:
            step("stop", do_stop)
    step("bench in-process", do_bench)
    from .report import build

    return build(out, cfg, steps, arts, results, benches)
