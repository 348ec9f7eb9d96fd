"""Small randomly initialised Hugging Face checkpoints of each family modelship imports, with real tokenizers
and image processors built here from a few texts (no downloads), saved as save_pretrained folders."""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from modelship import data as datasets

MAX_LENGTH = 128
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def reviews(n: int = 48, split: str = "test") -> tuple[list[str], np.ndarray]:
    texts, y = datasets.drugreview_raw({"name": "drugreview", "limit": n}, split)
    return texts, y


def write_reviews_csv(path: Path, n: int = 48) -> Path:
    texts, y = reviews(n)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for t, label in zip(texts, y):
            w.writerow([t, datasets.DRUGREVIEW_LABELS[label]])
    return path


def _wordpiece_vocab(folder: Path, texts: list[str], size: int = 400) -> Path:
    words = Counter(re.findall(r"[a-z]+", " ".join(texts).lower()))
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    marks = list("0123456789.,!?'\"-()/&:;%$")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *[f"##{c}" for c in letters], *marks]
    vocab += [w for w, _ in words.most_common(size) if w not in vocab]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder / "vocab.txt"


def text_classifier(folder: Path, family: str = "bert", labels=("negative", "neutral", "positive"), seed: int = 0) -> Path:
    """A sequence classifier of ``family`` (bert, minilm, distilbert, roberta) with its fast tokenizer."""
    import transformers as tf

    torch.manual_seed(seed)
    texts, _ = reviews(200, "train")
    label_kw = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={v: i for i, v in enumerate(labels)})
    folder = Path(folder)
    if family == "roberta":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        folder.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(folder))
        tok = tf.RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                                      model_max_length=MAX_LENGTH)
        cfg = tf.RobertaConfig(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=1,
                               type_vocab_size=1, **SMALL, **label_kw)
        model = tf.RobertaForSequenceClassification(cfg)
    else:
        vocab = _wordpiece_vocab(folder, texts)
        if family == "distilbert":
            tok = tf.DistilBertTokenizerFast(vocab=str(vocab), model_max_length=MAX_LENGTH)
            cfg = tf.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                      max_position_embeddings=MAX_LENGTH, **label_kw)
            model = tf.DistilBertForSequenceClassification(cfg)
        else:  # bert, and MiniLM (a BERT architecture with its own sizes)
            tok = tf.BertTokenizerFast(vocab=str(vocab), model_max_length=MAX_LENGTH)
            sizes = dict(SMALL, hidden_size=48, num_attention_heads=3) if family == "minilm" else SMALL
            cfg = tf.BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=MAX_LENGTH, **sizes, **label_kw)
            model = tf.BertForSequenceClassification(cfg)
    assert tok.vocab_size > 100 and tok.unk_token_id not in tok("the drug")["input_ids"], "tokenizer lost its vocabulary"
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def image_classifier(folder: Path, labels=("a", "b", "c"), size: int = 32, seed: int = 0) -> Path:
    """A small ViT with its image processor (resize to size x size, rescale, normalize by 0.5)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.ViTConfig(image_size=size, patch_size=8, num_channels=3, **SMALL, num_labels=len(labels),
                       id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    tf.ViTForImageClassification(cfg).eval().save_pretrained(folder)
    tf.ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return Path(folder)


def png(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    shape = (h, w, 3) if mode == "RGB" else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, labels=("a", "b", "c"), per_class: int = 8, seed: int = 0) -> Path:
    """ImageFolder layout: ROOT/CLASS/*.png, images of assorted sizes."""
    rng = np.random.default_rng(seed)
    for c in labels:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"{i}.png").write_bytes(png(rng, int(rng.integers(24, 64)), int(rng.integers(24, 64))))
    return root


def fine_tune(folder: Path, per_class: int = 40, epochs: int = 20, seed: int = 0) -> Path:
    """Train a text classifier from ``text_classifier`` for a few epochs on real reviews, as many of each class,
    so that it separates them (a random one predicts one class with near-equal logits, which no parity gate can
    judge)."""
    import transformers as tf

    torch.manual_seed(seed)
    texts, y = reviews(480, "train")
    pick = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
    pick = np.random.default_rng(seed).permutation(pick)
    texts, y = [texts[i] for i in pick], y[pick]
    tok = tf.AutoTokenizer.from_pretrained(str(folder))
    model = tf.AutoModelForSequenceClassification.from_pretrained(str(folder)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], padding=True, truncation=True, max_length=64, return_tensors="pt")
            loss = model(**enc, labels=torch.as_tensor(y[i:i + 16])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().save_pretrained(folder)
    return folder
