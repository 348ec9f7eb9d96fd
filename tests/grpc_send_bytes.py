"""Send each body of a file (a JSON list of base64 strings) to a served raw-input model as one v2 BYTES element over
gRPC, with Triton's client (in a process of its own: see tests/oip_grpc_client.py); print one JSON line: the gRPC
status of each call (OK, or the status code's name) and its message."""

import base64
import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(address: str, token: str, model: str, input_name: str, bodies_file: str) -> list:
    c = triton.InferenceServerClient(address)
    h = {"authorization": f"Bearer {token}"}
    out = []
    for b64 in json.loads(open(bodies_file).read()):
        t = triton.InferInput(input_name, [1], "BYTES")
        t.set_data_from_numpy(np.array([base64.b64decode(b64)], dtype=object))
        try:
            c.infer(model, [t], headers=h, client_timeout=30)
            out.append(["OK", ""])
        except InferenceServerException as e:
            out.append([str(e.status()).replace("StatusCode.", ""), e.message()[:200]])
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:6])))
