"""Triton's gRPC client against a served model, in a process of its own (tests/test_oip.py runs it): its protobuf
package 'inference' is KServe's too, and the two cannot be loaded in one process. Prints one JSON line."""

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(address: str, token: str, texts: list, pixels: list) -> dict:
    c = triton.InferenceServerClient(address)
    h = {"authorization": f"Bearer {token}"}
    out = {"live": c.is_server_live(headers=h), "ready": c.is_server_ready(headers=h),
           "model_ready": c.is_model_ready("text-onnx", headers=h),
           "metadata": c.get_model_metadata("cnn-onnx", headers=h, as_json=True)}
    x = np.asarray(pixels, np.float32)
    t = triton.InferInput("pixels", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    r = c.infer("cnn-onnx", [t], headers=h)
    out["pixels"] = r.as_numpy("logits").tolist()
    out["served"] = [r.get_response().model_name, r.get_response().model_version]
    t = triton.InferInput("text", [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array(texts, dtype=object))
    out["texts"] = c.infer("text-onnx", [t], headers=h).as_numpy("logits").tolist()
    calls = {"live": lambda **k: c.is_server_live(**k), "server_metadata": lambda **k: c.get_server_metadata(**k),
             "model_metadata": lambda **k: c.get_model_metadata("cnn-onnx", **k),
             "infer": lambda **k: c.infer("text-onnx", [t], **k)}
    out["refused"] = {}
    for name, call in calls.items():
        for label, headers in (("none", {}), ("wrong", {"authorization": "Bearer not-the-token"})):
            try:
                call(headers=headers)
                out["refused"][f"{name}/{label}"] = "answered"
            except InferenceServerException as e:
                out["refused"][f"{name}/{label}"] = str(e)
    bad = triton.InferInput("pixels", [2, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
    try:
        c.infer("cnn-onnx", [bad], headers=h)
        out["bad"] = "answered"
    except InferenceServerException as e:
        out["bad"] = str(e)
    out["ready_after"] = c.is_model_ready("cnn-onnx", headers=h)
    out["versions"] = {}  # the version a client names is honoured
    for what, call in (("ready 1.0", lambda: c.is_model_ready("cnn-onnx", "1.0", headers=h)),
                       ("ready 9.9", lambda: c.is_model_ready("cnn-onnx", "9.9", headers=h)),
                       ("metadata 1.0", lambda: c.get_model_metadata("cnn-onnx", "1.0", headers=h, as_json=True)["name"]),
                       ("metadata 9.9", lambda: c.get_model_metadata("cnn-onnx", "9.9", headers=h)),
                       ("load", lambda: c.load_model("cnn-onnx", headers=h)),
                       ("unload", lambda: c.unload_model("cnn-onnx", headers=h))):
        try:
            out["versions"][what] = call()
        except InferenceServerException as e:
            out["versions"][what] = str(e)[:300]
    big = triton.InferInput("pixels", [5000, 1, 8, 8], "FP32")  # 1.28 MB: over the server's 1 MiB cap
    big.set_data_from_numpy(np.zeros((5000, 1, 8, 8), np.float32))
    try:
        c.infer("cnn-onnx", [big], headers=h)
        out["big"] = "answered"
    except InferenceServerException as e:
        out["big"] = str(e)[:300]
    out["ready_at_end"] = c.is_model_ready("cnn-onnx", headers=h)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))))
