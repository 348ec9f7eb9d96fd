"""modelship's pytest plugin (entry point ``pytest11``: installing modelship is enough).

- ``modelship_server``: a session fixture serving the model store named by ``--modelship-store`` (or the ini option
  ``modelship_store``) with TorchServe, in a 0700 state folder of its own, stopped at the end of the session — also
  when a test fails, on Ctrl-C and on SIGTERM / SIGHUP.
- ``pytest --modelship``: gates without code. ``modelship.toml`` (or ``[tool.modelship]`` in pyproject.toml) names
  the model, its data, the variants, tolerances and SLOs; one test item is collected per variant and gate (export
  parity, variant parity, served agreement, p95 SLO, failures), so ``--junitxml`` gives CI one test case per gate
  with the gate's message as the failure text. The items of one model share one server; exporting and quantizing
  run once per session and are cached on disk by the hash of their inputs (``.modelship-cache``, or the ini option
  ``modelship_cache``), so a second run with nothing changed only serves and load-tests.

Configuration (one model; several go under ``[tool.modelship.models.NAME]`` with the same keys)::

    [tool.modelship]
    source = "model.pt2"            # a .pt2, a Hugging Face folder or a torch artifact
    data = "data.npz"               # or a CSV/JSONL of text,label, an image folder, a shipped dataset's name
    task = "classification"         # when the source does not say (a .pt2 does not)
    variants = ["int8-dynamic", "fp16"]     # made from its ONNX export: int8-dynamic, int8-static, fp16
    candidates = {mine = "artifacts/my-int8"}   # artifacts made elsewhere, judged against the source too
    users = 1
    duration = "5s"
    slo_p95_ms = 200
    [tool.modelship.tolerance.int8-dynamic]  # per variant: max_abs_diff, rtol, min_agreement, output_tol, ...
    min_agreement = 0.98
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

GATES = ("served agreement", "failures", "p95 SLO")
RESULTS = pytest.StashKey[list]()
MODES = {"int8-dynamic": "dynamic", "int8-static": "static", "fp16": "fp16"}
KEYS = {"source", "data", "task", "output_names", "variants", "candidates", "users", "duration", "slo_p95_ms",
        "max_failure_ratio", "allow_weak", "tolerance"}


def pytest_addoption(parser):
    group = parser.getgroup("modelship", "modelship: parity and serving gates")
    group.addoption("--modelship", action="store_true", help="collect one test per variant and gate from "
                    "modelship.toml or [tool.modelship] in pyproject.toml")
    group.addoption("--modelship-store", help="model store (.mar files) the modelship_server fixture serves")
    group.addoption("--modelship-config", help="the gates' configuration (default: modelship.toml, else "
                    "pyproject.toml's [tool.modelship])")
    group.addoption("--modelship-out", default="modelship-gates", help="where pytest --modelship writes its "
                    "report (report.md, report.json) and each load test's Locust HTML and CSV")
    parser.addini("modelship_store", "model store the modelship_server fixture serves")
    parser.addini("modelship_cache", "where pytest --modelship keeps exported variants (default .modelship-cache)")


@pytest.fixture(scope="session")
def modelship_server(request, tmp_path_factory):
    """TorchServe serving ``--modelship-store`` (a modelship.api.Server: ``predict``, ``loadtest``, ``info``)."""
    import modelship as ms

    store = request.config.getoption("modelship_store") or request.config.getini("modelship_store")
    if not store:
        raise pytest.UsageError("modelship_server needs a model store: pass --modelship-store DIR or set "
                                "modelship_store in the pytest ini options")
    state = tmp_path_factory.mktemp("modelship-state")
    state.chmod(0o700)
    with ms.serve(Path(store), state) as server:  # stopped when the session ends, also on a signal
        yield server


# ---- pytest --modelship ---------------------------------------------------------------------------------------

def _config_file(config) -> tuple[Path, dict] | None:
    import tomllib

    given = config.getoption("modelship_config")
    root = Path(config.rootpath)
    for path in ([Path(given)] if given else [root / "modelship.toml", root / "pyproject.toml"]):
        if path.is_file():
            data = tomllib.loads(path.read_text())
            table = data.get("tool", {}).get("modelship") if path.name == "pyproject.toml" else data
            if table:
                return path, table
    if given:
        raise pytest.UsageError(f"--modelship-config {given}: no such file")
    return None


def _models(table: dict) -> dict:
    models = dict(table.get("models") or {})
    if table.get("source"):
        name = Path(str(table["source"])).stem or "model"
        models[name] = {k: v for k, v in table.items() if k != "models"}
    if not models:
        raise pytest.UsageError("[tool.modelship] names no model: set source = \"PATH\" (or [tool.modelship.models.NAME])")
    for name, cfg in models.items():
        unknown = sorted(set(cfg) - KEYS)
        if unknown or "source" not in cfg:
            raise pytest.UsageError(f"modelship model '{name}': " + (f"unknown key(s) {', '.join(unknown)}; " if unknown
                                    else "no source; ") + f"expected some of {', '.join(sorted(KEYS))}")
        wrong = sorted(set(cfg.get("variants", [])) - set(MODES))
        if wrong:
            raise pytest.UsageError(f"modelship model '{name}': unknown variant(s) {', '.join(wrong)}; expected some "
                                    f"of {', '.join(MODES)}")
    return models


def pytest_collect_file(file_path, parent):
    config = parent.config
    if not config.getoption("modelship"):
        return None
    found = _config_file(config)
    if found and found[0] == file_path:
        return GatesFile.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(session, config, items):
    """Without a pyproject.toml/modelship.toml among the collected paths (``pytest --modelship tests/``), the
    configuration is collected too."""
    if not config.getoption("modelship") or any(isinstance(i, GateItem) for i in items):
        return
    found = _config_file(config)
    if found:
        items.extend(GatesFile.from_parent(session, path=found[0]).collect_items())


class GatesFile(pytest.File):
    def collect(self):
        base = self.path.parent
        for name, cfg in _models(_config_file(self.config)[1]).items():
            yield ModelGates.from_parent(self, name=name, cfg=cfg, base=base)

    def collect_items(self) -> list:
        return [i for m in self.collect() for v in m.collect() for i in v.collect()]


class ModelGates(pytest.Collector):
    def __init__(self, *, cfg: dict, base: Path, **kw):
        super().__init__(**kw)
        self.run = ModelRun(self.name, cfg, base, self.config)

    def collect(self):
        for variant in self.run.variants():
            yield VariantGates.from_parent(self, name=variant, run=self.run)


class VariantGates(pytest.Collector):
    def __init__(self, *, run: "ModelRun", **kw):
        super().__init__(**kw)
        self.run = run

    def collect(self):
        yield GateItem.from_parent(self, name="parity", run=self.run, variant=self.name)
        for gate in GATES:
            if gate != "p95 SLO" or self.run.cfg.get("slo_p95_ms") is not None:
                yield GateItem.from_parent(self, name=gate, run=self.run, variant=self.name)


class GateFailed(Exception):
    """A gate's verdict: its message is the test's failure text (and the JUnit failure message)."""


class GateItem(pytest.Item):
    def __init__(self, *, run: "ModelRun", variant: str, **kw):
        super().__init__(**kw)
        self.run, self.variant = run, variant

    def runtest(self):
        why = self.run.verdict(self.variant, self.name)
        self.config.stash.setdefault(RESULTS, []).append(
            {"model": self.run.name, "variant": self.variant, "gate": self.name, "passed": not why, "message": why})
        if why:
            raise GateFailed(why)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, GateFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"{self.run.name} {self.variant}: {self.name}"


class ModelRun:
    """One model's gates: the conversions (cached on disk by the hash of their inputs), then one server for all its
    served variants and one load test per variant, shared by that variant's items."""

    def __init__(self, name: str, cfg: dict, base: Path, config):
        self.name, self.cfg, self.base, self.config = name, cfg, base, config
        self.built: dict | None = None  # variant -> {"artifact": path, "reason": str | None}
        self.served: dict | None = None  # variant -> LoadResult, or an error message
        self.server, self.store = None, None

    def path(self, value) -> str:
        """A path in the configuration, relative to its file (a shipped dataset's name is kept)."""
        p = self.base / str(value)
        return str(p) if p.exists() else str(value)

    def variants(self) -> list:
        return ["onnx", *self.cfg.get("variants", []), *self.cfg.get("candidates", {})]

    def judge(self, variant: str) -> dict:
        tol = dict((self.cfg.get("tolerance") or {}).get(variant) or {})
        return {"allow_weak": bool(self.cfg.get("allow_weak")), **tol}

    # ---- conversions, cached -------------------------------------------------------------------------------
    def key(self) -> str:
        from modelship import __version__
        from modelship.manifest import sha256_path

        h = hashlib.sha256(json.dumps({"cfg": self.cfg, "modelship": __version__}, sort_keys=True, default=str).encode())
        for value in (self.cfg["source"], self.cfg.get("data"), *self.cfg.get("candidates", {}).values()):
            p = Path(self.path(value)) if value else None
            if p is not None and p.exists():
                h.update(sha256_path(p).encode())
        return h.hexdigest()[:16]

    def build(self) -> dict:
        if self.built is not None:
            return self.built
        import modelship as ms
        from modelship.errors import ModelshipError

        root = Path(self.config.getini("modelship_cache") or self.config.rootpath / ".modelship-cache")
        folder = root / f"{self.name}-{self.key()}"
        done = folder / "gates.json"
        if done.is_file():  # nothing changed since it was built: the artifacts and their verdicts are on disk
            self.built = json.loads(done.read_text())
            return self.built
        shutil.rmtree(folder, ignore_errors=True)
        built = {}
        source, data = self.path(self.cfg["source"]), self.path(self.cfg["data"]) if self.cfg.get("data") else None

        def gate(variant, make):
            try:
                built[variant] = {"artifact": str(make().path), "reason": None}
            except ms.ParityError as e:  # the artifact stays, with its failed record: served to judge it there too
                built[variant] = {"artifact": e.record["artifact"] if e.record else None, "reason": str(e)}
            except ModelshipError as e:
                built[variant] = {"artifact": None, "reason": f"{e.kind}: {e}"}

        gate("onnx", lambda: ms.export(source, folder / "onnx", data=data, task=self.cfg.get("task"),
                                       output_names=self.cfg.get("output_names"), judge=self.judge("onnx")))
        for variant in self.cfg.get("variants", []):
            if built["onnx"]["artifact"]:
                gate(variant, lambda v=variant: ms.quantize(built["onnx"]["artifact"], MODES[v], folder / v,
                                                            judge=self.judge(v)))
            else:
                built[variant] = {"artifact": None, "reason": f"not made: the ONNX export failed ({built['onnx']['reason']})"}
        for name, path in self.cfg.get("candidates", {}).items():
            r = ms.parity(self.path(path), source, data=data, judge=self.judge(name))
            built[name] = {"artifact": self.path(path), "reason": None if r.passed else f"{r.kind}: {r.reason}"}
        folder.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(built, indent=2))
        self.built = built
        return built

    # ---- serving, once per session ---------------------------------------------------------------------------
    def serve(self) -> dict:
        if self.served is not None:
            return self.served
        import tempfile

        import modelship as ms
        from modelship.batch_gate import failed

        built, self.served = self.build(), {}
        source = self.path(self.cfg["source"])
        data = self.path(self.cfg["data"]) if self.cfg.get("data") else None
        store = self.store = Path(tempfile.mkdtemp(prefix="modelship-store-"))
        self.config.add_cleanup(self.stop)
        names = {}
        try:
            for variant in self.variants():
                art = built[variant]["artifact"]
                if not art:
                    self.served[variant] = f"not served: {built[variant]['reason'] or 'no artifact'}"
                    continue
                names[variant] = f"{self.name}-{variant}"
                man = art.manifest if hasattr(art, "manifest") else ms.load_artifact(art).manifest
                alone = failed(man.parity)  # answers that move with their batch: one request at a time
                ms.archive(art, store, name=names[variant], workers=1, threads=1, force=True,
                           batch_size=1 if alone else 8)
            self.server = ms.serve(store)  # one server for the model's variants, stopped with the session
            for variant, model in names.items():
                ref = source if variant in self.cfg.get("candidates", {}) else None
                self.served[variant] = self.server.loadtest(
                    model, users=int(self.cfg.get("users", 1)), duration=self.cfg.get("duration", "5s"),
                    slo_p95_ms=self.cfg.get("slo_p95_ms"), max_failure_ratio=float(self.cfg.get("max_failure_ratio", 0)),
                    data=data, reference=ref, out=_out(self.config) / self.name / variant)
        except Exception as e:  # noqa: BLE001 — every served gate of this model reports it
            for variant in self.variants():
                self.served.setdefault(variant, f"not served: {type(e).__name__}: {e}")
        return self.served

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.store is not None:
            shutil.rmtree(self.store, ignore_errors=True)
            self.store = None

    # ---- the verdict of one item -----------------------------------------------------------------------------
    def verdict(self, variant: str, gate: str) -> str | None:
        """None when the gate passed, else its message."""
        if gate == "parity":
            return self.build()[variant]["reason"]
        res = self.serve()[variant]
        if isinstance(res, str):
            return res
        kinds = {"served agreement": ("parity", "weak"), "failures": ("errors",), "p95 SLO": ("slo",)}[gate]
        failed = [f for f in res.record["failed_gates"] if f["kind"] in kinds]
        if gate == "failures" and res.requests == 0:
            return "no request was answered"
        return "; ".join(f"users={f['users']}: {f['message']}" for f in failed) or None


def _out(config) -> Path:
    return Path(config.rootpath) / config.getoption("modelship_out")


def pytest_sessionfinish(session):
    """The gates' verdicts as report.json and a Markdown table (report.md, for a CI job summary)."""
    results = session.config.stash.get(RESULTS, None)
    if not results:
        return
    out = _out(session.config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    failed = sum(not r["passed"] for r in results)
    lines = [f"## modelship gates: {len(results) - failed} passed, {failed} failed", "",
             "| model | variant | gate | result | message |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['gate']} | {'pass' if r['passed'] else '**FAIL**'} | "
              f"{(r['message'] or '').replace('|', '/')[:300]} |" for r in results]
    (out / "report.md").write_text("\n".join(lines) + "\n")
