"""``modelship tune``: the served configuration with the most requests/s inside a p95 latency SLO, every answer
checked against the reference.

One private TorchServe (loopback, tokens, model registration on) serves one configuration at a time: variant ×
batch size × batch delay × workers × threads per worker. Each is load-tested with real Locust at rising
concurrency (1, 2, 4, ... users) until its p95 breaks the SLO or its throughput stops growing; its score is the
best requests/s of a level inside the SLO with every answer right. Every variant's plainest configuration
(1 worker, 1 thread, no batching) is measured first, and a variant whose served answers differ from the
reference is dropped there. Then, the most promising variant first, the search climbs: each round measures one
step up in every setting and moves to the one that gained most (at least 5 %), until none gains; the larger
values of a setting whose step did not gain are not tried (dominated), nor are configurations that would run
more compute threads than the machine has cores, nor anything past the time budget.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import ArtifactError, GateError, ModelshipError, ServeError
from .machine import cores
from .batch_gate import failed
from .manifest import MANIFEST, Artifact, load_artifact, size_mb
from .loadtests.summary import kind_of
from .paths import check_out, data_path

GAIN = 1.05  # a change is kept when it adds at least 5 % requests/s


@dataclass(frozen=True)
class Config:
    variant: str
    batch_size: int = 1
    max_batch_delay_ms: int = 1  # waited only when batch_size > 1 (TorchServe reads 0 as 100 ms)
    workers: int = 1
    threads: int = 1

    def name(self) -> str:
        short = re.sub(r"[^A-Za-z0-9_.-]", "-", self.variant)[:40]
        return f"{short}-b{self.batch_size}-d{self.max_batch_delay_ms}-w{self.workers}-t{self.threads}"

    def model_config(self):
        """The archive's model config for this configuration."""
        from .serving.archive import ModelConfig

        return ModelConfig(batch_size=self.batch_size, max_batch_delay_ms=self.max_batch_delay_ms,
                           workers=self.workers, threads=self.threads)


@dataclass
class Space:
    """The values each setting may take; the search climbs through them in order."""

    workers: tuple = ()  # default: 1 .. cores
    threads: tuple = ()  # default: 1 .. cores
    batch_sizes: tuple = (1, 4, 8, 16)
    delays_ms: tuple = (1, 2, 5, 10)
    max_users: int = 64

    def values(self, knob: str) -> tuple:
        """The values a Config field may take."""
        return getattr(self, {"batch_size": "batch_sizes", "max_batch_delay_ms": "delays_ms"}.get(knob, knob))

    def resolved(self) -> "Space":
        n = cores()
        upto = tuple(v for v in (1, 2, 4, 8, 16, 32) if v <= n) or (1,)
        return replace(self, workers=tuple(self.workers) or upto, threads=tuple(self.threads) or upto)


@dataclass
class TuneOptions:
    slo_p95_ms: float
    budget_s: float = 600.0
    seconds: float = 5.0  # per concurrency level
    space: Space = field(default_factory=Space)
    data: dict | None = None  # evaluation data spec (--data): the request bodies and their references


def expand(paths: list[Path]) -> dict[str, Artifact]:
    """Artifacts to tune, by name: artifact folders, or a run folder (``modelship pipeline``'s output) whose
    artifacts passed their gates."""
    from .serving.archive import check_gates

    out: dict[str, Artifact] = {}
    for p in paths:
        p = Path(p)
        if (p / MANIFEST).is_file():
            out[p.name] = load_artifact(p)
            check_gates(out[p.name])  # refused before any server starts: only what passed parity is served
            continue
        if not p.is_dir():
            raise ArtifactError(f"{p}: not found; expected an artifact folder (with {MANIFEST}) or a run folder "
                                "written by modelship pipeline")
        found = 0
        report = p / "report.json"  # a pipeline run: its main model's variants (not the built-in text model's)
        main = json.loads(report.read_text()).get("model") if report.is_file() else None
        for sub in sorted(q for q in p.iterdir() if (q / MANIFEST).is_file()):
            if main and not sub.name.startswith(f"{main}-"):
                continue
            art = load_artifact(sub)
            if art.manifest.format == "tensorrt":
                continue  # served on a GPU only
            try:
                check_gates(art)
            except ArtifactError:
                continue
            out[sub.name] = art
            found += 1
        if not found:
            raise ArtifactError(f"{p}: no artifact folder with a passed parity record inside; expected an "
                                f"artifact folder (with {MANIFEST}) or a run folder written by modelship pipeline")
    return out


LABELS = {"slo": "SLO", "parity": "parity", "weak": "parity", "errors": "errors"}  # tune.json's reason words


class Tuner:
    def __init__(self, arts: dict[str, Artifact], out: Path, opts: TuneOptions, log=lambda msg: None):
        self.arts, self.out, self.opts, self.log = arts, Path(out), opts, log
        self.space = opts.space.resolved()
        self.trials: list[dict] = []
        self.skipped: list[dict] = []
        self.dropped: set[str] = set()
        self.prepared: dict[str, dict] = {}  # variant -> its load test's request bodies and golden outputs
        self.t0 = time.monotonic()
        self.info = None  # the trials' server (serving.state.ServerState) while it runs

    # ---- budget -----------------------------------------------------------------------------------------
    def left_s(self) -> float:
        return self.opts.budget_s - (time.monotonic() - self.t0)

    def _level_cost(self) -> float:
        return self.opts.seconds + 3.0  # Locust start-up and the answer checks

    # ---- one configuration ------------------------------------------------------------------------------
    def measure(self, cfg: Config) -> dict | None:
        """Serve ``cfg`` and raise concurrency until the SLO breaks or throughput stops growing."""
        from .serving import lifecycle
        from .serving.archive import archive

        if self.left_s() < 2 * self._level_cost():
            self.skip(cfg, "budget", f"{self.left_s():.0f} s of the budget left")
            return None
        art, name = self.arts[cfg.variant], cfg.name()
        store = self.out / "trials-store"
        started = time.monotonic()
        self.log(f"trial {len(self.trials) + 1}: {name}")
        archive(art, store, name=name, config=cfg.model_config())
        try:
            lifecycle.register(self.info.state, f"{name}.mar", cfg.workers)
            levels, best = self._ramp(cfg, name)
        except (ServeError, GateError) as e:  # it did not load, or did not answer: this configuration fails
            best, levels = None, [{"users": 0, "rps": None, "p50_ms": None, "p95_ms": None, "p99_ms": None,
                                   "checked": 0, "mismatches": 0, "top1_agreement": None, "max_abs_diff": None,
                                   "passed": False, "kind": "errors",
                                   "gate_failures": [f"failures: it did not serve ({e})"]}]
        finally:
            lifecycle.unregister(self.info.state, name)
            (store / f"{name}.mar").unlink(missing_ok=True)
        worst = levels[-1] if levels else None
        failed, kind = ([], None) if best else ((worst or {}).get("gate_failures", ["no level measured"]),
                                                (worst or {}).get("kind") or "errors")
        if worst and not worst["passed"] and worst["kind"] != "slo":
            failed, kind = worst["gate_failures"], worst["kind"]  # a wrong answer or an error at any level rejects it
        chosen = best if best and not failed else worst
        man = art.manifest
        rec = man.parity or {}
        trial = {"config": asdict(cfg), "name": name, "users": chosen and chosen["users"],
                 "rps": chosen and chosen["rps"], "p50_ms": chosen and chosen["p50_ms"],
                 "p95_ms": chosen and chosen["p95_ms"], "p99_ms": chosen and chosen["p99_ms"],
                 "agreement": _min([lv["top1_agreement"] for lv in levels]),
                 "max_abs_diff": _max([lv["max_abs_diff"] for lv in levels]),
                 "checked": sum(lv["checked"] or 0 for lv in levels),
                 "mismatches": sum(lv["mismatches"] or 0 for lv in levels),
                 "accuracy": rec.get("accuracy") if rec else None, "precision": man.precision,
                 "size_mb": size_mb(art.model_path),
                 "passed": not failed, "kind": kind if failed else None,
                 "reason": None if not failed else f"{LABELS[kind]}: {'; '.join(failed)[:300]}",
                 "levels": levels, "seconds": round(time.monotonic() - started, 1)}
        self.trials.append(trial)
        return trial

    def _ramp(self, cfg: Config, name: str) -> tuple[list[dict], dict | None]:
        """Load-test ``name`` at 1, 2, 4, ... users until a level fails (the SLO, a wrong answer, an error) or
        stops gaining; returns every level and the best one that passed."""
        from .loadtests.runner import loadtest
        from .loadtests.summary import Gates

        levels, best, users = [], None, 1
        while users <= self.space.max_users:
            if levels and self.left_s() < self._level_cost():
                break
            r = loadtest(self.info.state, name, self.out / "trials" / name, users=(users,),
                         duration_s=self.opts.seconds, gates=Gates(slo_p95_ms=self.opts.slo_p95_ms),
                         data=self.opts.data, prepared=self.prepared.get(cfg.variant))
            self.prepared[cfg.variant] = r["spec"]  # the golden outputs are computed once per variant
            lv = {k: r.get(k) for k in ("users", "requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms",
                                        "checked", "mismatches", "top1_agreement", "max_abs_diff", "passed",
                                        "kind", "gate_failures")}
            levels.append(lv)
            self.log(f"  {users} users: {lv['rps']:.1f} req/s, p95 {lv['p95_ms'] or 0:.1f} ms"
                     + ("" if lv["passed"] else f" — {'; '.join(r['gate_failures'])[:160]}"))
            if not lv["passed"]:
                break
            if best is not None and lv["rps"] < best["rps"] * GAIN:
                best = max(best, lv, key=lambda x: x["rps"])
                break  # saturated: more users only queue
            best = lv
            users *= 2
        return levels, best

    def skip(self, cfg: Config, why: str, detail: str) -> None:
        self.skipped.append({"config": asdict(cfg), "name": cfg.name(), "reason": f"{why}: {detail}"})

    # ---- the search -------------------------------------------------------------------------------------
    KNOBS = ("workers", "threads", "batch_size", "max_batch_delay_ms")

    def neighbours(self, cfg: dict) -> list[Config]:
        """One step up in each setting from ``cfg``: the configurations the next round measures."""
        out = []
        for knob in self.KNOBS:
            if knob == "max_batch_delay_ms" and cfg["batch_size"] == 1:
                continue  # a delay only waits for a batch
            up = [v for v in self.space.values(knob) if v > cfg[knob]]
            if not up:
                continue
            nxt = Config(**{**cfg, knob: up[0]})
            batch = failed(self.arts[nxt.variant].manifest.parity)
            if knob == "batch_size" and batch:
                self.skip(nxt, "batch gate", batch["message"])  # archive refuses it: answers would move
                continue
            if nxt.workers * nxt.threads > cores():
                self.skip(nxt, "oversubscribed", f"{nxt.workers} workers × {nxt.threads} threads > {cores()} cores")
                continue
            out.append(nxt)
        return out

    def climb(self, cur: dict) -> None:
        """Steepest ascent from the trial ``cur``: measure every one-step neighbour of the best so far, move to the
        best gain, stop when none gains. What lies beyond a step that did not gain is not tried (dominated)."""
        variant = cur["config"]["variant"]
        seen = {cur["name"]}
        while True:
            gains, tried = [], []
            for cfg in self.neighbours(cur["config"]):
                if cfg.name() in seen:
                    continue
                seen.add(cfg.name())
                t = self.measure(cfg)
                if t is None:
                    return  # out of budget
                if not t["passed"] and t["kind"] != "slo":
                    self.dropped.add(variant)
                    self.log(f"  {variant} dropped: {t['reason'][:160]}")
                    return
                tried.append(t)
                if _better(t, cur):
                    gains.append(t)
            if not gains:
                for t in tried:
                    self.skip_beyond(t, cur)
                return
            cur = max(gains, key=lambda t: (t["passed"], t["rps"] if t["passed"] else -(t["p95_ms"] or 0)))

    def skip_beyond(self, t: dict, cur: dict) -> None:
        """The larger values of the setting ``t`` changed from ``cur``: not tried, as that step did not gain."""
        for knob in self.KNOBS:
            if t["config"][knob] != cur["config"][knob]:
                for v in (v for v in self.space.values(knob) if v > t["config"][knob]):
                    self.skip(Config(**{**cur["config"], knob: v}), "dominated",
                              f"{knob}={t['config'][knob]} did not gain over {cur['name']}")

    def run(self) -> dict:
        from .serving import lifecycle
        from .serving.config import ServeConfig, free_port

        if not self.arts:
            raise ModelshipError("nothing to tune: no artifacts given")
        state = self.out / "state"
        (self.out / "trials-store").mkdir(parents=True, exist_ok=True)
        self.info = lifecycle.start(self.out / "trials-store", state,
                                    ServeConfig(port=free_port(), model_api=True, oip=False))
        try:  # every variant's plainest configuration first, then the climbs, the most promising first
            bases = [t for t in (self.measure(Config(v)) for v in self.arts) if t is not None]
            for t in bases:
                if not t["passed"] and t["kind"] != "slo":
                    self.dropped.add(t["config"]["variant"])
                    self.log(f"  {t['config']['variant']} dropped: {t['reason'][:160]}")
            live = [t for t in bases if t["config"]["variant"] not in self.dropped]
            for t in sorted(live, key=lambda t: (t["passed"], t["rps"] if t["passed"] else -(t["p95_ms"] or 0)),
                            reverse=True):
                self.climb(t)
        finally:
            lifecycle.stop(state)
        return self.result()

    def result(self) -> dict:
        passed = [t for t in self.trials if t["passed"]]
        front = pareto(passed)
        best = max(passed, key=lambda t: (t["rps"], -t["p95_ms"])) if passed else None
        return {"slo_p95_ms": self.opts.slo_p95_ms, "budget_s": self.opts.budget_s, "cores": cores(),
                "seconds": round(time.monotonic() - self.t0, 1), "space": asdict(self.space),
                "best": best, "pareto": front, "trials": self.trials, "skipped": self.skipped,
                "dropped_variants": sorted(self.dropped)}


def _better(t: dict, cur: dict) -> bool:
    if t["passed"] and not cur["passed"]:
        return True
    if t["passed"] and cur["passed"]:
        return t["rps"] >= cur["rps"] * GAIN
    # both over the SLO: closer to it is progress (more threads can bring one request's latency down)
    return (t["p95_ms"] or float("inf")) < (cur["p95_ms"] or float("inf")) / GAIN


def pareto(trials: list[dict]) -> list[dict]:
    """Trials no other trial beats on every one of: more requests/s, lower p95, higher accuracy, smaller size."""
    def key(t):
        return (t["rps"], -t["p95_ms"], t["accuracy"] if t["accuracy"] is not None else 0.0, -t["size_mb"])

    def dominates(a, b):
        ka, kb = key(a), key(b)
        return all(x >= y for x, y in zip(ka, kb)) and ka != kb
    return sorted((t for t in trials if not any(dominates(o, t) for o in trials)), key=lambda t: -t["rps"])


def _min(xs):
    xs = [x for x in xs if x is not None]
    return min(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def write_winner(result: dict, arts: dict[str, Artifact], out: Path) -> Path | None:
    """The winning configuration archived as OUT/model-store/VARIANT.mar with its model-config.yaml beside it,
    ready for ``modelship serve OUT/model-store``."""
    import yaml

    from .serving.archive import archive

    best = result["best"]
    if best is None:
        return None
    c = best["config"]
    mc = Config(**c).model_config()
    store = out / "model-store"
    if store.exists():
        shutil.rmtree(store)
    mar = archive(arts[c["variant"]], store, name=c["variant"], config=mc)
    (out / "model-config.yaml").write_text(yaml.safe_dump(mc.yaml()))
    return mar


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [t for t in result["trials"] if t["passed"]]
    bad = [t for t in result["trials"] if not t["passed"] and t["rps"] is not None]
    front = result["pareto"]
    ax.scatter([t["p95_ms"] for t in ok], [t["rps"] for t in ok], c="tab:blue", label="passed")
    ax.scatter([t["p95_ms"] for t in bad], [t["rps"] for t in bad], c="tab:red", marker="x", label="rejected")
    ax.scatter([t["p95_ms"] for t in front], [t["rps"] for t in front], s=140, facecolors="none",
               edgecolors="tab:green", linewidths=2, label="Pareto set (rps, p95, accuracy, size)")
    for t in front:
        ax.annotate(t["name"], (t["p95_ms"], t["rps"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axvline(result["slo_p95_ms"], ls="--", c="grey", label=f"SLO p95 {result['slo_p95_ms']:g} ms")
    ax.set_xlabel("p95 latency (ms)")
    ax.set_ylabel("requests / s")
    ax.set_title("modelship tune: every served answer checked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tune(paths: list[Path], out: Path, opts: TuneOptions, log=lambda msg: None) -> dict:
    return tune_artifacts(expand(paths), out, opts, log)


def tune_artifacts(arts: dict[str, Artifact], out: Path, opts: TuneOptions, log=lambda msg: None) -> dict:
    """Search, write tune.json, pareto.png and the winner's .mar; raise GateError when nothing passed."""
    out = Path(out)
    check_out(out, data=data_path(opts.data), **{f"source {name}": a.path for name, a in arts.items()})
    out.mkdir(parents=True, exist_ok=True)
    if opts.slo_p95_ms <= 0:
        raise ModelshipError(f"--slo-p95-ms {opts.slo_p95_ms:g}: expected a latency target above 0 ms")
    result = Tuner(arts, out, opts, log).run()
    mar = write_winner(result, arts, out)
    result["winner_mar"] = str(mar) if mar else None
    result["plot"] = str(plot(result, out / "pareto.png"))
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["best"] is None:
        why = "; ".join(f"{t['name']}: {t['reason']}" for t in result["trials"][:4]) or "no trial ran"
        raise GateError(f"no configuration met the SLO with every answer right ({why}); see {out / 'tune.json'}",
                        result, kind=kind_of([t for t in result["trials"] if t["kind"]]) or "errors")
    return result
