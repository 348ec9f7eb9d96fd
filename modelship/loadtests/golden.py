"""Golden outputs of the root PyTorch model for a served model (``prepare``: request bodies and every output
of the reference on the evaluation data) and the one comparison of a served answer with them (``check``),
used by the Locust user for every request, and ``probe``: one request sent until it is answered (the warm-up
before a timed run, the fault monitor's check after a worker kill).

Every part of the answer is judged: a classifier's label (agreement) and probabilities, and every other
output it returns, matched by name, shape-checked, within the artifact's precision tolerance."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ParityError, ServeError
from ..manifest import load_artifact
from .. import data as datasets
from ..comparison import Verdict, bad_rows, check, collect, golden_of, served_tolerance  # noqa: F401 — check: the one verdict
from ..serving.archive import read_mar
from ..serving.codec import DESCRIBE, SERVED_ON, V2_DTYPES
from ..serving.state import ServerState, bearer


def prepare(state: str | Path, model: str, out_dir: Path, reference: str | Path | None = None,
            samples: int | None = None, data: dict | None = None, overrides: dict | None = None,
            per_output: dict | None = None, mar: Path | None = None, protocol: str = "predictions",
            reference_mar: Path | None = None) -> dict:
    """Write the request bodies and the golden outputs of the root PyTorch model for one served model.
    ``data``: the user's evaluation data (default: the served artifact's); ``overrides`` / ``per_output``:
    the command line's changes to the served artifact's precision tolerance; ``mar``: the archive served
    (default: STORE/MODEL.mar; another version's for modelship promote); ``protocol``: ``predictions``
    (TorchServe's /predictions/MODEL) or ``v2`` (the Open Inference Protocol front's /v2/models/MODEL/infer);
    ``reference_mar``: the archive whose sealed reference judges (default: ``mar``'s; promote: the served one's)."""
    from ..models.checkpoints import open_source
    from ..runners.torch_runner import TorchRunner
    from ..stages import reference_of

    info = ServerState.load(state)
    if model not in info.models:
        raise ServeError(f"model '{model}' is not served from {state}; served: {', '.join(info.models)}")
    if protocol not in PROTOCOLS:
        raise ServeError(f"protocol '{protocol}'; expected {' or '.join(PROTOCOLS)}")
    if protocol == "v2" and not info.v2_url:
        raise ServeError(f"the server in {state} runs without the Open Inference Protocol (serve --no-oip); start it "
                         "without that flag, or load-test /predictions")
    mar = mar or Path(info.store) / f"{model}.mar"
    served = read_mar(mar)
    source = (served.extra.get("archive") or {}).get("source")
    sealed = sealed_reference(reference_mar or mar, out_dir / "sealed-reference")
    if reference:
        ref_art, module = open_source(reference)
    elif sealed is not None:  # the reference packed (and sealed) inside the archive: what its shadow runs
        ref_art, module = reference_of(sealed)
    elif source and Path(source).is_dir():
        ref_art, module = reference_of(load_artifact(source))  # its model file checked against its manifest
    else:
        raise ArtifactError(f"cannot find the reference model of '{model}'; pass --reference PATH")
    spec = data or served.data
    names = [t.name for t in served.inputs]
    outputs = [t.name for t in served.outputs]
    content_type, binary = "application/json", False
    if served.preprocess and datasets.has_raw(spec):  # what users send: raw texts, encoded images
        from ..models.reference import reference_preprocessor

        raw, _ = datasets.load_raw(spec, "test")
        raw = raw[:samples] if samples else raw
        feed = reference_preprocessor(ref_art)(raw)  # the reference: the same raw input, preprocessed the original way
        kind = served.preprocess["kind"]
        sent = raw
        if kind == "image":
            import base64

            sent = [base64.b64encode(b).decode() for b in raw]
        if protocol == "v2":  # one BYTES input: the text, or the image's base64
            bodies = [json.dumps({"inputs": [{"name": kind, "shape": [1], "datatype": "BYTES", "data": [x]}]})
                      for x in sent]
        elif kind == "text":
            bodies = [json.dumps({"inputs": t}) for t in raw]
        else:
            bodies = sent
            content_type, binary = _image_type(raw[0]), True
    else:
        feed, _ = datasets.load(spec, "test", served.inputs)
        if samples:
            feed = {k: v[:samples] for k, v in feed.items()}
        n = len(feed[names[0]])
        if protocol == "v2":
            bodies = [json.dumps({"inputs": [{"name": k, "shape": [1, *feed[k][i].shape],
                                              "datatype": V2_DTYPES[str(feed[k].dtype)],
                                              "data": feed[k][i].ravel().tolist()} for k in names]}) for i in range(n)]
        else:
            bodies = [json.dumps({"inputs": feed[names[0]][i].tolist()} if len(names) == 1 else
                                 {"inputs": {k: feed[k][i].tolist() for k in names}}) for i in range(n)]
    ref = collect(TorchRunner(ref_art, module=module), feed)
    n = len(bodies)
    missing = [o for o in outputs if o not in ref]
    if missing:
        raise ArtifactError(f"the reference {ref_art.path} has no output(s) {', '.join(missing)} that '{model}' answers")
    bad = {o: int(bad_rows(~np.isfinite(ref[o])).sum()) for o in outputs if not np.all(np.isfinite(ref[o]))}
    if bad:  # no evidence: an answer equal to a NaN would pass, one that differs could not be judged
        raise ParityError(f"the reference {ref_art.path} answers NaN or inf on the evaluation data ("
                          + ", ".join(f"output '{o}': {n} of {n_rows(ref[o])} samples" for o, n in bad.items())
                          + "); served answers cannot be judged against it; supply data it answers finitely on "
                          "(--data)", kind="weak")
    out_dir.mkdir(parents=True, exist_ok=True)
    golden = golden_of(served.task, outputs, ref)
    np.savez(out_dir / "golden.npz", **golden)
    (out_dir / "bodies.json").write_text(json.dumps(bodies))
    tol = served_tolerance(served).adjusted(overrides, per_output)
    return {"model": model, "path": f"/v2/models/{model}/infer" if protocol == "v2" else f"/predictions/{model}",
            "protocol": protocol, "token": info.token, "task": served.task, "labels": ref_art.manifest.labels or served.labels,
            "dtypes": {t.name: t.dtype for t in served.outputs},
            "precision": served.precision, "outputs": outputs, "tolerance": asdict(tol),
            "golden": str(out_dir / "golden.npz"), "bodies": str(out_dir / "bodies.json"),
            "report": str(out_dir / "parity_counts.json"),
            "host": info.v2_url if protocol == "v2" else info.inference_url,
            "reference": str(ref_art.path), "data": datasets.describe(spec), "samples": n,
            "content_type": content_type, "binary": binary, "judged_on": (served.parity or {}).get("judged_on")}


PROTOCOLS = ("predictions", "v2")


def n_rows(a) -> int:
    return len(a) if np.ndim(a) else 1


def sealed_reference(mar: Path, dst: Path):
    """The reference packed inside a .mar (archived with a shadow rate) unpacked into ``dst`` and loaded with its
    hashes checked, or None when the archive has none. ``read_mar`` checked every member against the archive's
    integrity record first."""
    import zipfile

    from ..serving.archive import SHADOW_REFERENCE

    with zipfile.ZipFile(mar) as z:
        members = [n for n in z.namelist() if n.startswith(SHADOW_REFERENCE + "/") and not n.endswith("/")]
        if not members:
            return None
        for n in members:
            target = dst / n[len(SHADOW_REFERENCE) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(n))
    return load_artifact(dst, verify=True)


def retarget(spec: dict, state: str | Path, model: str, out_dir: Path) -> dict:
    """``spec`` (from ``prepare``) for another served model of the same artifact: the same request bodies and
    golden outputs, sent to ``model`` (modelship tune serves one artifact under many configurations)."""
    info = ServerState.load(state)
    if model not in info.models:
        raise ServeError(f"model '{model}' is not served from {state}; served: {', '.join(info.models)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    v2 = spec.get("protocol") == "v2"
    return {**spec, "model": model, "path": f"/v2/models/{model}/infer" if v2 else f"/predictions/{model}",
            "token": info.token, "host": info.v2_url if v2 else info.inference_url,
            "report": str(out_dir / "parity_counts.json")}


def request_bodies(spec: dict) -> list:
    """The request bodies ``prepare`` wrote: JSON texts, or the bytes of encoded images."""
    import base64

    bodies = json.loads(Path(spec["bodies"]).read_text()) if spec.get("bodies") else []
    return [base64.b64decode(b) for b in bodies] if spec.get("binary") else bodies


def batch_body(spec: dict, indices: list) -> bytes | None:
    """One /predictions request carrying the samples ``indices`` of ``prepare``'s bodies (a list of samples: the
    handler runs them as one batch), or None where the bodies do not combine (the v2 protocol)."""
    import base64

    if spec.get("protocol") == "v2":
        return None
    bodies = request_bodies(spec)
    if spec.get("binary"):  # encoded images: base64 in JSON
        return json.dumps({"inputs": [{"image_b64": base64.b64encode(bodies[i]).decode()} for i in indices]}).encode()
    samples = [json.loads(bodies[i])["inputs"] for i in indices]
    if isinstance(samples[0], dict):
        return json.dumps({"inputs": {k: [x[k] for x in samples] for k in samples[0]}}).encode()
    return json.dumps({"inputs": samples}).encode()


TOKEN_ENV = "MODELSHIP_TOKEN"  # how Locust processes get the bearer token: never written into the spec file


def request_headers(spec: dict) -> dict:
    import os


    return {"Content-Type": spec.get("content_type", "application/json"),
            **bearer(spec.get("token") or os.environ.get(TOKEN_ENV))}


def probe(spec: dict, timeout_s: float, index: int = 0) -> tuple[Verdict | None, str]:
    """Send sample ``index`` until it is answered with 200 or ``timeout_s`` passes: (its verdict, "") or
    (None, what the last attempt got)."""
    import time

    import requests

    body, hdr = request_bodies(spec)[index], {**request_headers(spec), DESCRIBE: "1"}
    golden = np.load(spec["golden"])
    deadline, last = time.monotonic() + timeout_s, "no attempt"
    while time.monotonic() < deadline:
        try:
            r = requests.post(spec["host"] + spec["path"], data=body, headers=hdr,
                              timeout=max(1.0, min(30.0, deadline - time.monotonic())))
        except requests.RequestException as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if r.status_code == 200:
                verdict = check(spec, golden, index, r.json())
                try:
                    verdict.served_on = json.loads(r.headers.get(SERVED_ON) or "null")
                except ValueError:
                    pass
                return verdict, ""
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        time.sleep(0.05)
    return None, last


def _image_type(data: bytes) -> str:
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
