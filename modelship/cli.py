"""The ``modelship`` command line: argument parsing and printing around the Python API (``modelship.api``). Each
command prints a rich summary, writes ``--json`` and exits 0 only when it succeeded and its gates passed."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import api, tables
from .cli_options import (DataOpt, DeviceOpt, JsonOpt, NamesOpt, O, ProviderOpt, TaskOpt, TolAbs, TolAgree, TolDrop,
                          TolOut, TolRel, WeakOpt, WeightsOpt, int_list, names, judge, judged)
from .errors import GateError, ModelshipError, ParityError
from .exporters import DEFAULT_OPSET
from .tables import parity_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Take a trained PyTorch model to production and prove it still gives the same answers.")
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)
STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")):
    STATE["debug"] = debug


def write_json(path: Optional[Path], payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


@app.command()
def train(arch: str = typer.Argument(..., help="Zoo architecture: mlp, mlp-small, cnn, cnn-small, text."),
          out: Path = O(..., "--out", help="Artifact directory to write."), seed: int = O(0, help="Random seed."),
          epochs: Optional[int] = O(None, help="Override the recipe's epochs."), json_path: Optional[Path] = JsonOpt):
    """Train a zoo model on its shipped data (or build it from its config) into a torch artifact."""
    from rich.progress import Progress

    from .models.train import train_artifact

    with Progress(console=err, transient=True) as prog:
        task = prog.add_task(f"training {arch}", total=None)
        art = train_artifact(arch, out, seed, epochs, progress=lambda e, n: prog.update(task, completed=e, total=n))
    ex = art.manifest.extra
    console.print(f"[bold]{art.manifest.name}[/] → {art.path}  parameters {ex['parameters']:,}  trained in "
                  f"{ex['train_seconds']} s" + (f"  test accuracy {ex['test_accuracy']:.4f}" if "test_accuracy" in ex else ""))
    # the figures a user checks first, at the top (the manifest keeps them in "extra" too)
    figures = ("test_accuracy", "majority_baseline", "seed", "test_samples", "train_samples", "cached")
    write_json(json_path, {**{k: ex[k] for k in figures if k in ex}, **art.manifest.to_dict()})


@app.command()
@judged
def export(src: str = typer.Argument(..., help="Artifact dir, .pt2 file, Hugging Face dir, or torchvision:NAME."),
           out: Path = O(..., "--out"), opset: int = O(DEFAULT_OPSET, "--opset", min=13, max=23),
           exporter: Optional[str] = O(None, help="torchscript or dynamo (default: per source kind)."),
           data: Optional[str] = DataOpt, task: Optional[str] = TaskOpt, weights: Optional[Path] = WeightsOpt,
           output_names: Optional[str] = NamesOpt, provider: Optional[str] = ProviderOpt,
           json_path: Optional[Path] = JsonOpt, judge=None):
    """Export to ONNX, then gate on parity with the root PyTorch model (and, for a student, with itself)."""
    art = api.export(src, out, data=data, task=task, weights=weights, output_names=names(output_names), opset=opset,
                     exporter=exporter, provider=provider, json_path=json_path, log=console.print, judge=judge)
    console.print(parity_table([art.manifest.parity], f"export {art.manifest.name} → {art.path}"))


@app.command()
@judged
def parity(ref: Path = typer.Argument(..., help="Reference: a torch artifact, .pt2 or HF directory."),
           candidates: List[Path] = typer.Argument(..., help="Artifacts to compare with the reference."),
           split: str = O("test", help="Evaluation split."), data: Optional[str] = DataOpt,
           provider: Optional[str] = ProviderOpt, device: str = DeviceOpt, json_path: Optional[Path] = JsonOpt,
           judge=None):
    """Parity records for any artifacts against a reference model."""
    results = api.parity(list(candidates), ref, data=data, split=split, provider=provider, device=device, judge=judge)
    records = [r.record for r in results]
    write_json(json_path, records if len(records) > 1 else records[0])
    console.print(parity_table(records), *tables.batch_lines(records), sep="\n")
    failed = [r for r in results if not r.passed]
    if failed:
        raise ParityError("; ".join(f"{Path(r.artifact).name}: {r.reason}" for r in failed),
                          kind="parity" if any(r.kind == "parity" for r in failed) else "weak")


@app.command()
def bench(artifacts: List[Path] = typer.Argument(...), batch_sizes: str = O("1,32", "--batch-sizes"),
          seconds: float = O(1.0, help="Time per artifact and batch size."), threads: int = O(0),
          seq_len: Optional[int] = O(None, help="Sequence length for text models."), provider: Optional[str] = ProviderOpt,
          device: str = DeviceOpt, json_path: Optional[Path] = JsonOpt):
    """In-process latency (p50/p95/p99) and throughput per artifact and batch size."""
    from .bench import bench as run_bench
    from .runners import open_runner

    results = []
    for a in artifacts:
        runner = open_runner(api.load_artifact(a), provider=provider, device=device, threads=threads)
        results += [{"artifact": str(runner.artifact.path), "backend": runner.backend, "precision": runner.manifest.precision,
                     **row} for row in run_bench(runner, int_list(batch_sizes, "--batch-sizes"), seconds, seq_len)]
    console.print(tables.bench_table(results))
    write_json(json_path, results)


@app.command()
@judged
def quantize(src: Path = typer.Argument(..., help="An ONNX artifact."),
             mode: str = O(..., "--mode", help="dynamic | static | fp16 | optimize"), out: Path = O(..., "--out"),
             per_channel: bool = O(False, "--per-channel", help="Per-channel weight scales."),
             smooth: Optional[float] = O(None, "--smooth", help="dynamic/static: SmoothQuant first, with this alpha "
                                         "(0 < alpha < 1; larger moves more of the activations' outliers into the "
                                         "weights; uses the calibration data)."),
             activations: str = O("per-tensor", "--activations", help="dynamic: per-tensor (one activation scale "
                                  "per batch: fastest, but an answer moves with what it is batched with) or per-row "
                                  "(each sample's activations scaled on their own: MatMulNBits, 8-bit weights)."),
             block_size: int = O(64, "--block-size", help="dynamic, per-row: weights and activations scaled per "
                                 "block of this many along the inner dimension (a power of two, 16 or more)."),
             reduce_range: bool = O(False, "--reduce-range", help="dynamic/static: 7-bit weights, so CPUs without "
                                    "VNNI (AVX2's u8s8 sums saturate at 16 bits) compute the same as those with it."),
             calibration_method: str = O("minmax", help="static: minmax | entropy | percentile"),
             calibration_data: Optional[Path] = O(None, help="static: a .npz, one array per input (default: calib split)"),
             calibration_samples: int = O(256, min=1),
             activation_type: str = O("uint8", help="static: uint8 (asymmetric, best on CPU) or int8 (for TensorRT)"),
             exclude_nodes: str = O("", help="Comma-separated node names to keep in float."),
             exclude_op_types: str = O("", help="Comma-separated op types to keep in float."),
             op_types: str = O("", help="Comma-separated op types to quantize (default: all supported)."),
             fp16_io: bool = O(False, "--fp16-io", help="fp16: make inputs/outputs float16 too."),
             until_parity: bool = O(False, "--until-parity", help="dynamic/static: when the gate fails, try other options, "
                                    "then keep the fewest most sensitive nodes in float until it passes."),
             data: Optional[str] = DataOpt, provider: Optional[str] = ProviderOpt, json_path: Optional[Path] = JsonOpt,
             judge=None):
    """Make an INT8 / FP16 / optimized ONNX variant, then gate on parity with the original PyTorch model."""
    if activation_type not in ("int8", "uint8"):
        raise ModelshipError(f"unknown activation type '{activation_type}'; expected int8 or uint8")
    options = dict(per_channel=per_channel, smooth=smooth, reduce_range=reduce_range, activations=activations,
                   block_size=block_size,
                   calibration_method=calibration_method, calibration_samples=calibration_samples,
                   calibration_data=str(calibration_data) if calibration_data else None, activation_type=activation_type,
                   exclude_nodes=names(exclude_nodes), exclude_op_types=names(exclude_op_types),
                   op_types=names(op_types), keep_io_types=not fp16_io)
    with err.status(f"{mode} variant of {src}" + (", until it passes parity…" if until_parity else "…")) as status:
        art = api.quantize(src, mode, out, options=options, until_parity=until_parity, data=data, provider=provider,
                           json_path=json_path, judge=judge, log=lambda msg: (status.update(f"{mode} until parity: {msg}"),
                                                                              err.print(f"  {msg}")))
    if until_parity:
        console.print(*tables.until_parity_lines(art.manifest.extra["until_parity"]), sep="\n")
    size = art.model_path.stat().st_size / api.load_artifact(src).model_path.stat().st_size
    console.print(parity_table([art.manifest.parity], f"{mode} → {art.path} (file {size:.2f}× the source)"),
                  *tables.batch_lines([art.manifest.parity]), sep="\n")


@app.command()
def distill(teacher: Path = typer.Argument(..., help="A torch artifact with training data: a digits model, the "
                                            "built-in text model, or a Hugging Face text classifier."),
            out: Path = O(..., "--out"),
            student: str = O("mlp-small", help="Digits: the zoo student (mlp-small, cnn-small, mlp)."),
            layers: Optional[int] = O(None, min=1, help="Text: transformer layers the student keeps (default: a "
                                                        "third of the teacher's), initialised from the teacher's."),
            unlabelled: Optional[Path] = O(None, help="Text: more texts to learn the teacher's answers on (a CSV or "
                                                      "JSONL with a text column; labels not needed)."),
            temperature: Optional[float] = O(None, min=0.1, help="Softmax temperature (default 2)."),
            alpha: Optional[float] = O(None, min=0.0, max=1.0, help="Weight of the teacher's answers against the "
                                                                     "labels (default 0.5)."),
            seed: int = O(0), epochs: Optional[int] = O(None), min_agreement: Optional[float] = TolAgree,
            max_accuracy_drop: Optional[float] = TolDrop, allow_weak: bool = WeakOpt, json_path: Optional[Path] = JsonOpt):
    """Train a smaller student with knowledge distillation and gate it against its teacher."""
    with err.status(f"distilling {teacher}…") as status:
        art = api.distill(teacher, out, student=student, temperature=temperature, alpha=alpha, seed=seed, epochs=epochs,
                          layers=layers, unlabelled=unlabelled, log=lambda m: status.update(f"distilling {teacher}: {m}"),
                          json_path=json_path, judge=judge(None, min_agreement, max_accuracy_drop, allow_weak=allow_weak))
    console.print(tables.distill_table(art))
    console.print(parity_table([art.manifest.parity], "student vs teacher"))


@app.command("compile")
@judged
def compile_engine(src: Path = typer.Argument(..., help="An ONNX artifact (FP32, FP16, or static INT8 QDQ)."),
                   out: Path = O(..., "--out"),
                   profile: List[str] = O([], "--profile", help="A dim's range NAME=MIN:OPT:MAX (repeatable)."),
                   workspace_gb: float = O(4.0, help="Builder workspace limit (GiB)."),
                   timing_cache_dir: Optional[Path] = O(None, help="Where timing caches are kept."),
                   json_path: Optional[Path] = JsonOpt, judge=None):
    """Build a TensorRT engine (needs an NVIDIA GPU and TensorRT 10+), then gate on parity."""
    from .exporters.tensorrt import parse_dim_override

    with err.status(f"building a TensorRT engine from {src}…"):
        art = api.compile(src, out, profile=dict(parse_dim_override(p) for p in profile), workspace_gb=workspace_gb,
                          timing_cache_dir=timing_cache_dir, json_path=json_path, judge=judge)
    console.print(parity_table([art.manifest.parity], f"compile → {art.path}"))


@app.command()
def archive(artifact: Path = typer.Argument(..., help="Any artifact directory (torch, onnx, int8/fp16, tensorrt)."),
            out: Path = O(..., "--out", help="Model store folder to write NAME.mar into."),
            name: Optional[str] = O(None, help="Model name in URLs (default: the artifact folder name)."),
            batch_size: int = O(8, min=1, help="TorchServe dynamic batch size."),
            max_batch_delay_ms: int = O(5, min=0, help="How long TorchServe waits to fill a batch (ms; 1 or more)."),
            workers: Optional[int] = O(None, min=1, help="Worker processes (default: from the machine and model)."),
            threads: Optional[int] = O(None, min=1, help="Threads per worker (default: from the machine and model)."),
            response_timeout_s: int = O(30, min=1), max_items: int = O(64, min=1, help="Most samples per request."),
            provider: Optional[str] = ProviderOpt, device: str = DeviceOpt, json_path: Optional[Path] = JsonOpt,
            force: bool = O(False, "--force", help="Archive even without a passed parity record."),
            version: str = O("1.0", "--version", help="Model version (modelship promote registers a new one)."),
            shadow_rate: float = O(0.0, min=0.0, max=1.0, help="Fraction of live requests re-run on the reference "
                                   "and judged (shadow parity; 0: off)."),
            shadow_reference: Optional[Path] = O(None, help="FP32 artifact the shadow runs (default: the root "
                                                 "PyTorch model)."),
            shadow_capture: Optional[Path] = O(None, help="Folder for the inputs of shadow mismatches (0600 .npz "
                                               "files modelship parity --data replays; off unless given)."),
            shadow_capture_mb: float = O(64.0, min=0.0, help="Most MB the captured inputs may take."),
            shadow_queue: int = O(256, min=1, help="Shadow samples waiting per worker; more are dropped and counted.")):
    """Pack an artifact into a TorchServe .mar (model file, manifest, handler, model config)."""
    import zipfile

    import yaml
    mar = api.archive(artifact, out, name=name, batch_size=batch_size, max_batch_delay_ms=max_batch_delay_ms,
                      workers=workers, threads=threads, response_timeout_s=response_timeout_s, max_items=max_items,
                      provider=provider, device=device, force=force, version=version, shadow_rate=shadow_rate,
                      shadow_reference=shadow_reference, shadow_capture=shadow_capture,
                      shadow_capture_mb=shadow_capture_mb, shadow_queue=shadow_queue)
    cfg = yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))
    console.print(f"{cfg['minWorkers']} worker(s) × {cfg['handler']['threads']} thread(s)"
                  + (" (from this machine and model)" if workers is None or threads is None else ""))
    if shadow_rate:
        console.print(f"shadow parity: {shadow_rate:g} of requests re-run on the reference packed inside")
    console.print(f"archived {artifact} → {mar} ({mar.stat().st_size / 1e6:.2f} MB)")
    write_json(json_path, {"mar": str(mar), "name": mar.stem, "config": cfg})


@app.command()
def serve(store: Optional[Path] = typer.Argument(None, help="Model store with .mar files."),
          state: Path = O(..., "--state", help="Folder for config, logs and serve.json."),
          detach: bool = O(False, "--detach", help="Return once ready."), stop: bool = O(False, "--stop"),
          rotate_token: bool = O(False, "--rotate-token", help="Replace the running server's token(s)."),
          token_type: str = O("inference", "--token-type", help="With --rotate-token: inference, management, both."),
          port: int = O(8080, "--port", help="Inference port; management, metrics, gRPC = PORT+1..PORT+4; shadow metrics PORT+5; "
                   "Open Inference Protocol v2 REST, gRPC = PORT+6, PORT+7."),
          max_request_bytes: int = O(1 << 20, help="Bodies over this get HTTP 413."),
          job_queue_size: int = O(100, help="Queued requests per model before TorchServe answers 503."),
          token_expiration_min: int = O(24 * 60), no_auth: bool = O(False, "--no-auth", help="Not for production."),
          startup_timeout_s: float = O(120, help="Give up if models are not ready by then."),
          allow_promote: bool = O(False, "--allow-promote", help="Open model registration to the management "
                                  "token's holder (modelship promote)."),
          oip: bool = O(True, "--oip/--no-oip", help="The Open Inference Protocol v2 (REST and gRPC, for Triton and "
                        "KServe clients) on PORT+6 and PORT+7."),
          v2_host: str = O("127.0.0.1", "--v2-host", help="Where the v2 front listens; 0.0.0.0 in a KServe runtime "
                           "container (TorchServe itself stays on 127.0.0.1). Off loopback it needs TLS, or "
                           "--no-auth --insecure-public."),
          v2_tls_cert: Optional[Path] = O(None, "--v2-tls-cert", help="PEM certificate: the v2 front's REST and "
                                          "gRPC speak TLS (with --v2-tls-key)."),
          v2_tls_key: Optional[Path] = O(None, "--v2-tls-key", help="PEM private key of --v2-tls-cert."),
          insecure_public: bool = O(False, "--insecure-public", help="Allow a v2 front off loopback without a "
                                    "token: only behind a proxy or mesh that authorizes requests (KServe)."),
          json_path: Optional[Path] = JsonOpt):
    """Run TorchServe on 127.0.0.1 with token auth on and model registration off."""
    from .serving import lifecycle
    from .serving.state import STATE_FILE

    if stop:
        was = lifecycle.stop(state)
        console.print("stopped" if was else "no server was running; state cleared")
        return write_json(json_path, {"stopped": was, "state": str(state)})
    if rotate_token:
        info = lifecycle.rotate_token(state, ("inference", "management") if token_type == "both" else (token_type,))
        console.print(f"rotated the {token_type} token(s); new values in {Path(state) / STATE_FILE} "
                      f"(inference token expires {info.token_expires})")
        return write_json(json_path, info.public())
    if store is None:
        raise ModelshipError("serve needs a STORE folder of .mar files (or --stop)")
    running = None
    try:
        with err.status("starting TorchServe and waiting for models…"):
            running = api.serve(store, state, port=port, max_request_bytes=max_request_bytes,
                                job_queue_size=job_queue_size, token_expiration_min=token_expiration_min,
                                auth=not no_auth, startup_timeout_s=startup_timeout_s, allow_promote=allow_promote,
                                oip=oip, v2_host=v2_host,
                                v2_tls=(str(v2_tls_cert), str(v2_tls_key)) if v2_tls_cert or v2_tls_key else None,
                                insecure_public=insecure_public)
        if _announce(running, state, json_path, detach):
            return
    except BaseException as e:  # a signal once it was ready (before or in wait()) stops it too; anything else fails
        signalled = isinstance(e, KeyboardInterrupt)  # modelship.signals.Stopped is one
        if running is None:
            raise
        if running.detached and signalled:
            return  # it had detached, as asked: the server runs on
        try:
            running.stop()  # nothing if it was stopped already
        except KeyboardInterrupt:
            pass  # a signal while it stopped: it is stopped, and the first cause stands
        if detach or not signalled:
            raise  # a --detach interrupted before it detached did not do what it was asked: exit 128 + signal
    console.print("stopped")  # a foreground serve stopped by Ctrl-C, SIGTERM or SIGHUP: exit status 0


def _announce(running, state: Optional[Path], json_path: Optional[Path], detach: bool) -> bool:
    """Say where a started server answers, then leave it running (``detach``: True) or wait until it is stopped."""
    from .serving.state import STATE_FILE

    info = running.info
    write_json(json_path, info.public())  # tokens stay in serve.json (0600) only
    console.print(f"serving {', '.join(info.models)} at {info.inference_url}/predictions/NAME "
                  f"(token in {Path(state or running.state) / STATE_FILE}; metrics {info.metrics_url}/metrics and "
                  f"{info.shadow_metrics_url}/metrics)")
    if info.v2_url:
        console.print(f"Open Inference Protocol v2: {info.v2_url}/v2/models/NAME (REST), {info.v2_grpc_address} "
                      "(gRPC); the same token")
    if detach:
        running.detach()  # it keeps running; `serve --stop` stops it
        return True
    running.wait()  # until Ctrl-C, SIGTERM or SIGHUP: TorchServe and its workers stop with it
    return False


def _body_from_file(path: Path) -> bytes:
    """A request body from a .json file (sent as is) or a .npy array (one sample or a batch, simple JSON)."""
    import numpy as np

    if not path.is_file():
        raise ModelshipError(f"{path}: no such file; expected a .json request body or a .npy array")
    if path.suffix == ".npy":
        return json.dumps({"inputs": np.load(path, allow_pickle=False).tolist()}).encode()
    return path.read_bytes()


@app.command()
def predict(file: Path = typer.Argument(..., help="A .json request body or a .npy array."),
            state: Path = O(..., "--state"), model: str = O(..., "--model"), json_path: Optional[Path] = JsonOpt):
    """Send one request to the served model and print its answer."""
    from .serving.state import ServerState
    from .serving.torchserve import TorchServe

    info = ServerState.load(state)
    if model not in info.models:
        raise ModelshipError(f"model '{model}' is not served from {state}; served: {', '.join(info.models)}")
    r = TorchServe(info).predict(model, _body_from_file(file))
    payload = r.json() if "json" in r.headers.get("Content-Type", "") else {"code": r.status_code, "message": r.text[:500]}
    write_json(json_path, payload)
    if r.status_code != 200:
        raise ModelshipError(f"HTTP {r.status_code}: {payload.get('message', payload)}")
    console.print_json(data=payload)


@app.command()
def promote(candidate: Optional[Path] = typer.Argument(None, help="The new version's .mar (modelship archive "
                                                      "--name NAME --version V)."),
            state: Path = O(..., "--state", help="State of a server started with --allow-promote."),
            model: str = O(..., "--model", help="The served model the candidate replaces."),
            samples: int = O(200, "--samples", min=1, help="Answers judged before deciding."),
            slo_p95_ms: Optional[float] = O(None, "--slo-p95-ms", help="Refuse a candidate slower than this at p95."),
            min_agreement: Optional[float] = O(None, "--min-agreement", help="Agreement floor (default: the "
                                               "candidate's precision's; FP32 1.0)."),
            reference: Optional[Path] = O(None, help="Reference model (default: the candidate's)."),
            live: Optional[int] = O(None, "--live", min=0, help="Live requests to replay from the current version's "
                                    "shadow samples (default: as many as --samples; 0: none)."),
            rollback: bool = O(False, "--rollback", help="Make the version the last promote replaced the default."),
            json_path: Optional[Path] = JsonOpt):
    """Register a new version beside the served one, judge it on live-path answers, then make it the default or
    unregister it; --rollback undoes the last promote."""
    from dataclasses import asdict

    if not rollback and candidate is None:
        raise ModelshipError("promote needs a CANDIDATE .mar (or --rollback)")
    try:
        res = api.promote(state, model, candidate, samples=samples, slo_p95_ms=slo_p95_ms, min_agreement=min_agreement,
                          reference=reference, live=live, rollback=rollback, log=lambda m: err.print(m, highlight=False))
    except GateError as e:
        console.print(tables.promote_table(e.result))
        write_json(json_path, asdict(e.result))
        raise
    if not rollback:
        console.print(tables.promote_table(res))
    console.print(f"{model}: version {res.version} is the default (was {res.previous})")
    write_json(json_path, asdict(res))


@app.command()
def loadtest(state: Path = O(..., "--state"), model: str = O(..., "--model"),
             users: str = O("4", "--users", help="Concurrent users; a list (1,4,16) sweeps levels."),
             spawn_rate: Optional[float] = O(None, "--spawn-rate"), duration: str = O("30s", help="Per level: 30s, 2m."),
             slo_p95_ms: Optional[float] = O(None, "--slo-p95-ms", help="Fail if p95 latency exceeds this."),
             max_failure_ratio: float = O(0.0, "--max-failure-ratio"),
             min_agreement: Optional[float] = O(None, "--min-agreement", help="Served labels' agreement floor "
                                                "(default: the precision's; FP32 1.0)."),
             max_abs_diff: Optional[float] = TolAbs, rtol: Optional[float] = TolRel, output_tol: List[str] = TolOut,
             max_prob_diff: Optional[float] = O(None, "--max-prob-diff", help="Bound on served probabilities."),
             data: Optional[str] = DataOpt, warmup: Optional[str] = O(None, "--warmup", help="Left out of every "
                                                                      "statistic (default: a tenth, <= 5s)."),
             workers: int = O(0, "--workers", help="Distributed Locust: a master and K workers on loopback."),
             rate: Optional[float] = O(None, "--rate", min=0.1, help="Fixed total requests/s (soak test)."),
             kill_worker_at: Optional[str] = O(None, "--kill-worker-at", help="Kill one worker this far into each level."),
             max_recovery_s: Optional[float] = O(None, "--max-recovery-s", help="Fail if recovery takes longer."),
             max_memory_growth: Optional[float] = O(None, "--max-memory-growth", help="e.g. 0.1: worker RSS growth cap."),
             reference: Optional[Path] = O(None, help="Reference model (default: the served artifact's)."),
             out: Optional[Path] = O(None, "--out", help="Where CSV/HTML reports go (default STATE/loadtest-MODEL)."),
             protocol: str = O("predictions", "--protocol", help="predictions (/predictions/MODEL) or v2 (the Open "
                               "Inference Protocol's /v2/models/MODEL/infer)."),
             json_path: Optional[Path] = JsonOpt):
    """Locust load test of a served model: latency, and every answer checked against the reference."""
    with err.status(f"load-testing {model} ({users} users, {duration} each)…"):
        res = api.loadtest(state, model, users=int_list(users, "--users"), duration=duration, out=out, data=data,
                           slo_p95_ms=slo_p95_ms, max_failure_ratio=max_failure_ratio, min_agreement=min_agreement,
                           max_recovery_s=max_recovery_s, max_memory_growth=max_memory_growth, reference=reference,
                           rate=rate, kill_worker_at=kill_worker_at, warmup=warmup, workers=workers, spawn_rate=spawn_rate,
                           max_prob_diff=max_prob_diff, judge=judge(max_abs_diff, min_agreement, None, rtol, output_tol),
                           protocol=protocol)
    r = res.record
    console.print(tables.loadtest_table(r, model, workers), *tables.loadtest_lines(r), sep="\n")
    write_json(json_path, r)
    if not res.passed:
        raise GateError("load test gates failed: " + res.reason, r, kind=res.kind)


@app.command()
def tune(sources: List[Path] = typer.Argument(..., help="Artifact folders, or a run folder from modelship pipeline."),
         slo_p95_ms: float = O(..., "--slo-p95-ms", help="The p95 latency target, in ms."),
         out: Path = O(..., "--out", help="Where tune.json, pareto.png and the winner's .mar go."),
         budget_minutes: float = O(10.0, "--budget-minutes", min=0.1, help="Stop searching after this."),
         seconds: float = O(5.0, "--seconds", min=1.0, help="Load-test time per concurrency level."),
         batch_sizes: str = O("1,4,8,16", "--batch-sizes"), delays: str = O("1,2,5,10", "--batch-delays-ms"),
         workers: Optional[str] = O(None, "--workers", help="Worker counts to try (default: 1,2,4.. up to the cores)."),
         threads: Optional[str] = O(None, "--threads", help="Threads per worker to try (default: up to the cores)."),
         max_users: int = O(64, "--max-users", min=1), data: Optional[str] = DataOpt, json_path: Optional[Path] = JsonOpt):
    """Find the served configuration (variant, batch size, batch delay, workers, threads) with the most
    requests/s inside a p95 SLO, against the real TorchServe with real Locust, every answer checked."""
    with err.status("tuning…") as status:
        res = api.tune(sources, out, slo_p95_ms, budget_minutes=budget_minutes, seconds=seconds, data=data,
                       batch_sizes=int_list(batch_sizes, "--batch-sizes"), delays_ms=int_list(delays, "--batch-delays-ms"),
                       workers=int_list(workers, "--workers") if workers else (), max_users=max_users,
                       threads=int_list(threads, "--threads") if threads else (),
                       log=lambda msg: (status.update(msg.strip()), err.print(msg)))
    r = res.record
    console.print(tables.tune_table(r))
    write_json(json_path, r)
    if not res.passed:
        raise GateError(res.reason, r, kind=res.kind)
    b = res.best
    console.print(f"best: {b['name']} — {b['rps']:.1f} req/s at {b['users']} users, p95 {b['p95_ms']:.1f} ms (SLO "
                  f"{slo_p95_ms:g} ms); serve it: modelship serve {out / 'model-store'} --state STATE\n"
                  f"{len(r['trials'])} configurations measured in {r['seconds']:.0f} s, {len(r['skipped'])} not tried "
                  f"(dominated, oversubscribed or past the budget); plot: {r['plot']}")


@app.command()
def pipeline(source: Optional[str] = typer.Argument(None, help="A Hugging Face folder, a .pt2, a torch artifact or "
                                                               "torchvision:NAME (default: the built-in models)."),
             data: Optional[str] = DataOpt, task: Optional[str] = TaskOpt, allow_weak: bool = WeakOpt,
             weights: Optional[Path] = WeightsOpt, output_names: Optional[str] = NamesOpt, out: Path = O(Path("runs/demo")),
             variants: Optional[str] = O(None, "--variants", help="Which of int8-dynamic,int8-static,fp16,student "
                                         "to make besides torch and onnx (default: all)."),
             loadtest_seconds: float = O(10.0, help="Load-test duration per served variant."), users: int = O(4),
             accuracy_budget: float = O(0.01, help="Accuracy drop allowed when picking the fastest variant."),
             text: bool = O(True, "--text/--no-text", help="Also the built-in text model (without SOURCE)."),
             tune_minutes: float = O(1.0, "--tune-minutes", min=0.0, help="modelship tune for this long (0: none)."),
             slo_p95_ms: Optional[float] = O(None, "--slo-p95-ms", help="tune's target (default: 2x the lowest p95)."),
             json_path: Optional[Path] = JsonOpt):
    """The whole flow — export, INT8/FP16 variants, archive, serve, load tests with every answer checked — on
    SOURCE and its --data, or on the built-in digits CNN and text model; ends in report.json / .md / .html."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .report import verdict

    colors = {"ok": "green", "failed": "red", "skipped": "yellow"}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} steps"),
                  TimeElapsedColumn(), console=err) as prog:
        bar = prog.add_task("pipeline", total=None)

        def tick(s):
            prog.console.print(f"[{colors[s.status]}]{s.status:>7}[/] {s.name} ({s.seconds} s)"
                               + (f" — {escape(s.error)}" if s.error else ""))
            prog.update(bar, advance=1)

        res = api.pipeline(out, source, progress=tick, data=data, task=task, allow_weak=allow_weak, users=users,
                           weights=str(weights) if weights else None, output_names=names(output_names), text=text,
                           variants=tuple(names(variants)) if variants is not None else None, slo_p95_ms=slo_p95_ms,
                           loadtest_seconds=loadtest_seconds, accuracy_budget=accuracy_budget, tune_minutes=tune_minutes)
    report = res.report
    console.print(tables.pipeline_table(report), verdict(report), f"report: {Path(out).resolve() / 'report.html'} (and "
                  "report.md, report.json)", sep="\n")
    write_json(json_path, report)
    if not res.passed:
        raise GateError(f"pipeline steps failed: {', '.join(res.failed_steps)} (details in the report)", report,
                        kind=res.kind or "errors")


def main() -> None:
    import click

    from .signals import stopping

    try:
        with stopping() as received:  # SIGTERM / SIGHUP / SIGINT run the cleanup that stops what a command started
            code = app(standalone_mode=False)  # typer answers a KeyboardInterrupt (a signal here) with 130
        if received.signum is not None and code not in (None, 0):  # a foreground serve stopped on it returns None
            err.print(f"stopped by {signal.Signals(received.signum).name}; what this command started was stopped")
            sys.exit(received.exit_code)
        if isinstance(code, int) and code:
            sys.exit(code)
    except ModelshipError as e:
        if STATE["debug"]:
            raise
        if isinstance(e, ParityError) and getattr(e, "record", None):
            console.print(parity_table([e.record], "parity (FAILED)"))
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except KeyboardInterrupt as e:  # a signal after the command's own block closed: no traceback, 128 + signal
        sys.exit(getattr(e, "exit_code", 130))
    except Exception as e:  # noqa: BLE001 — the CLI never shows a traceback unless --debug
        if STATE["debug"] or "--debug" in sys.argv:
            raise
        err.print(f"[red]error:[/] unexpected {type(e).__name__}: {escape(str(e).splitlines()[0]) if str(e) else ''} "
                  "(run with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(3)


def __getattr__(name: str):
    """``modelship.cli.command``: the app as a click command, what the docs' CLI reference renders (mkdocs-click)."""
    if name == "command":
        return typer.main.get_command(app)
    raise AttributeError(name)


if __name__ == "__main__":
    main()
