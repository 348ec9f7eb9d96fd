"""TorchServe handler for every modelship artifact: thin glue over the runners and the REST codec.

TorchServe hands ``handle`` a batch of requests; requests whose tensors have the same shapes run as
one batch through the runner, and each gets its own answer (400 with a message for a bad one). When
a batched call fails, its requests are answered one by one, so only the faulty one gets its 500.
"""

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np

from modelship.errors import InputError, ModelshipError
from modelship.machine import kernel_facts
from modelship.integrity import verify_folder
from modelship.manifest import load_artifact
from modelship.preprocess import open_preprocessor
from modelship.runners import open_runner
from modelship.serving.codec import BINARY_HEADER, DESCRIBE, SERVED_ON, Binary, Codec, error_body
from modelship.serving.shadow import Sample

log = logging.getLogger("modelship")


class ModelshipHandler:
    def initialize(self, context):
        opts = (getattr(context, "model_yaml_config", None) or {}).get("handler", {}) or {}
        model_dir = context.system_properties["model_dir"]
        try:  # refuses any member of the .mar changed since archive, and a model file not matching the manifest
            verify_folder(model_dir)
            self.artifact = load_artifact(model_dir, verify=True)
            threads = int(opts.get("threads", 1))
            if self.artifact.manifest.format == "torch":
                import torch
                torch.set_num_threads(threads)
            self.runner = open_runner(self.artifact, provider=opts.get("provider"), device=opts.get("device", "cpu"),
                                      threads=threads)
            prep = open_preprocessor(self.artifact)  # the tokenizer / image transform recorded with the model
        except ModelshipError as e:
            log.error("modelship: refusing to load %s: %s", model_dir, e)
            raise
        version = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelVersion")
        self.codec = Codec(self.artifact.manifest, max_items=int(opts.get("max_items", 64)), prep=prep,
                           model_name=getattr(context, "model_name", None), model_version=version)
        self.served_on = json.dumps(kernel_facts(self.runner.provider))  # answered to requests that ask (load tests)
        self.shadow = None
        if (opts.get("shadow") or {}).get("rate"):
            from modelship.serving.archive import SHADOW_REFERENCE
            from modelship.serving.shadow import Shadow

            s = opts["shadow"]
            try:
                self.shadow = Shadow(Path(model_dir) / SHADOW_REFERENCE, self.artifact.manifest,
                                     getattr(context, "model_name", self.artifact.manifest.name), version or "1.0",
                                     s["rate"], s.get("queue", 256), s.get("capture"), s.get("capture_mb", 64.0))
            except ModelshipError as e:
                log.error("modelship: refusing to load %s: its shadow reference: %s", model_dir, e)
                raise
        self.initialized = True

    def handle(self, data, context):
        """Answer each request of the batch on its own: a bad one gets 400 and an unexpected fault 500,
        and neither fails the requests batched with it. Each answer says where its time went in a W3C
        ``Server-Timing`` header: decode, infer (the runner, for the whole batch) and encode, in ms."""
        t0 = time.perf_counter()
        answers = [None] * len(data)
        groups = {}
        spent = {"decode": 0.0, "infer": 0.0, "encode": 0.0}
        for i, row in enumerate(data):
            try:
                req = self.codec.decode(_body(row), _content_type(context, i), _header(context, i, BINARY_HEADER))
                groups.setdefault(tuple((k, v.shape[1:]) for k, v in sorted(req.feed.items())), []).append((i, req))
            except Exception as e:  # noqa: BLE001
                answers[i] = self._error(context, i, e)
        spent["decode"] = time.perf_counter() - t0
        for members in groups.values():
            for chunk in self._chunks(members):
                t1 = time.perf_counter()
                try:
                    outs = self._run([r for _, r in chunk])
                except Exception as e:  # noqa: BLE001 — isolate the faulty request: answer one by one
                    if len(chunk) == 1:
                        answers[chunk[0][0]] = self._error(context, chunk[0][0], e)
                        continue
                    log.warning("modelship: a batch of %d requests failed (%s: %s); answering them one by one",
                                len(chunk), type(e).__name__, e)
                    outs = [self._alone(context, answers, i, req) for i, req in chunk]
                t2 = time.perf_counter()
                spent["infer"] += t2 - t1
                for (i, req), out in zip(chunk, outs):
                    if out is not None:
                        payload = self.codec.encode(req, out)
                        answers[i] = self._reply(context, i, payload)
                        if self.shadow is not None:  # sampled and queued; judged off the request path
                            self.shadow.offer(Sample(_body(data[i]), _how_to_read(context, i), payload,
                                                     _request_id(context, i)))
                spent["encode"] += time.perf_counter() - t2
        timing = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in spent.items())
        for i in range(len(data)):
            try:
                context.set_response_header(i, "Server-Timing", timing)
                if _header(context, i, DESCRIBE):
                    context.set_response_header(i, SERVED_ON, self.served_on)
            except Exception:  # noqa: BLE001 — a context without response headers (the in-process path)
                pass
        return answers

    def _alone(self, context, answers, i, req):
        try:
            return self._run([req])[0]
        except Exception as e:  # noqa: BLE001
            answers[i] = self._error(context, i, e)
            return None

    def _chunks(self, members):
        """Runs of requests that fit one runner call (a TensorRT profile's max batch)."""
        limit = self.runner.max_batch
        run, size = [], 0
        for m in members:
            if run and limit and size + m[1].items > limit:
                yield run
                run, size = [], 0
            run.append(m)
            size += m[1].items
        if run:
            yield run

    def _run(self, reqs) -> list[dict]:
        """One runner call for ``reqs``; each request's rows of every output, checked to be batch-major."""
        n = sum(r.items for r in reqs)
        out = self.runner.infer({k: np.concatenate([r.feed[k] for r in reqs]) for k in reqs[0].feed})
        for k, v in out.items():
            if np.ndim(v) == 0 or len(v) != n:
                raise ModelshipError(f"output '{k}' has shape {list(np.shape(v))}; expected its first dimension to "
                                     f"be the {n} samples sent (a batch-major output)")
        slices, start = [], 0
        for r in reqs:
            slices.append({k: v[start:start + r.items] for k, v in out.items()})
            start += r.items
        return slices

    def _error(self, context, idx, e: Exception):
        if isinstance(e, InputError):
            return self._reply(context, idx, error_body(400, str(e)), 400, "Bad Request")
        error_id = uuid.uuid4().hex[:16]  # the client gets the id; the log gets the id with the traceback
        log.error("modelship: request %d failed, error id %s", idx, error_id, exc_info=e)
        return self._reply(context, idx, error_body(500, f"internal error (error id {error_id}); the server log "
                                                         "holds its details"), 500, "Internal Server Error")

    @staticmethod
    def _reply(context, idx, payload, code=200, phrase="OK"):
        if isinstance(payload, Binary):  # the v2 binary tensor extension: JSON header, then the tensors' bytes
            body, length = payload.body()
            context.set_response_content_type(idx, "application/octet-stream")
            context.set_response_header(idx, BINARY_HEADER, str(length))
            return body
        context.set_response_content_type(idx, "application/json")
        if code != 200:
            context.set_response_status(code, phrase, idx)
        return json.dumps(payload)


def _header(context, idx, name: str) -> str | None:
    try:
        return context.get_request_header(idx, name) or context.get_request_header(idx, name.lower())
    except Exception:  # noqa: BLE001 — a context without headers (tests, the in-process path)
        return None


def _body(row: dict):
    return row.get("body") if row.get("body") is not None else row.get("data")


def _request_id(context, idx) -> str | None:
    try:
        return context.get_request_id(idx)
    except Exception:  # noqa: BLE001 — a context without request ids (the in-process path)
        return None


def _content_type(context, idx) -> str | None:
    return _header(context, idx, "Content-Type")


def _how_to_read(context, idx) -> dict:
    """The request headers that say how its body reads (what shadow parity and a replay need)."""
    found = {"Content-Type": _content_type(context, idx), BINARY_HEADER: _header(context, idx, BINARY_HEADER)}
    return {k: v for k, v in found.items() if v is not None}
