"""Imported first by the torchvision tests' subprocesses (PYTHONPATH). The torchvision wheels this project's
machines get are CUDA builds: beside the CPU-only torch their compiled ops cannot load, and `import torchvision`
then stops at two fake-kernel registrations that expect those ops to exist. Declaring the two schemas lets the
pure-Python model zoo import; the classification models use none of these ops. On a machine with a matching
torchvision this changes nothing (the ops exist and the definitions are skipped)."""

import torch

_lib = torch.library.Library("torchvision", "FRAGMENT")
for _op in ("nms", "qnms"):
    try:
        _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
        pass
