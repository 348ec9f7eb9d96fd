"""Knowledge distillation: a smaller student learns from a teacher's soft targets. The report compares teacher,
distilled student and (digits) the same student trained without distillation: accuracy, parameters, latency; the
student is an ordinary torch artifact.

- Digits teachers: a smaller zoo student trained on the shipped digits data.
- Text teachers (the built-in text model, a Hugging Face sequence classifier): the teacher with fewer transformer
  layers, each initialised from the teacher's (DistilBERT's recipe), trained on the teacher's logits over its
  training texts and any unlabelled texts the user supplies, with the labels where the texts have them."""

from __future__ import annotations

import copy
import hashlib
import json
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
            alpha: float = 0.5, seed: int = 0, epochs: int | None = None, baseline: bool = True,
            layers: int | None = None, unlabelled: str | Path | None = None, log=lambda msg: None) -> tuple[Artifact, dict]:
    check_out(out_dir, teacher=teacher_path)
    teacher_art, teacher = open_source(teacher_path)
    tm = teacher_art.manifest
    if (tm.preprocess or {}).get("kind") == "text":
        return distill_text(teacher_art, teacher, out_dir, layers=layers, temperature=temperature, alpha=alpha,
                            seed=seed, epochs=epochs, unlabelled=unlabelled, log=log)
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


# ---- text teachers ------------------------------------------------------------------------------------------

TEXT_STUDENT = {"temperature": 2.0, "alpha": 0.5, "epochs": 2, "lr": 1e-4, "batch": 32, "warmup": 0.06,
                "weight_decay": 0.01}
# a text student is judged against its teacher as a different, smaller model: it must keep 97 % of the teacher's
# held-out accuracy (DistilBERT kept 97 % of BERT's) and agree with it on 0.8 of the held-out texts (the built-in
# teacher is right on 0.81 of them: texts near its boundary are where a smaller model answers otherwise; a student
# that answers the majority class agrees on about 0.6)
TEXT_STUDENT_AGREEMENT, TEXT_STUDENT_ACCURACY_KEPT = 0.8, 0.97


def _layer_list(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.ModuleList]:
    """(parent, its ``layer`` ModuleList): the transformer blocks of a BERT / RoBERTa / DistilBERT-style encoder."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layer":
            return module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module, m
    raise ArtifactError("the teacher has no list of transformer layers named 'layer' (BERT, RoBERTa, DistilBERT "
                        "and MiniLM have one); a text student is the teacher with fewer of them")


def fewer_layers(teacher: torch.nn.Module, layers: int) -> tuple[torch.nn.Module, list[int]]:
    """A copy of ``teacher`` keeping ``layers`` of its N transformer layers, evenly spaced and ending with the last
    (6 -> 3 keeps 1, 3, 5), each with the teacher's weights; the embeddings and the head are the teacher's."""
    student = copy.deepcopy(teacher)
    parent, blocks = _layer_list(student)
    n = len(blocks)
    if not 1 <= layers < n:
        raise ArtifactError(f"--layers {layers}: the teacher has {n} transformer layers; a student keeps 1 to {n - 1}")
    keep = [round((i + 1) * n / layers) - 1 for i in range(layers)]
    parent.layer = torch.nn.ModuleList(blocks[i] for i in keep)
    for m in student.modules():
        cfg = getattr(m, "config", None)
        for key in ("num_hidden_layers", "n_layers"):
            if cfg is not None and hasattr(cfg, key):
                setattr(cfg, key, layers)
    return student, keep


def _unlabelled_texts(path: str | Path | None) -> list[str]:
    if path is None:
        return []
    texts, _ = datasets.text_raw(datasets.resolve(str(path)) if Path(path).is_file() else {"path": str(path)}, "train")
    return texts


def _text_latency_ms(module: torch.nn.Module, encode, text: str) -> float:
    ids, mask = encode([text])
    with torch.inference_mode():
        return float(np.median(measure(lambda: module(ids, mask), 0.5)))


def distill_text(teacher_art: Artifact, teacher: torch.nn.Module, out_dir: str | Path, layers: int | None = None,
                 temperature: float | None = None, alpha: float | None = None, seed: int = 0,
                 epochs: int | None = None, unlabelled: str | Path | None = None, log=lambda msg: None):
    import torch.nn.functional as F

    from ..models.text import cached, fine_tune, predict, recipe as text_recipe
    from ..preprocess import carry, open_preprocessor

    tm = teacher_art.manifest
    spec = tm.data or {}
    extra_texts = _unlabelled_texts(unlabelled)
    if not datasets.has_raw(spec) and not extra_texts:
        raise ArtifactError(f"{teacher_art.path}: a text student learns from its teacher's answers on texts; this "
                            f"teacher records no texts (data: {spec.get('name', 'none')}): give it labelled texts "
                            "(--data texts.csv when importing it) or unlabelled ones (--unlabelled FILE)")
    texts, labels = datasets.load_raw(spec, "train") if datasets.has_raw(spec) else ([], None)
    test, y_test = datasets.load_raw(spec, "test") if datasets.has_raw(spec) else ([], None)
    prep = open_preprocessor(teacher_art)

    def encode(batch):
        feed = prep(batch)[0]
        return torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])

    settings = {**TEXT_STUDENT, **{k: v for k, v in (("temperature", temperature), ("alpha", alpha),
                                                          ("epochs", epochs)) if v is not None}}
    n_teacher = len(_layer_list(teacher)[1])
    layers = layers or max(1, n_teacher // 3)
    student, keep = fewer_layers(teacher, layers)
    every = texts + extra_texts
    hard = torch.full((len(every),), -100, dtype=torch.long)  # -100: no label (ignored by cross_entropy)
    if labels is not None:
        hard[:len(texts)] = torch.from_numpy(labels)
    t, a = settings["temperature"], settings["alpha"]

    def loss_fn(logits, idx_targets):
        target_logits, y = idx_targets[:, :-1], idx_targets[:, -1].long()
        kd = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target_logits / t, 1), log_target=True,
                      reduction="batchmean") * t * t
        if not (y >= 0).any():  # a batch of unlabelled texts: the teacher's answers only
            return kd
        return a * kd + (1 - a) * F.cross_entropy(logits, y, ignore_index=-100)

    def make():
        log(f"the teacher's logits on {len(every)} texts")
        targets = torch.cat([torch.from_numpy(predict(teacher, encode, every)), hard.unsqueeze(1).float()], 1)
        log(f"training a {layers}-layer student (layers {keep} of the teacher's {n_teacher}) for "
            f"{settings['epochs']} epoch(s)")
        return fine_tune(student, encode, every, targets, loss_fn, seed, log=log, **settings), {}

    # built once per teacher, texts, settings and seed (minutes on a CPU), like the teacher's own fine-tuning
    key = hashlib.sha256(json.dumps({"teacher": tm.sha256, "texts": every, "labels": hard.tolist(), "layers": layers,
                                     "settings": settings, "seed": seed, "recipe": text_recipe()}).encode()).hexdigest()
    state, _, hit = cached("text-student", key[:16], make, log)
    student.load_state_dict(state)
    student.eval()

    def accuracy(model):
        return float(np.mean(predict(model, encode, test).argmax(1) == y_test)) if y_test is not None else None

    probe = (test or every)[0]
    report = {
        "teacher": {"artifact": str(teacher_art.path), "arch": (tm.arch or {}).get("name"), "layers": n_teacher,
                    "accuracy": accuracy(teacher), "parameters": zoo.param_count(teacher),
                    "p50_ms": _text_latency_ms(teacher, encode, probe)},
        "student": {"arch": f"{(tm.arch or {}).get('name')} ({layers} layers)", "layers": layers, "kept_layers": keep,
                    "accuracy": accuracy(student), "parameters": zoo.param_count(student),
                    "p50_ms": _text_latency_ms(student, encode, probe)},
        "texts": len(texts), "unlabelled_texts": len(extra_texts), "seed": seed, "cached": hit, **settings,
    }
    report["parameter_ratio"] = report["student"]["parameters"] / report["teacher"]["parameters"]
    report["latency_ratio"] = report["student"]["p50_ms"] / report["teacher"]["p50_ms"]
    if report["teacher"]["accuracy"] is not None:
        report["accuracy_ratio"] = report["student"]["accuracy"] / report["teacher"]["accuracy"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    man = copy.deepcopy(tm)
    if (tm.loader or "zoo") == "hf":  # the teacher's folder (its tokenizer files), with the student's config, weights
        import shutil

        shutil.copytree(teacher_art.model_path, out / "model", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"))
        student.model.save_pretrained(out / "model")
        man.file = "model"
    else:
        torch.save(student.state_dict(), out / "model.pt")
        config = copy.deepcopy((tm.arch or {}).get("config") or {})
        config.setdefault("encoder", {})["num_hidden_layers"] = layers
        man.file, man.arch = "model.pt", {"name": (tm.arch or {}).get("name"), "config": config}
    man.name, man.created_by, man.parity = f"{tm.name}-student", "modelship distill", None
    man.preprocess = carry(teacher_art, out)
    for k, v in lineage(teacher_art, out).items():  # its reference is the teacher's root: what it replaces
        setattr(man, k, v)
    drop = round((1 - TEXT_STUDENT_ACCURACY_KEPT) * (report["teacher"]["accuracy"] or 0), 4) or None
    man.extra = {**{k: v for k, v in tm.extra.items() if k in ("model_type",)}, "distillation": report,
                 "parameters": report["student"]["parameters"], "test_accuracy": report["student"]["accuracy"],
                 "distilled_from": {"name": tm.name, "sha256": tm.sha256},
                 "student_tolerance": {"max_abs_diff": None, "min_top1_agreement": TEXT_STUDENT_AGREEMENT,
                                       "max_accuracy_drop": drop}}
    return write_artifact(out, man), report
