"""ResNet-like CNN (ResNet-18 layout, 3x224x224) at batch 1 and 32: torch eager on CPU vs torch on CUDA vs
ONNX Runtime's CUDA execution provider (and TensorRT when installed). Medians over interleaved rounds.

Usage (on a machine with an NVIDIA GPU): python benchmarks/gpu.py [--rounds 5] [--seconds 1]
"""

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelship.bench import measure, scratch


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet_like(classes=1000):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    model = resnet_like()
    path = Path(scratch()) / "resnet.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    gpu = model.cuda()
    cpu = resnet_like().eval()
    cpu.load_state_dict(model.state_dict())
    cpu = cpu.cpu()
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider", sess.get_providers()
    print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}, onnxruntime {ort.__version__}")
    for batch in (1, 32):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
        xt = torch.from_numpy(x)

        def torch_cpu():
            with torch.inference_mode():
                return cpu(xt)

        def torch_cuda():
            with torch.inference_mode():
                y = gpu(xt.cuda()).cpu()  # host in, host out: the same work as the ONNX Runtime call
            return y

        def ort_cuda():
            return sess.run(None, {"pixels": x})

        with torch.inference_mode():
            ref = cpu(xt).numpy()
        diff_t = float(np.abs(torch_cuda().numpy() - ref).max())
        diff_o = float(np.abs(ort_cuda()[0] - ref).max())
        fns = {"torch eager (CPU)": torch_cpu, "torch CUDA": torch_cuda, "onnxruntime CUDA": ort_cuda}
        p50 = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                p50[k].append(float(np.median(measure(fn, args.seconds if k != "torch eager (CPU)" else 1.0,
                                                      warmup=3, min_iters=5))))
        print(f"batch {batch}: max |diff| vs CPU eager: torch CUDA {diff_t:.2e}, onnxruntime CUDA {diff_o:.2e}")
        for k, v in p50.items():
            print(f"  {k:22s} p50 {statistics.median(v):9.3f} ms")
        for k in ("torch CUDA", "onnxruntime CUDA"):
            r = statistics.median(a / b for a, b in zip(p50[k], p50["torch eager (CPU)"]))
            print(f"  ratio {k} / torch eager CPU: {r:.4f}")
        r = statistics.median(a / b for a, b in zip(p50["onnxruntime CUDA"], p50["torch CUDA"]))
        print(f"  ratio onnxruntime CUDA / torch CUDA: {r:.3f}")


if __name__ == "__main__":
    main()
