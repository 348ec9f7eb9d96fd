"""The ``modelship`` command line. Each command is thin: it calls a stage function, prints a rich
summary, writes ``--json`` and exits 0 only when the command succeeded and its gates passed."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import ArtifactError, GateError, ModelshipError, ParityError, ServeError
from .export import DEFAULT_OPSET

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Take a trained PyTorch model to production and prove it still gives the same answers.")
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)
STATE = {"debug": False}

JsonOpt = typer.Option(None, "--json", help="Write the machine-readable result to this file.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    STATE["debug"] = debug


def write_json(path: Optional[Path], payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _fmt(v, spec=".4g"):
    return "—" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def parity_table(records: list[dict], title: str = "parity") -> Table:
    t = Table(title=title)
    for c in ("artifact", "backend", "precision", "reference", "samples", "max_abs_diff", "top1_agreement",
              "accuracy", "reference_accuracy", "weak", "passed"):
        t.add_column(c, justify="left" if c in ("artifact", "reference") else "right")
    for r in records:
        weak = len(r.get("weak") or [])
        t.add_row(Path(r["artifact"]).name, r["backend"], r["precision"], Path(r.get("reference") or "—").name,
                  str(r["samples"]), _fmt(r["max_abs_diff"]), _fmt(r["top1_agreement"]), _fmt(r["accuracy"]),
                  _fmt(r["reference_accuracy"]),
                  "—" if not weak else f"{weak}{' (accepted)' if r.get('allow_weak') else ''}",
                  "[green]yes[/]" if r["passed"] else "[red]NO[/]")
    return t


def judge_opts(max_abs_diff, min_agreement, max_accuracy_drop, rtol, output_tol, allow_weak) -> dict:
    """The keyword arguments every parity gate takes from the command line."""
    from .parity import parse_output_tolerance

    overrides = {"max_abs_diff": max_abs_diff, "min_top1_agreement": min_agreement,
                 "max_accuracy_drop": max_accuracy_drop, "rtol": rtol}
    return {"overrides": overrides,
            "per_output": dict(parse_output_tolerance(t) for t in output_tol or []), "allow_weak": allow_weak}


TolAbs = typer.Option(None, "--max-abs-diff", help="Override the precision's default atol: max |ref - cand| per value.")
TolRel = typer.Option(None, "--rtol", help="Override the precision's default rtol: |ref - cand| <= atol + rtol*|ref|.")
TolOut = typer.Option([], "--output-tol", help="Per-output tolerance NAME=ATOL[:RTOL] (repeatable).")
TolAgree = typer.Option(None, "--min-agreement", help="Override the default minimum top-1 agreement.")
TolDrop = typer.Option(None, "--max-accuracy-drop", help="Override the default maximum accuracy drop (fraction).")
WeakOpt = typer.Option(False, "--allow-weak-parity", help="Accept on purpose a parity judgement the data cannot "
                                                          "support (recorded in the manifest).")
DataOpt = typer.Option(None, "--data", help="Evaluation data: a CSV/JSONL of text,label; a folder of images per "
                                            "class or a CSV of path,label; an .npz with one array per input name "
                                            "and optional 'labels'; or a shipped dataset's name (digits, "
                                            "drugreview). Recorded with its sha256.")
TaskOpt = typer.Option(None, "--task", help="classification or regression, when the checkpoint does not say "
                                            "(a .pt2 does not).")
OutputNamesOpt = typer.Option(None, "--output-names", help="Comma-separated names for the model's outputs (default: "
                                                            "the program's own: a returned dict's keys or named tuple's "
                                                            "fields; else logits, or output0, output1, ...).")
WeightsOpt = typer.Option(None, "--weights", help="With SOURCE torchvision:NAME (e.g. torchvision:resnet18): "
                                                    "the model's state_dict file.")
ProviderOpt = typer.Option(None, "--provider", help="onnxruntime execution provider: auto, cpu, cuda, tensorrt.")
DeviceOpt = typer.Option("cpu", "--device", help="torch device for PyTorch artifacts: cpu or cuda.")


@app.command()
def train(arch: str = typer.Argument(..., help="Zoo architecture: mlp, mlp-small, cnn, cnn-small, text."),
          out: Path = typer.Option(..., "--out", help="Artifact directory to write."),
          seed: int = typer.Option(0, help="Random seed."),
          epochs: Optional[int] = typer.Option(None, help="Override the recipe's epochs."),
          json_path: Optional[Path] = JsonOpt):
    """Train a zoo model on its shipped data (or build it from its config) into a torch artifact."""
    from rich.progress import Progress

    from .models.train import train_artifact

    with Progress(console=err, transient=True) as prog:
        task = prog.add_task(f"training {arch}", total=None)
        art = train_artifact(arch, out, seed=seed, epochs=epochs,
                             progress=lambda e, n: prog.update(task, completed=e, total=n))
    ex = art.manifest.extra
    console.print(f"[bold]{art.manifest.name}[/] → {art.path}  parameters {ex['parameters']:,}  "
                  f"trained in {ex['train_seconds']} s" +
                  (f"  test accuracy {ex['test_accuracy']:.4f}" if "test_accuracy" in ex else ""))
    write_json(json_path, art.manifest.to_dict())


@app.command()
def export(src: Path = typer.Argument(..., help="Artifact dir, torch.export .pt2 file, Hugging Face directory, or "
                                               "torchvision:NAME with --weights."),
           out: Path = typer.Option(..., "--out"),
           opset: int = typer.Option(DEFAULT_OPSET, "--opset", min=13, max=23),
           exporter: Optional[str] = typer.Option(None, help="torchscript or dynamo (default: per source kind)."),
           data: Optional[str] = DataOpt,
           task: Optional[str] = TaskOpt, weights: Optional[Path] = WeightsOpt,
           output_names: Optional[str] = OutputNamesOpt, max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel, output_tol: List[str] = TolOut,
           min_agreement: Optional[float] = TolAgree, max_accuracy_drop: Optional[float] = TolDrop,
           allow_weak: bool = WeakOpt, provider: Optional[str] = ProviderOpt, json_path: Optional[Path] = JsonOpt):
    """Export to ONNX, then gate on parity with the root PyTorch model (and, for a student, with itself)."""
    from .export.onnx_export import export as do_export
    from .models.checkpoints import TORCHVISION, open_source, save_source
    from .stages import gate_parity, is_root

    if exporter not in (None, "torchscript", "dynamo"):
        raise ModelshipError(f"unknown exporter '{exporter}'; expected torchscript or dynamo")
    src_art, module = open_source(src, data=data, task=task, weights=weights, output_names=_names(output_names))
    if str(src).startswith(TORCHVISION):  # the reference needs a folder of its own: the weights + its manifest
        src_art = save_source(src_art, out.with_name(out.name + "-torch"))
        console.print(f"imported {src} as {src_art.path} (the PyTorch reference of what is made from it)")
    art = do_export(src_art, module, out, opset=opset, dynamo=None if exporter is None else exporter == "dynamo")
    root = is_root(src_art)  # else a student: judged against its teacher, the conversion against itself
    rec = gate_parity(art, reference=(src_art, module) if root else None, provider=provider, json_path=json_path,
                      **judge_opts(max_abs_diff, min_agreement, max_accuracy_drop, rtol, output_tol, allow_weak))
    console.print(parity_table([rec], f"export {art.manifest.name} → {art.path}"))


@app.command()
def parity(ref: Path = typer.Argument(..., help="Reference: a torch artifact, .pt2 or HF directory."),
           candidates: List[Path] = typer.Argument(..., help="Artifacts to compare with the reference."),
           split: str = typer.Option("test", help="Evaluation split."), data: Optional[str] = DataOpt,
           max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel, output_tol: List[str] = TolOut,
           min_agreement: Optional[float] = TolAgree, max_accuracy_drop: Optional[float] = TolDrop,
           allow_weak: bool = WeakOpt, provider: Optional[str] = ProviderOpt,
           device: str = DeviceOpt, json_path: Optional[Path] = JsonOpt):
    """Parity records for any artifacts against a reference model."""
    from .manifest import load_artifact
    from .models import data as datasets
    from .models.checkpoints import open_source
    from .stages import parity_record

    ref_art, module = open_source(ref)
    spec = datasets.resolve(data)
    records = [parity_record(load_artifact(c), (ref_art, module), split=split, provider=provider, device=device,
                             data=spec, **judge_opts(max_abs_diff, min_agreement, max_accuracy_drop, rtol, output_tol,
                                                     allow_weak))
               for c in candidates]
    write_json(json_path, records if len(records) > 1 else records[0])
    console.print(parity_table(records))
    failed = [r for r in records if not r["passed"]]
    if failed:
        raise ParityError("; ".join(f"{Path(r['artifact']).name}: {'; '.join(r['failures'])}" for r in failed))


@app.command()
def bench(artifacts: List[Path] = typer.Argument(...),
          batch_sizes: str = typer.Option("1,32", "--batch-sizes"),
          seconds: float = typer.Option(1.0, help="Time per artifact and batch size."),
          seq_len: Optional[int] = typer.Option(None, help="Sequence length for text models."),
          provider: Optional[str] = ProviderOpt, device: str = DeviceOpt, threads: int = typer.Option(0),
          json_path: Optional[Path] = JsonOpt):
    """In-process latency (p50/p95/p99) and throughput per artifact and batch size."""
    from .bench import bench as run_bench
    from .manifest import load_artifact
    from .runners import open_runner

    sizes = _int_list(batch_sizes, "--batch-sizes")
    t = Table(title="bench")
    for c in ("artifact", "backend", "precision", "batch", "p50 ms", "p95 ms", "p99 ms", "items/s"):
        t.add_column(c, justify="left" if c == "artifact" else "right")
    results = []
    for a in artifacts:
        art = load_artifact(a)
        runner = open_runner(art, provider=provider, device=device, threads=threads)
        for row in run_bench(runner, sizes, seconds, seq_len):
            row = {"artifact": str(art.path), "backend": runner.backend, "precision": art.manifest.precision, **row}
            results.append(row)
            t.add_row(art.path.name, runner.backend, art.manifest.precision, str(row["batch"]), f"{row['p50_ms']:.3f}",
                      f"{row['p95_ms']:.3f}", f"{row['p99_ms']:.3f}", f"{row['throughput_per_s']:.0f}")
    console.print(t)
    write_json(json_path, results)


@app.command()
def quantize(src: Path = typer.Argument(..., help="An ONNX artifact."),
             mode: str = typer.Option(..., "--mode", help="dynamic | static | fp16 | optimize"),
             out: Path = typer.Option(..., "--out"),
             per_channel: bool = typer.Option(False, "--per-channel", help="Per-channel weight scales."),
             calibration_method: str = typer.Option("minmax", help="static: minmax | entropy | percentile"),
             calibration_data: Optional[Path] = typer.Option(None, help="static: a .npz with one array per input "
                                                                        "(default: the artifact's calibration split)"),
             calibration_samples: int = typer.Option(256, min=1),
             activation_type: str = typer.Option("uint8", help="static: uint8 (asymmetric, best on CPU) or int8 "
                                                          "(symmetric, what TensorRT builds from)"),
             exclude_nodes: str = typer.Option("", help="Comma-separated node names to keep in float."),
             exclude_op_types: str = typer.Option("", help="Comma-separated op types to keep in float."),
             op_types: str = typer.Option("", help="Comma-separated op types to quantize (default: all supported)."),
             fp16_io: bool = typer.Option(False, "--fp16-io", help="fp16: make inputs/outputs float16 too."),
             until_parity: bool = typer.Option(False, "--until-parity",
                                               help="dynamic/static: when the gate fails, try per-channel weights, "
                                                    "other calibrations, then keep the fewest most sensitive nodes "
                                                    "in float until it passes (recorded in the manifest)."),
             data: Optional[str] = DataOpt,
             max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel, output_tol: List[str] = TolOut,
             min_agreement: Optional[float] = TolAgree, max_accuracy_drop: Optional[float] = TolDrop,
             allow_weak: bool = WeakOpt, provider: Optional[str] = ProviderOpt,
             json_path: Optional[Path] = JsonOpt):
    """Make an INT8 / FP16 / optimized ONNX variant, then gate on parity with the original PyTorch model."""
    from .manifest import load_artifact
    from .models import data as datasets
    from .quantize.variants import QuantizeOptions, make_variant
    from .stages import gate_parity

    if activation_type not in ("int8", "uint8"):
        raise ModelshipError(f"unknown activation type '{activation_type}'; expected int8 or uint8")
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    opts = QuantizeOptions(per_channel=per_channel, calibration_method=calibration_method,
                           calibration_data=str(calibration_data) if calibration_data else None,
                           calibration_samples=calibration_samples, activation_type=activation_type,
                           exclude_nodes=split(exclude_nodes), exclude_op_types=split(exclude_op_types),
                           op_types=split(op_types), keep_io_types=not fp16_io)
    spec = datasets.resolve(data)
    judge = {"provider": provider, **judge_opts(max_abs_diff, min_agreement, max_accuracy_drop, rtol, output_tol,
                                                  allow_weak)}
    if until_parity:
        from .quantize.until_parity import until_parity as search

        with err.status(f"{mode} variant of {src}, until it passes parity…") as status:
            art = search(load_artifact(src), mode, out, opts, data=spec, judge=judge, json_path=json_path,
                         log=lambda msg: (status.update(f"{mode} until parity: {msg}"), err.print(f"  {msg}")))
        rec = art.manifest.parity
        found = art.manifest.extra["until_parity"]
        kept = found["kept_in_float"]
        console.print(f"kept in float: {len(kept)} node(s)" + "".join(f"\n  {k['node']} ({k['why']})" for k in kept))
        if found["latency"]:
            p = found["latency"]["p50_ms_batch1"]
            console.print(f"latency (batch 1, p50): float {p['float']:.3f} ms, INT8 every node {p['int8_all_nodes']:.3f} "
                          f"ms, with these in float {p['int8_with_exclusions']:.3f} ms")
    else:
        with err.status(f"{mode} variant of {src}…"):
            art = make_variant(load_artifact(src), mode, out, opts, data=spec)
            rec = gate_parity(art, json_path=json_path, **judge)
    size = art.model_path.stat().st_size / load_artifact(src).model_path.stat().st_size
    console.print(parity_table([rec], f"{mode} → {art.path} (file {size:.2f}× the source)"))


@app.command()
def distill(teacher: Path = typer.Argument(..., help="A torch artifact with shipped training data (e.g. digits)."),
            out: Path = typer.Option(..., "--out"),
            student: str = typer.Option("mlp-small", help="Zoo student architecture (mlp-small, cnn-small, mlp)."),
            temperature: float = typer.Option(2.0, min=0.1), alpha: float = typer.Option(0.5, min=0.0, max=1.0),
            seed: int = typer.Option(0), epochs: Optional[int] = typer.Option(None),
            min_agreement: Optional[float] = TolAgree, max_accuracy_drop: Optional[float] = TolDrop,
            allow_weak: bool = WeakOpt, json_path: Optional[Path] = JsonOpt):
    """Train a smaller student with knowledge distillation; compare with the same student trained without it."""
    from .models.checkpoints import open_source
    from .parity import DEFAULT_TOLERANCES
    from .quantize.distill import distill as do_distill
    from .stages import gate_parity

    with err.status(f"distilling {teacher} into {student} (and a plain {student} to compare)…"):
        art, report = do_distill(teacher, out, student=student, temperature=temperature, alpha=alpha, seed=seed,
                                 epochs=epochs)
    t = Table(title=f"distill → {art.path}")
    for c in ("model", "arch", "parameters", "test accuracy", "p50 ms (torch, batch 1)"):
        t.add_column(c, justify="right" if c != "model" else "left")
    for key in ("teacher", "student", "student_without_distillation"):
        r = report[key]
        t.add_row(key.replace("_", " "), r["arch"], f"{r['parameters']:,}", f"{r['accuracy']:.4f}", f"{r['p50_ms']:.3f}")
    console.print(t)
    try:
        rec = gate_parity(art, reference=open_source(teacher), tolerance=DEFAULT_TOLERANCES["student"],
                          **judge_opts(None, min_agreement, max_accuracy_drop, None, [], allow_weak))
    finally:  # the comparison is written even when the student fails its gate
        write_json(json_path, {"distillation": report, "parity": art.manifest.parity})
    console.print(parity_table([rec], "student vs teacher"))


@app.command("compile")
def compile_engine(src: Path = typer.Argument(..., help="An ONNX artifact (FP32, FP16, or static INT8 QDQ)."),
                   out: Path = typer.Option(..., "--out"),
                   profile: List[str] = typer.Option([], "--profile", help="Override a dim's range: NAME=MIN:OPT:MAX "
                                                                           "(repeatable), e.g. batch=1:8:64"),
                   workspace_gb: float = typer.Option(4.0, help="Builder workspace limit (GiB)."),
                   timing_cache_dir: Optional[Path] = typer.Option(None, help="Where timing caches are kept."),
                   max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel,
                   output_tol: List[str] = TolOut, min_agreement: Optional[float] = TolAgree,
                   max_accuracy_drop: Optional[float] = TolDrop, allow_weak: bool = WeakOpt,
                   json_path: Optional[Path] = JsonOpt):
    """Build a TensorRT engine (needs an NVIDIA GPU and TensorRT 10+), then gate on parity."""
    from .export.tensorrt import BuildOptions, build, parse_dim_override
    from .manifest import load_artifact
    from .stages import gate_parity

    opts = BuildOptions(workspace_bytes=int(workspace_gb * (1 << 30)), dims=dict(parse_dim_override(p) for p in profile),
                        timing_cache_dir=str(timing_cache_dir) if timing_cache_dir else None)
    with err.status(f"building a TensorRT engine from {src}…"):
        art = build(load_artifact(src), out, opts)
        rec = gate_parity(art, json_path=json_path,
                          **judge_opts(max_abs_diff, min_agreement, max_accuracy_drop, rtol, output_tol, allow_weak))
    console.print(parity_table([rec], f"compile → {art.path}"))


@app.command()
def archive(artifact: Path = typer.Argument(..., help="Any artifact directory (torch, onnx, int8/fp16, tensorrt)."),
            out: Path = typer.Option(..., "--out", help="Model store folder to write NAME.mar into."),
            name: Optional[str] = typer.Option(None, help="Model name in URLs (default: the artifact folder name)."),
            batch_size: int = typer.Option(8, min=1, help="TorchServe dynamic batch size."),
            max_batch_delay_ms: int = typer.Option(5, min=0, help="How long TorchServe waits to fill a batch "
                                                                         "(ms; 1 or more when batching)."),
            workers: Optional[int] = typer.Option(None, min=1, help="Worker processes for this model (default: from "
                                                                    "the machine and the model; see the README)."),
            response_timeout_s: int = typer.Option(30, min=1, help="Seconds before a request times out."),
            max_items: int = typer.Option(64, min=1, help="Most samples one request may carry."),
            threads: Optional[int] = typer.Option(None, min=1, help="Compute threads per worker (default: from the "
                                                                    "machine and the model)."),
            provider: Optional[str] = ProviderOpt, device: str = DeviceOpt,
            force: bool = typer.Option(False, "--force", help="Archive even without a passed parity record."),
            json_path: Optional[Path] = JsonOpt):
    """Pack an artifact into a TorchServe .mar (model file, manifest, handler, model config)."""
    from .manifest import load_artifact
    from .serve.archive import ModelConfig, archive as do_archive

    art = load_artifact(artifact)
    cfg = ModelConfig(batch_size, max_batch_delay_ms, workers, response_timeout_s, max_items, threads, provider,
                      device).for_model(art)
    mar = do_archive(art, out, name=name, config=cfg, force=force)
    console.print(f"{cfg.workers} worker(s) × {cfg.threads} thread(s)"
                  + (" (from this machine and model)" if workers is None or threads is None else ""))
    console.print(f"archived {artifact} → {mar} ({mar.stat().st_size / 1e6:.2f} MB)")
    write_json(json_path, {"mar": str(mar), "name": mar.stem, "config": cfg.yaml()})


@app.command()
def serve(store: Optional[Path] = typer.Argument(None, help="Model store with .mar files."),
          state: Path = typer.Option(..., "--state", help="Folder for config, logs and serve.json."),
          detach: bool = typer.Option(False, "--detach", help="Return once ready; the server keeps running."),
          stop: bool = typer.Option(False, "--stop", help="Stop the server recorded in STATE/serve.json."),
          rotate_token: bool = typer.Option(False, "--rotate-token", help="Replace the running server's token(s) "
                                                                          "and refresh STATE/serve.json."),
          token_type: str = typer.Option("inference", "--token-type", help="With --rotate-token: inference, "
                                                                           "management or both."),
          port: int = typer.Option(8080, "--port", help="Inference port; management, metrics, gRPC = PORT+1..PORT+4."),
          max_request_bytes: int = typer.Option(1 << 20, help="Bodies over this get HTTP 413."),
          job_queue_size: int = typer.Option(100, help="Queued requests per model before TorchServe answers 503."),
          token_expiration_min: int = typer.Option(24 * 60, help="Lifetime of the inference token."),
          no_auth: bool = typer.Option(False, "--no-auth", help="Disable token authorization (not for production)."),
          startup_timeout_s: float = typer.Option(120, help="Give up if models are not ready by then."),
          json_path: Optional[Path] = JsonOpt):
    """Run TorchServe on 127.0.0.1 with token auth on and model registration off."""
    from .serve import server

    if stop:
        was = server.stop(state)
        console.print("stopped" if was else "no server was running; state cleared")
        write_json(json_path, {"stopped": was, "state": str(state)})
        return
    if rotate_token:
        kinds = ("inference", "management") if token_type == "both" else (token_type,)
        info = server.rotate_token(state, kinds)
        console.print(f"rotated the {' and '.join(kinds)} token(s); new values in {Path(state) / server.STATE_FILE} "
                      f"(inference token expires {info.get('token_expires')})")
        write_json(json_path, server.public(info))
        return
    if store is None:
        raise ModelshipError("serve needs a STORE folder of .mar files (or --stop)")
    cfg = server.ServeConfig(port=port, max_request_bytes=max_request_bytes, job_queue_size=job_queue_size,
                             token_auth=not no_auth, token_expiration_min=token_expiration_min,
                             startup_timeout_s=startup_timeout_s)
    with err.status("starting TorchServe and waiting for models…"):
        info = server.start(store, state, cfg)
    write_json(json_path, server.public(info))  # tokens stay in serve.json (0600) only
    console.print(f"serving {', '.join(info['models'])} at {info['inference_url']}/predictions/NAME "
                  f"(token in {Path(state) / server.STATE_FILE}; metrics {info['metrics_url']}/metrics)")
    if detach:
        return
    import time as _time

    try:
        while server.alive(info["pid"]):
            _time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (modelship.signals): TorchServe and its workers go too
        server.stop(state)
        console.print("stopped")
        return
    server.stop(state)
    raise ServeError(f"TorchServe exited; see {Path(state) / 'logs'}")


@app.command()
def predict(file: Path = typer.Argument(..., help="A .json request body or a .npy array."),
            state: Path = typer.Option(..., "--state"), model: str = typer.Option(..., "--model"),
            json_path: Optional[Path] = JsonOpt):
    """Send one request to the served model and print its answer."""
    from .serve.client import body_from_file, post

    r = post(state, model, body_from_file(file))
    try:
        payload = r.json()
    except ValueError:
        payload = {"code": r.status_code, "message": r.text[:500]}
    write_json(json_path, payload)
    if r.status_code != 200:
        raise ModelshipError(f"HTTP {r.status_code}: {payload.get('message', payload)}")
    console.print_json(data=payload)


@app.command()
def loadtest(state: Path = typer.Option(..., "--state"), model: str = typer.Option(..., "--model"),
             users: str = typer.Option("4", "--users", help="Concurrent users; a list (1,4,16) sweeps levels."),
             spawn_rate: Optional[float] = typer.Option(None, "--spawn-rate", help="Users started per second."),
             duration: str = typer.Option("30s", "--duration", help="Per level, e.g. 30s or 2m."),
             slo_p95_ms: Optional[float] = typer.Option(None, "--slo-p95-ms", help="Fail if p95 latency exceeds this."),
             max_failure_ratio: float = typer.Option(0.0, "--max-failure-ratio"),
             min_agreement: Optional[float] = typer.Option(None, "--min-agreement",
                                                           help="Fail if fewer labels agree with the reference "
                                                                "(default: the precision's; FP32 1.0)."),
             max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel, output_tol: List[str] = TolOut,
             max_prob_diff: Optional[float] = typer.Option(None, "--max-prob-diff",
                                                           help="Override the precision's bound on served "
                                                                "probabilities vs the reference's."),
             data: Optional[str] = DataOpt,
             warmup: Optional[str] = typer.Option(None, "--warmup", help="Left out of every statistic at the start "
                                                                         "of each level (default: a tenth, <= 5s)."),
             workers: int = typer.Option(0, "--workers", help="Distributed Locust: a master and K workers on loopback."),
             rate: Optional[float] = typer.Option(None, "--rate", min=0.1,
                                                  help="Fixed total requests/s (soak test) instead of back-to-back."),
             kill_worker_at: Optional[str] = typer.Option(None, "--kill-worker-at",
                                                          help="Kill one TorchServe worker this far into each level "
                                                               "(e.g. 20s) and measure recovery."),
             max_recovery_s: Optional[float] = typer.Option(None, "--max-recovery-s",
                                                            help="With --kill-worker-at: fail if recovery takes longer."),
             max_memory_growth: Optional[float] = typer.Option(None, "--max-memory-growth",
                                                               help="Fail if worker memory grows more than this "
                                                                    "fraction after warm-up (e.g. 0.1)."),
             reference: Optional[Path] = typer.Option(None, help="Reference model (default: the served artifact's)."),
             out: Optional[Path] = typer.Option(None, "--out", help="Where CSV/HTML reports go (default STATE/loadtest-MODEL)."),
             json_path: Optional[Path] = JsonOpt):
    """Locust load test of a served model: latency, and every answer checked against the reference."""
    from .loadtests.runner import loadtest as run, parse_duration
    from .loadtests.summary import Gates
    from .models import data as datasets

    gates = Gates(slo_p95_ms, max_failure_ratio, min_agreement, max_recovery_s, max_memory_growth)
    levels = _int_list(users, "--users")
    secs = parse_duration(duration)
    kill_at = parse_duration(kill_worker_at) if kill_worker_at else None
    judge = judge_opts(max_abs_diff, min_agreement, None, rtol, output_tol, False)
    with err.status(f"load-testing {model} ({', '.join(map(str, levels))} users, {duration} each)…"):
        result = run(state, model, out or Path(state) / f"loadtest-{model}", users=levels, spawn_rate=spawn_rate,
                     duration_s=secs, workers=workers, gates=gates, reference=reference, rate=rate,
                     kill_worker_at_s=kill_at, warmup_s=parse_duration(warmup) if warmup else None,
                     data=datasets.resolve(data), overrides={**judge["overrides"], "max_prob_diff": max_prob_diff},
                     per_output=judge["per_output"])
    t = Table(title=f"loadtest {model} vs {Path(result['reference']).name}"
              + (f" ({workers} Locust workers)" if workers else ""))
    for c in ("users", "requests", "failures", "rps", "p50 ms", "p95 ms", "p99 ms", "checked", "mismatches",
              "agreement", "max |Δ|", "p99 |Δ|", "passed"):
        t.add_column(c, justify="right")
    for lv in result["levels"]:
        t.add_row(str(lv["users"]), str(lv["requests"]), str(lv["failures"]), _fmt(lv["rps"], ".1f"),
                  _fmt(lv["p50_ms"], ".2f"), _fmt(lv["p95_ms"], ".2f"), _fmt(lv["p99_ms"], ".2f"), str(lv["checked"]),
                  str(lv["mismatches"]), _fmt(lv["top1_agreement"]), _fmt(lv["max_abs_diff"], ".2g"),
                  _fmt(lv["p99_abs_diff"], ".2g"), "[green]yes[/]" if lv["passed"] else "[red]NO[/]")
    console.print(t)
    for lv in result["levels"]:
        f, m = lv.get("fault"), lv.get("memory") or {}
        if f:
            console.print(f"users={lv['users']}: worker {f.get('killed_pid')} killed at {f.get('killed_at_s')} s; "
                          f"recovered in {f.get('recovery_s')} s (replacement ready {f.get('worker_replaced_s')} s), "
                          f"answer after recovery correct: {f.get('answer_after_recovery_correct')}; "
                          f"{lv['failures']} of {lv['requests']} requests failed" + (f"; {f['error']}" if "error" in f else ""))
        if m.get("growth") is not None:
            console.print(f"users={lv['users']}: worker memory {m['start_mb']:.0f} -> {m['end_mb']:.0f} MiB "
                          f"({m['growth']:+.1%}, peak {m['peak_mb']:.0f} MiB, {m['samples']} samples)")
    for line in result["kernels_differ"]:
        console.print(f"[yellow]served elsewhere than judged[/]: {line}; this load test's checked answers are the "
                      "evidence for the serving machine")
    slim = {**result, "levels": [{k: v for k, v in lv.items() if k != "latencies_ms"} for lv in result["levels"]]}
    slim.pop("latencies_ms", None)
    write_json(json_path, slim)
    if not result["passed"]:
        raise GateError("load test gates failed: " + "; ".join(result["gate_failures"]), slim, kind=result["kind"])


@app.command()
def tune(sources: List[Path] = typer.Argument(..., help="Artifact folders, or a run folder from modelship pipeline "
                                                       "(its artifacts that passed their gates)."),
         slo_p95_ms: float = typer.Option(..., "--slo-p95-ms", help="The p95 latency target, in ms."),
         out: Path = typer.Option(..., "--out", help="Where tune.json, pareto.png, the winner's .mar and its "
                                                     "model-config.yaml go."),
         budget_minutes: float = typer.Option(10.0, "--budget-minutes", min=0.1, help="Stop searching after this."),
         seconds: float = typer.Option(5.0, "--seconds", min=1.0, help="Load-test time per concurrency level."),
         batch_sizes: str = typer.Option("1,4,8,16", "--batch-sizes", help="TorchServe batch sizes to try."),
         delays: str = typer.Option("1,2,5,10", "--batch-delays-ms", help="Batch delays (ms) to try when batching."),
         workers: Optional[str] = typer.Option(None, "--workers", help="Worker counts to try (default: 1,2,4.. up to "
                                                                       "the cores)."),
         threads: Optional[str] = typer.Option(None, "--threads", help="Threads per worker to try (default: 1,2,4.. "
                                                                       "up to the cores)."),
         max_users: int = typer.Option(64, "--max-users", min=1, help="Highest concurrency tried."),
         data: Optional[str] = DataOpt, json_path: Optional[Path] = JsonOpt):
    """Find the served configuration (variant, batch size, batch delay, workers, threads) with the most
    requests/s inside a p95 SLO, against the real TorchServe with real Locust, every answer checked."""
    from .models import data as datasets
    from .tune import Space, TuneOptions, tune as run

    space = Space(workers=tuple(_int_list(workers, "--workers")) if workers else (),
                  threads=tuple(_int_list(threads, "--threads")) if threads else (),
                  batch_sizes=tuple(_int_list(batch_sizes, "--batch-sizes")),
                  delays_ms=tuple(_int_list(delays, "--batch-delays-ms")), max_users=max_users)
    opts = TuneOptions(slo_p95_ms=slo_p95_ms, budget_s=budget_minutes * 60, seconds=seconds, space=space,
                       data=datasets.resolve(data))
    try:
        with err.status("tuning…") as status:
            result = run(sources, out, opts, log=lambda msg: (status.update(msg.strip()), err.print(msg)))
    except GateError as e:
        if e.result:
            _tune_table(e.result)
            write_json(json_path, e.result)
        raise
    _tune_table(result)
    b = result["best"]
    console.print(f"best: {b['name']} — {b['rps']:.1f} req/s at {b['users']} users, p95 {b['p95_ms']:.1f} ms "
                  f"(SLO {slo_p95_ms:g} ms); serve it: modelship serve {out / 'model-store'} --state STATE")
    console.print(f"{len(result['trials'])} configurations measured in {result['seconds']:.0f} s, "
                  f"{len(result['skipped'])} not tried (dominated, oversubscribed or past the budget); "
                  f"plot: {result['plot']}")
    write_json(json_path, result)


def _tune_table(result: dict) -> None:
    front = {t["name"] for t in result["pareto"]}
    t = Table(title=f"tune: SLO p95 {result['slo_p95_ms']:g} ms, {result['cores']} cores")
    for c in ("configuration", "users", "rps", "p50 ms", "p95 ms", "p99 ms", "checked", "agreement", "max |Δ|",
              "size MB", "result"):
        t.add_column(c, justify="left" if c in ("configuration", "result") else "right")
    for r in result["trials"]:
        verdict = ("[green]Pareto[/]" if r["name"] in front else "[green]ok[/]") if r["passed"] else \
            f"[red]{escape(r['reason'][:60])}[/]"
        t.add_row(r["name"], str(r["users"]), _fmt(r["rps"], ".1f"), _fmt(r["p50_ms"], ".2f"), _fmt(r["p95_ms"], ".2f"),
                  _fmt(r["p99_ms"], ".2f"), str(r["checked"]), _fmt(r["agreement"]), _fmt(r["max_abs_diff"], ".2g"),
                  _fmt(r["size_mb"], ".2f"), verdict)
    console.print(t)


@app.command()
def pipeline(source: Optional[Path] = typer.Argument(None, help="Your model: a Hugging Face folder, a .pt2 file, a "
                                                                "torch artifact or torchvision:NAME with --weights "
                                                                "(default: the built-in models)."),
             data: Optional[str] = DataOpt, task: Optional[str] = TaskOpt, allow_weak: bool = WeakOpt,
             weights: Optional[Path] = WeightsOpt, output_names: Optional[str] = OutputNamesOpt,
             out: Path = typer.Option(Path("runs/demo"), "--out"),
             variants: Optional[str] = typer.Option(None, "--variants", help="Comma-separated: which of int8-dynamic, "
                                                    "int8-static, fp16, student to make besides torch and onnx "
                                                    "(default: all; student only for digits models)."),
             loadtest_seconds: float = typer.Option(10.0, help="Load-test duration per served variant."),
             users: int = typer.Option(4, help="Concurrent Locust users per load test."),
             accuracy_budget: float = typer.Option(0.01, help="Accuracy drop allowed when picking the fastest variant."),
             text: bool = typer.Option(True, "--text/--no-text", help="Also the built-in text model, served and "
                                                                      "load-tested with raw text (without SOURCE)."),
             tune_minutes: float = typer.Option(1.0, "--tune-minutes", min=0.0,
                                                help="modelship tune over the served variants for this long; its "
                                                     "winner is the report's recommendation (0: no tuning)."),
             slo_p95_ms: Optional[float] = typer.Option(None, "--slo-p95-ms", help="tune's p95 target (default: "
                                                        "twice the lowest p95 the load tests measured)."),
             json_path: Optional[Path] = JsonOpt):
    """The whole flow — export, INT8/FP16 variants, archive, serve, load tests with every answer checked — on
    SOURCE and its --data, or on the built-in digits CNN and text model; ends in report.json / .md / .html."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import pipeline as pl

    from .models.checkpoints import TORCHVISION

    if source is not None and not str(source).startswith(TORCHVISION) and not source.exists():
        raise ArtifactError(f"{source}: no such file or directory; expected a Hugging Face folder, a .pt2 file or a "
                            "torch artifact")
    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants is not None else None
    unknown = sorted(set(chosen or ()) - set(pl.OPTIONAL))
    if unknown:
        raise ModelshipError(f"--variants {variants}: unknown {', '.join(unknown)}; expected some of "
                             f"{', '.join(pl.OPTIONAL)} (torch and onnx are always made)")
    cfg = pl.PipelineConfig(source=str(source) if source else None, data=data, task=task, allow_weak=allow_weak,
                            weights=str(weights) if weights else None, output_names=_names(output_names),
                            variants=chosen, loadtest_seconds=loadtest_seconds, users=users, accuracy_budget=accuracy_budget, text=text,
                            tune_minutes=tune_minutes, slo_p95_ms=slo_p95_ms)
    colors = {"ok": "green", "failed": "red", "skipped": "yellow"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} steps"),
                  TimeElapsedColumn(), console=err) as prog:
        bar = prog.add_task("pipeline", total=None)

        def tick(s):
            prog.console.print(f"[{colors[s.status]}]{s.status:>7}[/] {s.name} ({s.seconds} s)"
                               + (f" — {escape(s.error)}" if s.error else ""))
            prog.update(bar, advance=1)

        report = pl.run(out, cfg, progress=tick)
    from .report import COLS, cell, verdict

    t = Table(title=f"pipeline {report['model']}")
    for _, h, _ in COLS:
        t.add_column(h, justify="right")
    for r in report["variants"]:
        t.add_row(*[cell(r[k], f) for k, _, f in COLS])
    console.print(t)
    console.print(verdict(report))
    console.print(f"report: {Path(out).resolve() / 'report.html'} (and report.md, report.json)")
    write_json(json_path, report)
    if not report["passed"]:
        raise GateError(f"pipeline steps failed: {', '.join(report['failed_steps'])} (details in the report)")


def _names(text: Optional[str]) -> Optional[list]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _int_list(text: str, opt: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ModelshipError(f"{opt} '{text}': expected comma-separated whole numbers, e.g. 1,8,32") from None
    if not vals or min(vals) < 1:
        raise ModelshipError(f"{opt} '{text}': expected whole numbers ≥ 1")
    return vals


def main() -> None:
    from .signals import Stopped, stopping

    received = None
    try:
        with stopping() as received:  # SIGTERM / SIGHUP / SIGINT run the cleanup that stops what a command started
            code = app(standalone_mode=False)  # typer answers a KeyboardInterrupt (Stopped is one) with 130
        if received.signum is not None:
            if code not in (None, 0):  # a foreground serve that stopped on its signal returns normally
                err.print(f"stopped by {signal.Signals(received.signum).name}; what this command started was stopped")
                sys.exit(received.exit_code)
        elif isinstance(code, int) and code:
            sys.exit(code)
    except Stopped as e:
        err.print(f"{e}; what this command started was stopped")
        sys.exit(e.exit_code)
    except ModelshipError as e:
        if STATE["debug"]:
            raise
        if isinstance(e, ParityError) and getattr(e, "record", None):
            console.print(parity_table([e.record], "parity (FAILED)"))
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 — the CLI never shows a traceback unless --debug
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):  # click turns KeyboardInterrupt into Abort
            if isinstance(e.__cause__, Stopped):
                err.print(f"{e.__cause__}; what this command started was stopped")
                sys.exit(e.__cause__.exit_code)
            sys.exit(130 if isinstance(e.__cause__, KeyboardInterrupt) else 1)
        if STATE["debug"] or "--debug" in sys.argv:
            raise
        err.print(f"[red]error:[/] unexpected {type(e).__name__}: {escape(str(e).splitlines()[0]) if str(e) else ''} "
                  "(run with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
