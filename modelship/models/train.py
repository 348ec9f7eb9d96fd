"""Training zoo models on their shipped data, and knowledge distillation (same loop, soft targets)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as datasets
from .zoo import ZooEntry


def fit(model: torch.nn.Module, entry: ZooEntry, seed: int = 0, epochs: int | None = None,
        teacher: torch.nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
        progress=None, augment: bool | None = None) -> torch.nn.Module:
    """Adam + cosine schedule on the train split; with a teacher, loss = alpha*T^2*KL(soft) + (1-alpha)*CE."""
    torch.manual_seed(seed)
    feed, y = datasets.load(entry.data, "train", _specs(entry))
    x = torch.from_numpy(next(iter(feed.values())))
    y = torch.from_numpy(y)
    epochs = epochs or entry.epochs
    augment = entry.augment if augment is None else augment
    opt = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=entry.lr, total_steps=epochs * ((len(x) + 63) // 64))
    gen = torch.Generator().manual_seed(seed)
    soft_targets = {}  # the teacher's soft targets for the whole train set, per shift: computed once, not per batch
    model.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx]
            shift = (0, 0)
            if augment:  # light augmentation: random one-pixel shifts
                shift = tuple(torch.randint(-1, 2, (2,), generator=gen).tolist())
                xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx])
            if teacher is not None:  # soft targets on the same (augmented) batch the student sees
                if shift not in soft_targets:
                    with torch.no_grad():
                        shifted = torch.roll(x, shifts=shift, dims=(2, 3)) if augment else x
                        soft_targets[shift] = F.log_softmax(teacher(shifted) / temperature, dim=1)
                soft = soft_targets[shift][idx]
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, log_target=True,
                              reduction="batchmean")
                loss = alpha * temperature ** 2 * kd + (1 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            progress(epoch + 1, epochs)
    return model.eval()


def accuracy(model: torch.nn.Module, entry: ZooEntry, split: str = "test") -> float:
    feed, y = datasets.load(entry.data, split, _specs(entry))
    with torch.no_grad():
        pred = model(torch.from_numpy(next(iter(feed.values())))).argmax(1).numpy()
    return float(np.mean(pred == y))


def _specs(entry: ZooEntry):
    from ..manifest import TensorSpec
    return [TensorSpec(**t) for t in entry.inputs]


def train_artifact(arch: str, out_dir, seed: int = 0, epochs: int | None = None, name: str | None = None,
                   progress=None):
    """Train (or build, for config-only entries) a zoo model and write a ``torch`` artifact."""
    import time
    from pathlib import Path

    from ..manifest import Manifest, TensorSpec, write_artifact
    from . import zoo

    e = zoo.entry(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    config, preprocess, info = e.config, dict(e.preprocess) if e.preprocess else None, {}
    if arch == "text":  # the pretrained encoder, frozen, with a head fitted on its embeddings of real texts
        from ..preprocess import record_tokenizer
        from . import text

        model, info = text.train(e.data, e.preprocess["max_length"], seed=seed)
        config = {"encoder": text.encoder_config()}
        preprocess = record_tokenizer(text.tokenizer(), out, e.preprocess["max_length"])
    else:
        model = zoo.build(arch)
        if e.epochs:
            fit(model, e, seed=seed, epochs=epochs, progress=progress)
    model.eval()
    seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), out / "model.pt")
    data_name = e.data.get("name")
    man = Manifest(
        name=name or f"{data_name}-{arch}", task="classification", format="torch", precision="fp32",
        file="model.pt", inputs=[TensorSpec(**t) for t in e.inputs], outputs=[TensorSpec(**t) for t in e.outputs],
        labels=e.labels, loader=e.loader, arch={"name": arch, "config": config}, data=e.data, preprocess=preprocess,
        created_by="modelship train",
        extra={"seed": seed, "epochs": epochs or e.epochs, "train_seconds": round(seconds, 2),
               "parameters": zoo.param_count(model), **info})
    if arch == "text":
        man.extra["model_type"] = "bert"  # lets the optimizer apply its transformer fusions
    if data_name == "digits":
        man.extra["test_accuracy"] = accuracy(model, e)
    return write_artifact(out, man)
