"""Preprocessing that travels with a model: raw text or an encoded image in, the model's input tensors out.

``manifest.preprocess`` says how (a ``TextSpec`` or an ``ImageSpec``); a tokenizer's files sit in the artifact's
``preprocess/`` folder, hashed in the spec, copied into every derived artifact and into the ``.mar``.
``open_preprocessor(artifact)`` is the one implementation that the handler, parity and the load test use.
``modelship.models.reference`` does the same job the original way (the checkpoint's own tokenizer or image
processor), so a preprocessing recorded wrong fails parity against the PyTorch model.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError

FOLDER = "preprocess"
TRUNCATION = ("truncate", "refuse")
RESAMPLE = ("nearest", "bilinear", "bicubic", "box", "lanczos")


@dataclass
class TextSpec:
    """Tokenize with ``preprocess/tokenizer.json``; at most ``max_length`` tokens per text, longer texts cut
    (``truncate``: the answer says ``"truncated": true``) or refused with a 400 (``refuse``)."""

    max_length: int
    truncation: str = "truncate"
    max_chars: int = 100_000  # a text longer than this is refused before it is tokenized
    sha256: str = ""  # of the preprocess/ folder
    kind: str = "text"


@dataclass
class ImageSpec:
    """Decode (PNG, JPEG, ...) → ``mode`` (L: one channel, RGB: three) → resize (to ``resize`` [h, w], or the
    shorter edge to ``shortest_edge`` keeping the aspect ratio, as torchvision's ``Resize(int)``), then a center
    crop to ``size``; or straight to ``size`` → × ``scale`` → (x − mean) / std per channel → channels first."""

    size: list  # [h, w] the model takes
    mode: str = "RGB"
    resize: list | None = None  # [h, w] before a center crop to ``size``; None: straight to ``size``
    shortest_edge: int | None = None  # resize the shorter edge to this (torchvision), then center crop to ``size``
    resample: str = "bilinear"
    scale: float = 1 / 255
    mean: list = field(default_factory=lambda: [0.0])
    std: list = field(default_factory=lambda: [1.0])
    max_pixels: int = 40_000_000  # decompression bombs: an image claiming more pixels is refused before decoding
    kind: str = "image"


def spec_from_dict(d: dict | None):
    if not d:
        return None
    kinds = {"text": TextSpec, "image": ImageSpec}
    if d.get("kind") not in kinds:
        raise ArtifactError(f"preprocess kind '{d.get('kind')}'; expected one of {', '.join(kinds)}")
    cls = kinds[d["kind"]]
    try:
        spec = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
    except TypeError as e:
        raise ArtifactError(f"preprocess spec is malformed ({e})") from None
    if isinstance(spec, TextSpec) and spec.truncation not in TRUNCATION:
        raise ArtifactError(f"preprocess truncation '{spec.truncation}'; expected one of {', '.join(TRUNCATION)}")
    if isinstance(spec, ImageSpec) and spec.resample not in RESAMPLE:
        raise ArtifactError(f"preprocess resample '{spec.resample}'; expected one of {', '.join(RESAMPLE)}")
    return spec


# ---- the serving implementation ---------------------------------------------------------------------------

class TextPreprocessor:
    kind = "text"

    def __init__(self, spec: TextSpec, folder: Path, inputs):
        from tokenizers import Tokenizer

        self.spec, self.inputs = spec, [t.name for t in inputs]
        try:
            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 — the tokenizers library raises its own types
            raise ArtifactError(f"{folder}/tokenizer.json: not a readable tokenizer ({e})") from None
        pad = self.tok.padding or {}
        self.pad_id = pad.get("pad_id", self.tok.token_to_id("[PAD]") or self.tok.token_to_id("<pad>") or 0)
        self.tok.no_padding()
        self.tok.enable_truncation(spec.max_length)

    def __call__(self, texts: list) -> tuple[dict, list[dict]]:
        """Token ids, attention mask (and token type ids when the model takes them), padded to the longest text;
        with one note per text (``{"truncated": True}`` for a cut one)."""
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"expected text, got {type(t).__name__}")
            if not t.strip():
                raise InputError("empty text; expected at least one word")
            if len(t) > self.spec.max_chars:
                raise InputError(f"text of {len(t)} characters; this model takes at most {self.spec.max_chars}")
        encs = [self.tok.encode(t) for t in texts]  # not encode_batch: its thread pool spins beside the runner's
        notes = []
        for t, e in zip(texts, encs):
            cut = bool(e.overflowing)
            if cut and self.spec.truncation == "refuse":
                raise InputError(f"text of more than {self.spec.max_length} tokens ({len(t)} characters); this "
                                 f"model takes at most {self.spec.max_length} (send a shorter text)")
            notes.append({"truncated": True} if cut else {})
        n = max(len(e.ids) for e in encs)
        ids = np.full((len(encs), n), self.pad_id, np.int64)
        mask = np.zeros((len(encs), n), np.int64)
        types = np.zeros((len(encs), n), np.int64)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)], mask[i, :len(e.ids)], types[i, :len(e.ids)] = e.ids, 1, e.type_ids
        return select_inputs({"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, self.inputs), notes


class ImagePreprocessor:
    kind = "image"

    def __init__(self, spec: ImageSpec, folder: Path | None, inputs):
        self.spec, self.input = spec, inputs[0].name

    def __call__(self, images: list) -> tuple[dict, list[dict]]:
        return {self.input: np.stack([self.one(b) for b in images])}, [{} for _ in images]

    def one(self, data) -> np.ndarray:
        img = decode_image(data, self.spec.max_pixels)
        try:
            return image_array(img, self.spec)
        except Exception as e:  # noqa: BLE001 — a decodable header whose pixels or mode PIL cannot convert
            raise InputError(f"cannot read this {img.format or ''} image's pixels ({str(e)[:200] or type(e).__name__})"
                             "; expected a PNG or JPEG file of 8-bit grey or RGB pixels") from None


IMAGE_FORMATS = ["PNG", "JPEG"]  # what the REST contract takes; PIL would open any format it knows


def decode_image(data, max_pixels: int):
    """Bytes of an encoded image → a PIL image, refusing what is not an image, a corrupt one, and one over the
    pixel cap (checked from the header, before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InputError("empty image; expected the bytes of a PNG or JPEG image")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # not EPS (Ghostscript), PSD, TIFF, ...
    except UnidentifiedImageError:
        raise InputError("not an image; expected the bytes of a PNG or JPEG image (Content-Type: image/png or "
                         "image/jpeg, or base64 in JSON as {\"inputs\": {\"image_b64\": ...}})") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image too large ({e})") from None
    except Exception as e:  # noqa: BLE001 — a known signature, then a broken header: PIL's OSError, SyntaxError, ...
        raise InputError(f"corrupt image header ({str(e)[:200] or type(e).__name__}); expected a complete PNG or "
                         "JPEG file") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(f"image of {w}x{h} = {w * h:,} pixels; this model takes at most {max_pixels:,}")
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError for damaged files
        raise InputError(f"corrupt {img.format or ''} image ({str(e)[:200]}); expected a complete image file") from None
    return img


def image_array(img, spec: ImageSpec) -> np.ndarray:
    """One decoded image → a float32 [C, H, W] array, as ``spec`` says."""
    from PIL import Image

    resample = getattr(Image.Resampling, spec.resample.upper())
    img = img.convert(spec.mode)
    h, w = spec.size
    if spec.shortest_edge:  # torchvision's Resize(int) and CenterCrop, with their rounding
        iw, ih = img.size
        short, long = (iw, ih) if iw <= ih else (ih, iw)
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        rw, rh = (new_short, new_long) if iw <= ih else (new_long, new_short)
        img = img.resize((rw, rh), resample)
        top, left = int(round((rh - h) / 2.0)), int(round((rw - w) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    elif spec.resize:
        rh, rw = spec.resize
        img = img.resize((rw, rh), resample)
        top, left = (rh - h) // 2, (rw - w) // 2
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), resample)
    x = np.asarray(img, dtype=np.float32) * np.float32(spec.scale)
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(-1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def select_inputs(feed: dict, names: list) -> dict:
    missing = [n for n in names if n not in feed]
    if missing:
        raise ArtifactError(f"the tokenizer makes {', '.join(feed)}; the model also takes {', '.join(missing)}")
    return {n: feed[n] for n in names}


PREPROCESSORS = {"text": TextPreprocessor, "image": ImagePreprocessor}


def open_preprocessor(art):
    """The artifact's recorded preprocessing (None when it has none); its files must match their hash."""
    from .manifest import sha256_path

    spec = spec_from_dict(art.manifest.preprocess)
    if spec is None:
        return None
    folder = art.path / FOLDER
    if isinstance(spec, TextSpec):
        if not (folder / "tokenizer.json").is_file():
            raise ArtifactError(f"{art.path}: the manifest records a tokenizer but {FOLDER}/tokenizer.json is missing")
        if sha256_path(folder) != spec.sha256:
            raise ArtifactError(f"{folder}: sha256 does not match the manifest; the tokenizer files were modified "
                                "after the artifact was written — rebuild it")
    return PREPROCESSORS[spec.kind](spec, folder, art.manifest.inputs)


def preprocessed(art, spec: dict, split: str, limit: int) -> dict:
    """The first ``limit`` samples of a split of ``spec`` as ``art`` takes them: raw samples (texts, images) through
    its recorded preprocessing (what serving runs), tensors as they are: the feed for calibration, INT8
    sensitivity and in-process benchmarks."""
    from . import data as datasets

    if art.manifest.preprocess and datasets.has_raw(spec):
        raw, _ = datasets.load_raw(spec, split)
        return open_preprocessor(art)(raw[:limit])[0]
    feed, _ = datasets.load(spec, split, art.manifest.inputs)
    return {k: v[:limit] for k, v in feed.items()}


def carry(src, out_dir) -> dict | None:
    """Copy ``src``'s preprocessing files into ``out_dir`` and return its spec (for a derived artifact). A raw
    Hugging Face checkpoint's tokenizer is saved from the checkpoint folder itself."""
    import shutil

    spec = spec_from_dict(src.manifest.preprocess)
    if spec is None:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if (src.path / FOLDER).is_dir():
        shutil.copytree(src.path / FOLDER, Path(out_dir) / FOLDER, dirs_exist_ok=True)
    elif isinstance(spec, TextSpec):  # a raw checkpoint: its tokenizer lives in the checkpoint folder
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(src.model_path), local_files_only=True)
        return record_tokenizer(tok, out_dir, spec.max_length, spec.truncation)
    return asdict(spec)


def record_tokenizer(tokenizer, out_dir: Path, max_length: int, truncation: str = "truncate") -> dict:
    """Save a transformers fast tokenizer into ``out_dir/preprocess`` and return the manifest's spec."""
    from .manifest import sha256_path

    if not getattr(tokenizer, "is_fast", False):
        raise ArtifactError("the checkpoint's tokenizer has no fast (tokenizer.json) form; modelship serves fast "
                            "tokenizers only")
    folder = Path(out_dir) / FOLDER
    tokenizer.save_pretrained(str(folder))
    for extra in folder.iterdir():  # only the files the serving side reads, so the hash covers what is used
        if extra.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            extra.unlink()
    return asdict(TextSpec(max_length=max_length, truncation=truncation, sha256=sha256_path(folder)))
