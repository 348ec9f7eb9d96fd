import os
import subprocess
import sys

import pytest

import modelship as ms

pytest_plugins = ["pytester"]  # tests/test_plugin.py runs pytest --modelship on a project of its own

os.environ.setdefault("OMP_NUM_THREADS", "1")  # three workers on two cores: one compute thread each, no spinning pools


SERVERS = {"served", "sturdy", "shadow_server"}  # fixtures that start a TorchServe: their tests share one worker
FIRST = ("test_readme.py", "test_pipeline.py", "test_tune.py")  # the longest runs start first, so no worker waits on them at the end


def pytest_report_header(config):
    """The CPU features that choose ONNX Runtime's INT8 kernels, so any failure names its kernel family."""
    from modelship.machine import kernel_facts

    f = kernel_facts()
    return [f"modelship kernels: {f['kernels']} (flags: {' '.join(f['flags']) or 'none'}; cpu: {f['cpu']}; "
            f"onnxruntime {f['onnxruntime']})"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group markers set here
def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    items.sort(key=lambda item: item.path.name not in FIRST)
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
        for fixture in SERVERS.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group(fixture))  # under xdist --dist loadgroup: one worker, one server


def cli(*args, check=None):
    """Run the real CLI (``modelship.cli.main``, what the console script calls) with these arguments, in this
    process: the same code path without a fresh interpreter's ~4 s of imports per call. Returns a
    CompletedProcess (text). The README test and the pipeline test run the console script itself."""
    import contextlib
    import io

    from modelship import cli as entry

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["modelship", *map(str, args)]
    entry.STATE["debug"] = False
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    p = subprocess.CompletedProcess(sys.argv[:1] + list(map(str, args)), code, out.getvalue(), err.getvalue())
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def cli_process(*args, check=None, timeout=600):
    """The console entry point in a fresh interpreter (``python -m modelship``)."""
    p = subprocess.run([sys.executable, "-m", "modelship", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


SECRET_FILES = ("serve.json", "key_file.json")  # the only files that may ever hold a token


def files_holding(secrets, *roots) -> list:
    """Every file under ``roots`` (but serve.json and TorchServe's key_file.json) whose bytes hold one of
    ``secrets``: logs, --json results, Locust specs and reports, the report, manifests, archives."""
    import pathlib

    needles = [s.encode() for s in secrets if s]
    assert needles, "no secret to look for"
    found = []
    for root in roots:
        for f in pathlib.Path(root).rglob("*"):
            if f.is_file() and f.name not in SECRET_FILES and any(n in f.read_bytes() for n in needles):
                found.append(f)
    return found


def label_shifted(onnx_folder, dst):
    """A copy of an ONNX artifact whose classifier (its last Gemm) has its rows rolled by one class: every label
    moves. Re-hashed, so it loads as a well-formed artifact that gives wrong answers."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from modelship.manifest import load_artifact, write_artifact

    shutil.copytree(onnx_folder, dst)
    model = onnx.load(str(dst / "model.onnx"))
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for init in model.graph.initializer:
        if init.name in last.input[1:]:
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
    onnx.save(model, str(dst / "model.onnx"))
    return write_artifact(dst, load_artifact(dst, verify=False).manifest)


def rewrite_mar(src, dst, edit=None, add=None, drop=None):
    """Copy a .mar, passing each member through ``edit(name, data) -> data``, leaving out ``drop`` and adding
    ``add`` members: how tests tamper with archives."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename == drop:
                continue
            data = zin.read(item.filename)
            zout.writestr(item, edit(item.filename, data) if edit else data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)


@pytest.fixture(params=["default", "exact"])
def int8_kernels(request, monkeypatch):
    """A test asserting an INT8 verdict runs twice: with ONNX Runtime's INT8 kernels for this CPU, and with its exact
    INT8 arithmetic ($MODELSHIP_INT8_EXACT=1), which computes what AVX-512 VNNI and AMX CPUs compute. On an AVX2 CPU
    (whose fast u8s8 kernels saturate 16-bit sums) that is both kernel families; on a VNNI CPU both runs are exact."""
    if request.param == "exact":
        monkeypatch.setenv("MODELSHIP_INT8_EXACT", "1")
    else:
        monkeypatch.delenv("MODELSHIP_INT8_EXACT", raising=False)
    return request.param


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """``shared(name, make)``: the artifact (or folder) ``make(dir)`` builds, made once per test session and used read-only by
    every xdist worker (the first to ask builds it under a file lock; the others open what it wrote)."""
    import shutil

    from filelock import FileLock

    from modelship.manifest import load_artifact

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-zoo"
    root.mkdir(exist_ok=True)

    def get(name, make):
        out, done = root / name, root / f"{name}.done"
        with FileLock(str(root / f"{name}.lock")):
            if not done.exists():
                shutil.rmtree(out, ignore_errors=True)  # a build that failed half-way is made again
                make(out)
                done.touch()
        return load_artifact(out) if (out / "manifest.json").is_file() else out
    return get


@pytest.fixture(scope="session")
def cnn(shared):
    from modelship.models.train import train_artifact
    return shared("cnn", lambda out: train_artifact("cnn", out))


@pytest.fixture(scope="session")
def cnn_onnx(shared, cnn):
    return shared("cnn-onnx", lambda out: ms.export(cnn, out))


@pytest.fixture(scope="session")
def text(shared):
    """A small randomly initialised BERT sequence classifier (3 labels) with its WordPiece tokenizer, as a
    Hugging Face save_pretrained folder, and reviews.csv (48 real drug reviews with labels) beside it."""
    import hf_models

    def make(out):
        hf_models.text_classifier(out / "hf", "bert")
        hf_models.write_reviews_csv(out / "reviews.csv")
    return shared("text", make) / "hf"


@pytest.fixture(scope="session")
def text_onnx(shared, text):
    """The text classifier exported to ONNX, its tokenizer with it, judged on the raw reviews."""
    return shared("text-onnx", lambda out: ms.export(text, out, data=text.parent / "reviews.csv"))


@pytest.fixture(scope="session")
def tuned_text_onnx(shared):
    """A small BERT classifier fine-tuned on real reviews (so its logits separate them), exported to ONNX and
    judged on 48 held-out reviews (reviews.csv beside it)."""
    import hf_models

    def make(out):
        hf_models.fine_tune(hf_models.text_classifier(out / "hf", "bert"))
        ms.export(out / "hf", out / "onnx", data=hf_models.write_reviews_csv(out / "reviews.csv"))
    from modelship.manifest import load_artifact
    return load_artifact(shared("tuned-text", make) / "onnx")


@pytest.fixture(scope="session")
def cnn_int8(shared, cnn_onnx):
    return shared("cnn-int8", lambda out: ms.quantize(cnn_onnx, "static", out))


@pytest.fixture(scope="session")
def served(work, cnn, cnn_onnx, cnn_int8, text_onnx):
    """One real TorchServe on 127.0.0.1 serving the digits CNN as torch, ONNX and static INT8 artifacts, and
    the text encoder as ONNX with a long batch delay (so concurrent requests share one batch)."""
    import shutil

    from modelship.manifest import load_artifact, write_artifact

    store = work / "store"
    ms.archive(cnn, store, name="cnn-torch")
    ms.archive(cnn_onnx, store, name="cnn-onnx")
    ms.archive(cnn_int8, store, name="cnn-int8")
    # the same INT8, its verdict recorded as judged on a machine with the other INT8 arithmetic (a build box)
    elsewhere = work / "int8-judged-elsewhere"
    shutil.copytree(cnn_int8.path, elsewhere)
    art = load_artifact(elsewhere)
    art.manifest.reference = str(cnn.path)  # the copy sits elsewhere: its reference by absolute path
    judged = art.manifest.parity["judged_on"]
    other = "saturating" if judged["int8"] == "exact" else "exact"
    art.manifest.parity["judged_on"] = {**judged, "int8": other, "kernels": "avx2" if other == "saturating" else "amx"}
    ms.archive(write_artifact(elsewhere, art.manifest), store, name="cnn-int8-elsewhere")
    ms.archive(text_onnx, store, name="text-onnx", batch_size=8, max_batch_delay_ms=500)
    with ms.serve(store, work / "state") as server:
        yield server.info


@pytest.fixture(scope="session")
def student(shared, cnn):
    """The digits CNN distilled into the default student by the real CLI (its --json beside it as distill.json)."""
    def make(out):
        out.mkdir(parents=True)
        cli("distill", cnn.path, "--out", out / "s", "--json", out / "distill.json", check=0)
    from modelship.manifest import load_artifact
    return load_artifact(shared("student", make) / "s")
