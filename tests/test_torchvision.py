"""torchvision classification models by name plus a weights file (``torchvision:NAME --weights FILE``): exported
with their preprocessing (shorter edge resized, center crop, ImageNet mean/std, read from torchvision's own
transform), judged on raw images against the model fed by torchvision's transform, and the bad inputs.

torchvision lives outside the venv's path (Makefile: .venv/torchvision); these tests run the CLI in a
subprocess with it and tests/torchvision_shim on PYTHONPATH (see the shim's docstring)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_models

ROOT = Path(__file__).resolve().parent.parent
TV = ROOT / ".venv" / "torchvision"


def run(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "torchvision_shim"), str(TV)])}
    return subprocess.run([sys.executable, "-m", "modelship", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def tv_python(code: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent / "torchvision_shim"), str(TV)])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A randomly initialised torchvision resnet18 with 3 classes, its state_dict saved, and an ImageFolder of
    PNGs of several sizes and aspect ratios."""
    assert TV.is_dir(), f"{TV} missing: make setup installs torchvision there"
    root = tmp_path_factory.mktemp("tv")
    tv_python("import torch, torchvision; torch.manual_seed(0); "
              "m = torchvision.models.get_model('resnet18', weights=None, num_classes=3); "
              f"torch.save(m.state_dict(), {str(root / 'resnet18.pth')!r})")
    hf_models.image_folder(root / "images", per_class=6)
    return root


def test_torchvision_model_exports_with_its_preprocessing_and_passes_parity_on_images(resnet, tmp_path):
    p = run("export", "torchvision:resnet18", "--weights", resnet / "resnet18.pth", "--data", resnet / "images",
            "--out", tmp_path / "onnx", "--json", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["passed"] and rec["samples"] == 18 and rec["max_abs_diff"] < 1e-3
    man = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    prep = man["preprocess"]
    assert (prep["kind"], prep["size"], prep["shortest_edge"], prep["resample"]) == ("image", [224, 224], 256, "bilinear")
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert man["outputs"][0]["shape"] == ["batch", 3] and man["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    torch_art = tmp_path / "onnx-torch"  # the imported PyTorch model: the reference of everything made from it
    ref = json.loads((torch_art / "manifest.json").read_text())
    assert ref["loader"] == "torchvision" and ref["arch"] == {"name": "resnet18", "config": {"num_classes": 3}}
    assert (tmp_path / "onnx" / man["reference"]).resolve() == torch_art.resolve()
    # a variant made from the export is judged against that reference, on the same raw images
    p = run("quantize", tmp_path / "onnx", "--mode", "fp16", "--out", tmp_path / "fp16", "--allow-weak-parity")
    assert p.returncode == 0, p.stderr


def test_torchvision_preprocessing_mismatch_fails_parity(resnet, tmp_path):
    """The served preprocessing is checked against torchvision's own: a wrong mean fails the export's gate."""
    p = run("export", "torchvision:resnet18", "--weights", resnet / "resnet18.pth", "--data", resnet / "images",
            "--out", tmp_path / "onnx")
    assert p.returncode == 0, p.stderr
    from modelship.manifest import load_artifact, write_artifact

    art = load_artifact(tmp_path / "onnx")
    art.manifest.preprocess = {**art.manifest.preprocess, "mean": [0.5, 0.5, 0.5]}
    write_artifact(art.path, art.manifest)
    p = run("parity", tmp_path / "onnx-torch", tmp_path / "onnx")
    assert p.returncode != 0 and "moved by max_abs_diff" in (p.stdout + p.stderr), p.stdout + p.stderr


@pytest.mark.parametrize("case", ["no_weights", "unknown_name", "other_architecture", "not_a_state_dict"])
def test_torchvision_bad_sources(resnet, tmp_path, case):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    if case == "other_architecture":
        tv_python("import torch, torchvision; m = torchvision.models.get_model('mobilenet_v3_small', weights=None, "
                  f"num_classes=3); torch.save(m.state_dict(), {str(tmp_path / 'mnv3.pth')!r})")
    args, want = {
        "no_weights": (("torchvision:resnet18",), "needs its weights: pass --weights FILE"),
        "unknown_name": (("torchvision:resnet9000", "--weights", resnet / "resnet18.pth"),
                         "torchvision has no classification model 'resnet9000'"),
        "other_architecture": (("torchvision:resnet18", "--weights", tmp_path / "mnv3.pth"), "no 'fc.weight'"),
        "not_a_state_dict": (("torchvision:resnet18", "--weights", tmp_path / "junk.pth"), "not a state_dict"),
    }[case]
    p = run("export", *args, "--out", tmp_path / "o")
    assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr, p.stderr
