"""Raw samples -> the reference model's feed, the way the source checkpoint does it: transformers' AutoTokenizer /
AutoImageProcessor for a Hugging Face folder, torchvision's transform for a torchvision model, the zoo entry's
declared transform for a zoo model. Parity preprocesses each raw sample twice — the recorded way
(``modelship.preprocess``, what serving runs) for the candidate, this way for the reference — so a preprocessing
recorded wrong (a normalization constant, a length, a tokenizer file) fails parity against the PyTorch model."""

from __future__ import annotations

import io

import numpy as np

from ..errors import ArtifactError
from ..preprocess import ImagePreprocessor, TextSpec, select_inputs, spec_from_dict


def _tokenize(tok, max_length: int, names: list):
    """A transformers tokenizer as a reference preprocessor: padded to the longest text, cut at ``max_length``."""
    def text(texts):
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feed = {k: np.asarray(v, np.int64) for k, v in enc.items()}
        feed.setdefault("token_type_ids", np.zeros_like(feed["input_ids"]))  # RoBERTa, DistilBERT: none
        return select_inputs(feed, names)
    return text


def reference_preprocessor(ref_art):
    """Raw samples → the reference model's feed, done the way the source checkpoint does it (None when it has
    no preprocessing): transformers' AutoTokenizer / AutoImageProcessor for a Hugging Face folder,
    torchvision's transform for a torchvision model, the zoo entry's declared transform for a zoo model."""
    spec = spec_from_dict(ref_art.manifest.preprocess)
    if spec is None:
        return None
    from PIL import Image

    names = [t.name for t in ref_art.manifest.inputs]
    if ref_art.manifest.loader == "hf":
        src = ref_art.model_path
        if isinstance(spec, TextSpec):
            from transformers import AutoTokenizer

            return _tokenize(AutoTokenizer.from_pretrained(str(src), local_files_only=True), spec.max_length, names)
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(src), local_files_only=True)
        return lambda images: {names[0]: np.asarray(proc([Image.open(io.BytesIO(b)).convert("RGB") for b in images],
                                                         return_tensors="np")["pixel_values"], np.float32)}
    if ref_art.manifest.loader == "torchvision":  # torchvision's own transform for the architecture
        from .checkpoints import tv_transform

        t = tv_transform(ref_art.manifest.arch["name"])
        return lambda images: {names[0]: np.stack([t(Image.open(io.BytesIO(b)).convert("RGB")).numpy()
                                                   for b in images]).astype(np.float32)}
    from . import zoo

    declared = spec_from_dict((zoo.entry((ref_art.manifest.arch or {}).get("name")).preprocess or {}))
    if declared is None:
        raise ArtifactError(f"{ref_art.path}: the zoo model declares no preprocessing, but its manifest records one")
    if isinstance(declared, TextSpec):  # the encoder's own tokenizer, as the model was trained with it
        from . import text

        return _tokenize(text.tokenizer(), declared.max_length, names)
    image = ImagePreprocessor(declared, None, ref_art.manifest.inputs)  # the zoo's declared constants
    return lambda images: image(images)[0]
