"""Open any PyTorch source as (manifest, nn.Module): a zoo artifact dir, a torch.export ``.pt2``
program, a Hugging Face ``save_pretrained`` directory (sequence or image classifier), or a torchvision
classification model by name with a weights file.

Each loader is one entry of ``LOADERS``; ``open_source`` picks one from what the path holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ArtifactError, MissingDependencyError
from ..manifest import MANIFEST, Artifact, Manifest, TensorSpec, is_artifact, load_artifact, sha256_path
from .. import data as datasets
from . import zoo


def _zoo_module(art: Artifact) -> torch.nn.Module:
    arch = (art.manifest.arch or {}).get("name")
    model = zoo.build(arch, (art.manifest.arch or {}).get("config"))
    try:
        state = torch.load(art.model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 — torch raises many types for a bad file
        raise ArtifactError(f"{art.model_path}: not a state_dict for architecture '{arch}' ({str(e).splitlines()[0]})") from None
    return model.eval()


class _Logits(torch.nn.Module):
    """Unwrap a Hugging Face text classifier's output object to its logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _ImageLogits(_Logits):
    """The same for an image classifier (pixel_values in)."""

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _is_image_model(cfg: dict) -> bool:
    return any(a.endswith("ForImageClassification") for a in cfg.get("architectures") or [])


def _hf_module(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    image = _is_image_model(_hf_config(path))
    auto = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    try:
        model = auto.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: not a loadable Hugging Face {'image' if image else 'sequence'} classifier "
                            f"({str(e).splitlines()[0]}); expected a save_pretrained directory with config.json "
                            "and weights") from None
    return (_ImageLogits if image else _Logits)(model.eval()).eval()


def _pt2_program(path: Path):
    try:
        return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: not a torch.export program ({str(e).splitlines()[0][:200]}); "
                            "expected a file written by torch.export.save") from None


def _pt2_module(path: Path) -> torch.nn.Module:
    return _pt2_program(path).module()  # already inference-only: torch.export modules refuse .eval()


TORCHVISION = "torchvision:"  # a source named torchvision:NAME, with --weights FILE (a state_dict)


def torchvision():
    """torchvision, imported on demand (an optional extra: pip install 'modelship[vision]')."""
    try:
        import torchvision as tv
    except Exception as e:  # noqa: BLE001 — a missing package, or a build that does not match this torch
        raise MissingDependencyError(f"torchvision does not import ({type(e).__name__}: {str(e)[:200]}); "
                                     "install the build that matches your torch: pip install 'modelship[vision]'") from None
    return tv


def tv_transform(name: str):
    """torchvision's own preprocessing for architecture ``name`` (resize, center crop, normalize), from its weights
    enum's metadata: nothing is downloaded."""
    return torchvision().models.get_model_weights(name).DEFAULT.transforms()


def _tv_build(name: str, num_classes: int):
    tv = torchvision()
    try:
        return tv.models.get_model(name, weights=None, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"torchvision model '{name}' cannot be built with {num_classes} classes ({e})") from None


def _tv_module(art: Artifact) -> torch.nn.Module:
    name = art.manifest.arch["name"]
    model = _tv_build(name, int(art.manifest.arch["config"]["num_classes"]))
    try:
        model.load_state_dict(torch.load(art.model_path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 — torch raises many types for a bad file or a wrong architecture
        raise ArtifactError(f"{art.model_path}: not a state_dict of torchvision's {name} "
                            f"({str(e).splitlines()[0][:300]})") from None
    return model.eval()


LOADERS = {
    "zoo": lambda art: _zoo_module(art),
    "hf": lambda art: _hf_module(art.model_path),
    "pt2": lambda art: _pt2_module(art.model_path),
    "torchvision": _tv_module,
}


def load_module(art: Artifact) -> torch.nn.Module:
    loader = art.manifest.loader or "zoo"
    if loader not in LOADERS:
        raise ArtifactError(f"{art.path}: unknown loader '{loader}'; expected one of {', '.join(LOADERS)}")
    return LOADERS[loader](art)


# ---- raw checkpoints (not yet artifacts) -------------------------------------------------------

def _hf_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}/config.json: unreadable ({e})") from None


def _hf_text_preprocess(path: Path, cfg: dict) -> dict | None:
    """The checkpoint's tokenizer, when it has one, as the manifest's preprocessing (files saved on export)."""
    from dataclasses import asdict

    from ..preprocess import TextSpec

    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{path}: its tokenizer files do not load ({str(e).splitlines()[0]})") from None
    limit = min(int(tok.model_max_length or 512), int(cfg.get("max_position_embeddings") or 512), 512)
    return asdict(TextSpec(max_length=limit))


def _hf_image_preprocess(path: Path) -> tuple[dict, list]:
    """The checkpoint's image processor (preprocessor_config.json) as an ImageSpec, and the input's shape."""
    from dataclasses import asdict

    from ..preprocess import ImageSpec

    try:
        proc = json.loads((path / "preprocessor_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}/preprocessor_config.json: unreadable ({e}); an image classifier needs its "
                            "image processor saved beside it (processor.save_pretrained(folder))") from None
    size = proc.get("size") or {}
    if not {"height", "width"} <= set(size) or proc.get("do_center_crop"):
        raise ArtifactError(f"{path}: image processor size {size} with center crop {bool(proc.get('do_center_crop'))}; "
                            "modelship reads processors that resize to a fixed height and width")
    pil = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}
    spec = ImageSpec(size=[int(size["height"]), int(size["width"])], mode="RGB",
                     resample=pil.get(int(proc.get("resample", 2)), "bilinear"),
                     scale=float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0,
                     mean=list(proc.get("image_mean", [0.0])) if proc.get("do_normalize", True) else [0.0],
                     std=list(proc.get("image_std", [1.0])) if proc.get("do_normalize", True) else [1.0])
    return asdict(spec), ["batch", 3, *spec.size]


def _hf_manifest(path: Path) -> Manifest:
    cfg = _hf_config(path)
    n = int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2)
    id2label = cfg.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(n)]
    # the checkpoint says its task: transformers treats problem_type "regression" (or one label) as regression
    regression = cfg.get("problem_type") == "regression" or (n == 1 and not cfg.get("problem_type"))
    if _is_image_model(cfg):
        preprocess, shape = _hf_image_preprocess(path)
        inputs = [TensorSpec("pixel_values", "float32", shape)]
        data = {"name": "random", "samples": 64}
    else:
        preprocess = _hf_text_preprocess(path, cfg)
        inputs = [TensorSpec(**t) for t in zoo.TEXT_IN]
        data = {"name": "tokens", "vocab_size": int(cfg.get("vocab_size", 30522)),
                "seq_len": min(32, int(cfg.get("max_position_embeddings", 512))), "samples": 128}
    return Manifest(
        name=path.name, task="regression" if regression else "classification", format="torch", precision="fp32",
        file=".", loader="hf", inputs=inputs, outputs=[TensorSpec("logits", "float32", ["batch", n])],
        labels=None if regression else labels, data=data, preprocess=preprocess,
        sha256=sha256_path(path), created_by="modelship import (hf)", extra={"model_type": cfg.get("model_type")},
        arch={"name": cfg.get("model_type"), "config": {  # what the optimizer and TensorRT profiles read
            "num_attention_heads": cfg.get("num_attention_heads") or cfg.get("n_heads"),
            "hidden_size": cfg.get("hidden_size") or cfg.get("dim"),
            "max_position_embeddings": cfg.get("max_position_embeddings")}})


def _spec(name: str, val) -> TensorSpec:
    """A TensorSpec from a torch.export fake tensor: symbolic dims get names, the first one 'batch'."""
    shape = [int(d) if isinstance(d, int) else ("batch" if j == 0 else f"dim{j}") for j, d in enumerate(val.shape)]
    return TensorSpec(name, str(val.dtype).replace("torch.", ""), shape)


def _output_names(ep, n: int) -> list[str]:
    """Output names as the program gives them: the keys of a returned dict or the fields of a returned named tuple;
    else ``logits`` for a single output and ``output0``, ``output1``, ... for several (``--output-names`` renames)."""
    spec = getattr(getattr(ep, "call_spec", None), "out_spec", None)
    flat = spec is not None and getattr(spec, "num_leaves", None) == n == getattr(spec, "num_children", None)
    context = getattr(spec, "context", None)
    if flat and spec.type is dict and len(context) == n:
        return [str(k) for k in context]
    if flat and isinstance(context, type) and len(getattr(context, "_fields", ())) == n:  # a named tuple's class
        return list(context._fields)
    return ["logits"] if n == 1 else [f"output{i}" for i in range(n)]


def _pt2_manifest(path: Path) -> Manifest:
    ep = _pt2_program(path)
    example = getattr(ep, "example_inputs", None)
    if not example or not example[0]:
        raise ArtifactError(f"{path}: this .pt2 program was saved without example inputs; expected one made by "
                            "torch.export.export(model, example_args) and saved with torch.export.save")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = [_spec(name, placeholders[name].meta["val"]) for name in ep.graph_signature.user_inputs]
    out_nodes = [n for n in ep.graph.nodes if n.op == "output"][0].args[0]
    names = _output_names(ep, len(out_nodes))
    outputs = [_spec(name, node.meta["val"]) for name, node in zip(names, out_nodes)]
    return Manifest(name=path.stem, task="regression",  # a .pt2 does not say its task: --task or --data tells
                    format="torch", precision="fp32", file=path.name, loader="pt2", inputs=inputs, outputs=outputs,
                    data={"name": "random", "samples": 128}, sha256=sha256_path(path),
                    created_by="modelship import (pt2)")


def _tv_manifest(name: str, weights: Path) -> Manifest:
    """torchvision classification model NAME with the user's weights: its class count from the weights' last
    Linear layer, its preprocessing from torchvision's own transform for the architecture (resize the shorter
    edge, center crop, ImageNet mean/std), read from the weights enum's metadata (nothing is downloaded)."""
    from dataclasses import asdict

    from ..preprocess import ImageSpec

    tv = torchvision()
    known = tv.models.list_models(module=tv.models)
    if name not in known:
        raise ArtifactError(f"torchvision has no classification model '{name}'; expected one of "
                            f"{', '.join(known[:12])}, ... ({len(known)} in all)")
    if not weights.is_file():
        raise ArtifactError(f"{weights}: weights file not found; expected the state_dict of {name} "
                            "(torch.save(model.state_dict(), FILE))")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(f"{weights}: not a state_dict ({str(e).splitlines()[0][:200]}); expected "
                            "torch.save(model.state_dict(), FILE)") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{weights}: holds a {type(state).__name__}, not a state_dict; expected "
                            "torch.save(model.state_dict(), FILE)")
    head = [m for m, mod in _tv_build(name, 1000).named_modules() if isinstance(mod, torch.nn.Linear)][-1]
    if f"{head}.weight" not in state:
        raise ArtifactError(f"{weights}: no '{head}.weight' (the classifier of torchvision's {name}); is it the "
                            "state_dict of another architecture?")
    n = int(state[f"{head}.weight"].shape[0])
    t = tv_transform(name)
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    spec = ImageSpec(size=[crop, crop], shortest_edge=resize, resample=t.interpolation.value, scale=1 / 255,
                     mean=[float(x) for x in t.mean], std=[float(x) for x in t.std])
    return Manifest(name=name, task="classification", format="torch", precision="fp32", file=weights.name,
                    loader="torchvision", inputs=[TensorSpec("images", "float32", ["batch", 3, crop, crop])],
                    outputs=[TensorSpec("logits", "float32", ["batch", n])], labels=[str(i) for i in range(n)],
                    data={"name": "random", "samples": 64}, preprocess=asdict(spec), sha256=sha256_path(weights),
                    created_by="modelship import (torchvision)", arch={"name": name, "config": {"num_classes": n}})


TASKS = ("classification", "regression")


def open_source(path: str | Path, data: str | None = None, task: str | None = None,
                weights: str | Path | None = None, output_names: list[str] | None = None
                ) -> tuple[Artifact, torch.nn.Module]:
    """Open an artifact dir, a ``.pt2`` file, a HF directory, or ``torchvision:NAME`` with ``weights`` (a
    state_dict file) as (Artifact, eval-mode module).

    Raw checkpoints become an in-memory artifact rooted at the checkpoint's folder. ``data`` is a
    shipped dataset's name (``digits``) or the user's ``.npz`` to evaluate on (recorded with its sha256).
    ``task`` overrides what the checkpoint says (a ``.pt2`` says nothing: regression unless told, or
    unless its data defines a classification task). The task never comes from the output shape.
    ``output_names`` renames the outputs (default: the program's own names, see ``_output_names``).
    """
    p = Path(path)
    if str(path).startswith(TORCHVISION):
        if weights is None:
            raise ArtifactError(f"{path}: a torchvision model needs its weights: pass --weights FILE (a state_dict)")
        w = Path(weights)
        art = Artifact(w.parent.resolve(), _tv_manifest(str(path)[len(TORCHVISION):], w))
    elif weights is not None:
        raise ArtifactError(f"--weights is for torchvision:NAME sources; {path} carries its own weights")
    elif not p.exists():
        raise ArtifactError(f"{p}: no such file or directory; expected an artifact directory, a .pt2 file, "
                            "a Hugging Face model directory or torchvision:NAME with --weights")
    elif p.is_dir() and is_artifact(p):
        art = load_artifact(p)
        if art.manifest.format != "torch":
            raise ArtifactError(f"{p}: a '{art.manifest.format}' artifact, expected a PyTorch source "
                                "(a 'torch' artifact, a .pt2 file or a Hugging Face directory)")
    elif p.is_dir() and (p / "config.json").is_file():
        art = Artifact(p.resolve(), _hf_manifest(p))
    elif p.is_file() and p.suffix == ".pt2":
        art = Artifact(p.parent.resolve(), _pt2_manifest(p))
    elif p.is_dir():
        raise ArtifactError(f"{p}: a folder without {MANIFEST} or config.json; expected an artifact directory "
                            "or a Hugging Face save_pretrained directory")
    else:
        raise ArtifactError(f"{p}: not a checkpoint; expected an artifact directory, a torch.export .pt2 file "
                            "or a Hugging Face directory")
    if task is not None and task not in TASKS:
        raise ArtifactError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    spec = datasets.resolve(data)
    if spec:
        if datasets.has_raw(spec) and spec["name"] != "digits" and not art.manifest.preprocess:
            raise ArtifactError(f"{data}: raw {'texts' if spec['name'] in ('text', 'drugreview', 'rottentomatoes') else 'images'}, but "
                                f"{p} records no preprocessing (a tokenizer or an image processor beside the "
                                "model); pass tensors as --data FILE.npz")
        folder = Path(spec.get("path", ""))
        if spec["name"] == "images" and art.manifest.loader == "torchvision" and folder.is_dir():
            classes = sorted(d.name for d in folder.iterdir() if d.is_dir())  # torchvision's ImageFolder order
            if len(classes) == len(art.manifest.labels):
                art.manifest.labels = classes
        if spec["name"] in ("text", "images") and art.manifest.labels:
            spec["labels"] = art.manifest.labels  # labels in the file may be names: map them to indices
        art.manifest.data = spec
        shipped_task = datasets.SHIPPED.get(spec["name"])
        if shipped_task and task is None and art.manifest.loader == "pt2":
            art.manifest.task = shipped_task
        if spec["name"] == "digits":
            art.manifest.labels = art.manifest.labels or zoo.DIGIT_LABELS
    if task:
        art.manifest.task = task
    if art.manifest.task != "classification":
        art.manifest.labels = None
    if output_names:
        outs = art.manifest.outputs
        if len(output_names) != len(outs) or len(set(output_names)) != len(output_names):
            raise ArtifactError(f"--output-names {','.join(output_names)}: the model has {len(outs)} output(s) "
                                f"({', '.join(t.name for t in outs)}); expected as many distinct names")
        for t, name in zip(outs, output_names):
            t.name = name
    return art, load_module(art)


def save_source(art: Artifact, out_dir: str | Path) -> Artifact:
    """Copy a source opened by ``open_source`` (a Hugging Face folder, a ``.pt2``, a zoo artifact) into a
    self-contained torch artifact at ``out_dir``: the model file or folder, its preprocessing (a tokenizer is
    recorded in ``preprocess/``), and the evaluation data and task it was opened with. It is the root of what
    is made from it: served as the PyTorch variant, and the reference every other variant is judged against."""
    import shutil
    from dataclasses import replace

    from ..manifest import relpath, write_artifact
    from ..preprocess import carry

    from ..paths import check_out

    out = Path(out_dir)
    check_out(out, source=art.path if is_artifact(art.path) else art.model_path, weights=art.model_path,
              data=(art.manifest.data or {}).get("path"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    src = art.model_path
    file = "model" if src.is_dir() else src.name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, out / file)
    man = replace(art.manifest, file=file, reference=None, parity=None, integrity=None,
                  parent=relpath(src, out), parent_sha256=art.manifest.sha256,
                  created_by=art.manifest.created_by or "modelship import")
    man.preprocess = carry(art, out)
    return write_artifact(out, man)
