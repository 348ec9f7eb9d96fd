"""``modelship pipeline [SOURCE]``: train the built-in digits CNN (or import the user's SOURCE with its --data) →
export → quantize (dynamic, static, fp16) → distill (models with shipped training data), and the built-in text
model (train, export, INT8, a distilled student) → archive all → serve → load-test each served variant (what users send: digit PNGs, raw
texts, images) → stop, then a report. A failed step is recorded, not hidden: steps that need its output are
skipped and the report says why."""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import ModelshipError
from .paths import check_out


@dataclass
class PipelineConfig:
    source: str | None = None  # the user's model (Hugging Face folder, .pt2, torch artifact); None: built-in
    data: str | None = None  # the source's evaluation data (--data: CSV/JSONL, image folder, CSV of paths, .npz)
    task: str | None = None  # classification | regression, when the source does not say (a .pt2)
    weights: str | None = None  # a torchvision:NAME source's state_dict file
    output_names: list | None = None  # rename the source's outputs (a .pt2's heads)
    allow_weak: bool = False  # accept on purpose a parity judgement its data cannot make (see parity.weak_reasons)
    variants: tuple | None = None  # which of OPTIONAL to make; None: all (torch and onnx are always made)
    arch: str = "cnn"
    loadtest_seconds: float = 10.0
    users: int = 4
    accuracy_budget: float = 0.01  # "fastest variant within this accuracy drop of the reference"
    bench_seconds: float = 0.5
    port: int | None = None
    text: bool = True  # also the built-in text model (MiniLM on movie reviews), served and load-tested with raw text
    tune_minutes: float = 1.0  # modelship tune over the served variants (0: no tuning); its winner is the advice
    slo_p95_ms: float | None = None  # tune's target; None: twice the lowest p95 the load tests measured

    @property
    def name(self) -> str:
        """The main model's name in folders and URLs: digits-ARCH, or the source's file or folder name."""
        if self.source is None:
            return f"digits-{self.arch}"
        if self.source.startswith("torchvision:"):
            stem = self.source.split(":", 1)[1]
        else:
            p = Path(self.source).resolve()
            stem = p.stem if p.is_file() else p.name
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-._")[:48] or "model"


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    error: str | None = None
    kind: str | None = None  # what failed (modelship.errors.KINDS)
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
    tuned: dict | None = None  # modelship tune's result over the served variants

    @property
    def name(self) -> str:
        return self.cfg.name

    def served_name(self, key: str) -> str:
        return f"reviews-{key}" if key.startswith("text") else f"{self.name}-{key}"

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


def _import(run: Run):
    """The user's SOURCE, opened with its --data and --task, copied into the run folder as the root artifact."""
    from . import data as datasets
    from .models.checkpoints import open_source, save_source

    src, _ = open_source(run.cfg.source, data=run.cfg.data, task=run.cfg.task, weights=run.cfg.weights,
                         output_names=run.cfg.output_names)
    art = run.arts["torch"] = save_source(src, run.out / run.served_name("torch"))
    man = art.manifest
    return {"source": str(src.model_path), "loader": man.loader or "zoo", "task": man.task,
            "data": datasets.describe(man.data), "preprocess": (man.preprocess or {}).get("kind")}


def _judge(run: Run):
    from .convert import Judge

    return Judge(allow_weak=run.cfg.allow_weak)


def _export(key: str, src_key: str):
    def step(run: Run):
        from . import convert

        # judged on the evaluation data: digit PNGs, raw review texts, the user's --data
        run.arts[key] = convert.export(run.arts[src_key].path, run.out / run.served_name(key), judge=_judge(run))
    return step


def _variant(key: str, src_key: str, mode: str, options: dict | None = None):
    def step(run: Run):
        from . import convert

        run.arts[key] = convert.quantize(run.arts[src_key], mode, run.out / run.served_name(key), options=options,
                                         judge=_judge(run))
    return step


def _text_int8(run: Run):
    """The text model's INT8 with the recipe its zoo entry declares (models/zoo.py: TEXT_INT8)."""
    from .models import zoo

    recipe = dict(zoo.entry("text").extra["int8"])
    _variant("text-int8", "text-onnx", recipe.pop("mode"), recipe)(run)
    return {"recipe": zoo.entry("text").extra["int8"]}


def prebuild_text(log=print) -> None:
    """``make setup``: the built-in text model's fine-tuned weights and its student's, built once (minutes on a CPU)
    into the user's cache, so the demo and the tests read them."""
    import json
    import tempfile

    from .models.train import train_artifact
    from .quantization.distill import distill

    with tempfile.TemporaryDirectory() as tmp:
        teacher = train_artifact("text", Path(tmp) / "text")
        log(json.dumps({k: teacher.manifest.extra[k] for k in ("test_accuracy", "majority_baseline", "cached")}))
        report = distill(teacher.path, Path(tmp) / "student", log=log)[1]
        log(json.dumps({k: report[k] for k in ("accuracy_ratio", "latency_ratio", "cached")}))


def _distill_text(run: Run):
    """The built-in text model's student: a third of its layers, trained on its logits (quantization/distill.py)."""
    from . import convert

    student = convert.distill(run.arts["text-torch"], run.out / run.served_name("text-student-torch"))
    run.arts["text-student"] = convert.export(student, run.out / run.served_name("text-student"))
    report = student.manifest.extra["distillation"]
    return {k: report[k] for k in ("latency_ratio", "accuracy_ratio", "parameter_ratio")}


def _distill(run: Run):
    from . import convert

    student = convert.distill(run.arts["torch"], run.out / f"{run.name}-student-torch")
    # judged against the teacher; the conversion against the student itself
    run.arts["student"] = convert.export(student, run.out / f"{run.name}-student-onnx")
    return {"distillation": student.manifest.extra["distillation"]}


SERVED = ("torch", "onnx", "int8-dynamic", "int8-static", "fp16", "student", "text-onnx", "text-int8", "text-student")
OPTIONAL = ("int8-dynamic", "int8-static", "fp16", "student")  # --variants: the ones a run may leave out


def _archive(run: Run):
    """Every served variant into one store, with dynamic batching; one whose answers depend on what they are
    batched with (its batch gate failed) with batch size 1, so each request is answered on its own."""
    from .batch_gate import failed
    from .serving.archive import ModelConfig, archive

    store = run.out / "model-store"
    alone = []
    for key in SERVED:
        if key in run.arts:
            config = ModelConfig(batch_size=1) if failed(run.arts[key].manifest.parity) else None
            archive(run.arts[key], store, name=run.served_name(key), config=config)
            run.served[key] = run.served_name(key)
            alone += [run.served_name(key)] if config else []
    run.arts["store"] = store
    return {"models": dict(run.served), "batch_size_1": alone}


def _serve(run: Run):
    from .serving import lifecycle
    from .serving.config import ServeConfig, free_port

    port = run.cfg.port or free_port()
    # the pipeline's own server, load-tested on /predictions and stopped: no Open Inference Protocol front
    run.arts["server"] = lifecycle.start(run.arts["store"], run.state, ServeConfig(port=port, oip=False))
    return run.arts["server"].public()


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
    from .serving import lifecycle

    lifecycle.stop(run.state)


TUNE_TOP = 2  # tune searches the variants with the most requests/s in the pipeline's own load tests


def _tune(run: Run):
    """modelship tune, on a private server of its own, over the main model's TUNE_TOP variants whose load tests
    passed with the most requests/s (a short budget goes further on two than spread over six)."""
    from .tuning import Space, TuneOptions, tune_artifacts

    keys = [k for k, r in run.results.items() if r["passed"] and not k.startswith("text")]
    if not keys:
        raise ModelshipError("no variant of the model passed its load test; nothing to tune")
    keys = sorted(keys, key=lambda k: run.results[k]["rps"] or 0, reverse=True)[:TUNE_TOP]
    slo = run.cfg.slo_p95_ms or round(2 * min(run.results[k]["p95_ms"] for k in keys), 1)
    opts = TuneOptions(slo_p95_ms=slo, budget_s=run.cfg.tune_minutes * 60, seconds=min(3.0, run.cfg.loadtest_seconds),
                       space=Space(max_users=4 * run.cfg.users))
    result = run.tuned = tune_artifacts({run.served[k]: run.arts[k] for k in keys}, run.out / "tune", opts)
    best = result["best"]
    return {"slo_p95_ms": slo, "best": best["name"], "rps": best["rps"], "p95_ms": best["p95_ms"],
            "trials": len(result["trials"]), "pareto": [t["name"] for t in result["pareto"]]}


def _bench(run: Run):
    from .bench import bench
    from .runners import open_runner

    for key, art in run.arts.items():
        if hasattr(art, "manifest"):
            run.benches[key] = bench(open_runner(art), (1, 32), run.cfg.bench_seconds)


def _builtin(run: Run) -> bool:
    return run.cfg.source is None


def _builtin_text(run: Run) -> bool:
    return run.cfg.source is None and run.cfg.text


def _distillable(run: Run) -> bool:
    """The zoo's students learn from the digits training split: the built-in model, or a user's digits model."""
    art = run.arts.get("torch")
    return _builtin(run) or (art is not None and (art.manifest.data or {}).get("name") == "digits"
                             and (art.manifest.loader or "zoo") == "zoo")


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable  # fn(run), or fn(run, key) for a per-variant stage
    needs: tuple = ()  # keys of run.arts that earlier stages must have made
    per_variant: bool = False  # one step per served variant, named "NAME KEY"
    cleanup: bool = False  # runs even when the pipeline is interrupted (once its needs are met)
    when: Callable | None = None  # when(run): whether this run has the stage (built-in or user's model, --no-text)
    variant: str | None = None  # the optional variant this stage makes (left out unless in --variants)


STAGES = [
    Stage("train", _train("torch"), when=_builtin),
    Stage("import", _import, when=lambda run: not _builtin(run)),
    Stage("export", _export("onnx", "torch"), ("torch",)),
    Stage("quantize dynamic", _variant("int8-dynamic", "onnx", "dynamic"), ("onnx",), variant="int8-dynamic"),
    Stage("quantize static", _variant("int8-static", "onnx", "static"), ("onnx",), variant="int8-static"),
    Stage("quantize fp16", _variant("fp16", "onnx", "fp16"), ("onnx",), variant="fp16"),
    Stage("distill", _distill, ("torch",), when=_distillable, variant="student"),
    Stage("train text", _train("text-torch"), when=_builtin_text),
    Stage("export text", _export("text-onnx", "text-torch"), ("text-torch",), when=_builtin_text),
    Stage("quantize text", _text_int8, ("text-onnx",), when=_builtin_text),
    Stage("distill text", _distill_text, ("text-torch",), when=_builtin_text),
    Stage("archive", _archive, ("torch",)),
    Stage("serve", _serve, ("store",)),
    Stage("loadtest", _loadtest, ("server",), per_variant=True),
    Stage("stop", _stop, ("server",), cleanup=True),
    Stage("tune", _tune, ("server",), when=lambda run: run.cfg.tune_minutes > 0),
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
            s.status, s.error, s.kind = "failed", str(e), e.kind
        except Exception as e:  # noqa: BLE001 — recorded in the report, never hidden
            s.status, s.error, s.kind = "failed", f"{type(e).__name__}: {e}", "errors"
            s.detail = {"traceback": traceback.format_exc(limit=5)}
        s.seconds = round(time.perf_counter() - t0, 2)
    if progress:
        progress(s)


def run(out: str | Path, config: PipelineConfig | None = None, progress=None) -> dict:
    """Every stage in order; a cleanup stage (stop the server) also runs when the pipeline is interrupted."""
    from .report import build

    r = Run(config or PipelineConfig(), Path(out).resolve())
    check_out(r.out, source=r.cfg.source, weights=r.cfg.weights, data=r.cfg.data)
    r.out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    done = set()
    try:
        for st in STAGES:
            if (st.when is not None and not st.when(r)) or (st.variant and r.cfg.variants is not None
                                                            and st.variant not in r.cfg.variants):
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
    return build(r.out, r.name, r.cfg, steps, r.arts, r.results, r.benches, r.tuned)
