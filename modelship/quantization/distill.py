"""Knowledge distillation: a smaller zoo student learns from a teacher's soft targets on the teacher's
shipped data. The report compares teacher, distilled student and the same student trained without
distillation (accuracy, parameters, latency); the student is an ordinary torch artifact."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from ..bench import measure
from ..errors import ArtifactError
from ..lineage import lineage
from ..manifest import Artifact, write_artifact
from .. import data as datasets
from ..models import train as training
from ..models import zoo
from ..models.checkpoints import open_source
from ..paths import check_out


def _latency_ms(module: torch.nn.Module, x: torch.Tensor, seconds: float = 0.5) -> float:
    with torch.inference_mode():
        return float(np.median(measure(lambda: module(x), seconds)))


def distill(teacher_path: str | Path, out_dir: str | Path, student: str = "mlp-small", temperature: float = 2.0,
            alpha: float = 0.5, seed: int = 0, epochs: int | None = None, baseline: bool = True) -> tuple[Artifact, dict]:
    check_out(out_dir, teacher=teacher_path)
    teacher_art, teacher = open_source(teacher_path)
    tm = teacher_art.manifest
    if not datasets.has_training_data(tm.data):
        raise ArtifactError(f"{teacher_art.path}: the teacher has no shipped training data (data: "
                            f"{(tm.data or {}).get('name', 'none')}); distillation needs a labelled training split "
                            "such as digits")
    entry = zoo.entry(student)
    if entry.data != tm.data or [t["name"] for t in entry.inputs] != [t.name for t in tm.inputs]:
        raise ArtifactError(f"student '{student}' does not take the teacher's inputs/data; pick a zoo student "
                            f"trained on {tm.data.get('name')}, e.g. mlp-small or cnn-small")
    torch.manual_seed(seed)
    model = training.fit(zoo.build(student), entry, seed=seed, epochs=epochs, teacher=teacher,
                         temperature=temperature, alpha=alpha)
    x1 = torch.from_numpy(datasets.load(tm.data, "test", tm.inputs)[0][tm.inputs[0].name][:1])
    report = {
        "teacher": {"artifact": str(teacher_art.path), "arch": (tm.arch or {}).get("name"),
                    "accuracy": training.accuracy(teacher, entry), "parameters": zoo.param_count(teacher),
                    "p50_ms": _latency_ms(teacher, x1)},
        "student": {"arch": student, "accuracy": training.accuracy(model, entry),
                    "parameters": zoo.param_count(model), "p50_ms": _latency_ms(model, x1)},
        "temperature": temperature, "alpha": alpha, "seed": seed,
    }
    if baseline:
        torch.manual_seed(seed)
        plain = training.fit(zoo.build(student), entry, seed=seed, epochs=epochs)
        report["student_without_distillation"] = {"arch": student, "accuracy": training.accuracy(plain, entry),
                                                  "parameters": zoo.param_count(plain), "p50_ms": _latency_ms(plain, x1)}
    report["parameter_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
    report["latency_ratio"] = report["student"]["p50_ms"] / report["teacher"]["p50_ms"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    man = copy.deepcopy(tm)
    man.name = f"{tm.name}-student"
    man.file, man.loader, man.created_by = "model.pt", "zoo", "modelship distill"
    man.arch = {"name": student, "config": entry.config}
    man.parity = None
    for k, v in lineage(teacher_art, out).items():  # its reference is the teacher's root: what it replaces
        setattr(man, k, v)
    man.extra = {"distillation": report, "parameters": report["student"]["parameters"],
                 "test_accuracy": report["student"]["accuracy"],
                 "distilled_from": {"name": tm.name, "sha256": tm.sha256}}
    return write_artifact(out, man), report
