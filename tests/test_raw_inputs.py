"""Preprocessing travels with the model: each Hugging Face family imported with its tokenizer or image processor,
raw text and images in over REST (every form), bad raw input refused with a 400, and parity failing when the
recorded preprocessing differs from the checkpoint's own."""

import base64
import io
import json

import numpy as np
import pytest
import requests

import hf_models
from conftest import cli
from modelship.errors import InputError
from modelship.manifest import load_artifact, write_artifact
from modelship import data as datasets
from modelship.models.checkpoints import open_source
from modelship.models.reference import reference_preprocessor
from modelship.preprocess import open_preprocessor
from modelship.runners.torch_runner import TorchRunner
from modelship.serving.codec import Codec, softmax


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "minilm", "vit"])
def test_each_checkpoint_family_exports_with_its_preprocessing(tmp_path, family):
    if family == "vit":
        src = hf_models.image_classifier(tmp_path / family)
        data = hf_models.image_folder(tmp_path / "images")
    else:
        src = hf_models.text_classifier(tmp_path / family, family)
        data = hf_models.write_reviews_csv(tmp_path / "reviews.csv")
    cli("export", src, "--data", data, "--out", tmp_path / "onnx", "--json", tmp_path / "r.json", check=0)
    rec = json.loads((tmp_path / "r.json").read_text())
    onnx = load_artifact(tmp_path / "onnx")
    kind = onnx.manifest.preprocess["kind"]
    assert kind == ("image" if family == "vit" else "text") and rec["passed"] and rec["max_abs_diff"] < 1e-4
    assert rec["data"]["name"] == ("images" if family == "vit" else "text") and rec["samples"] == (24 if family == "vit" else 48)
    assert rec["reference_accuracy"] is not None  # the labels in the file (by name) were read
    # serving's preprocessing (the recorded one) and the checkpoint's own give the same tensors
    raw, _ = datasets.load_raw(onnx.manifest.data, "test")
    ours, _ = open_preprocessor(onnx)(raw[:8])
    theirs = reference_preprocessor(open_source(src)[0])(raw[:8])
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-6)
    if kind == "text":
        assert (onnx.path / "preprocess" / "tokenizer.json").is_file() and onnx.manifest.preprocess["sha256"]


def _judged_against_wrong_preprocessing(tmp_path, src, data, edit):
    cli("export", src, "--data", data, "--out", tmp_path / "onnx", check=0)
    art = load_artifact(tmp_path / "onnx")
    edit(art.manifest.preprocess)
    write_artifact(art.path, art.manifest)
    return cli("parity", src, tmp_path / "onnx", "--json", tmp_path / "p.json")


def test_wrong_normalization_constant_fails_parity(tmp_path):
    src = hf_models.image_classifier(tmp_path / "vit")
    data = hf_models.image_folder(tmp_path / "images")
    p = _judged_against_wrong_preprocessing(tmp_path, src, data, lambda pre: pre.update(mean=[0.45, 0.5, 0.5]))
    assert p.returncode == 1 and "output 'logits' moved by max_abs_diff" in p.stderr
    assert not json.loads((tmp_path / "p.json").read_text())["passed"]


def test_wrong_text_length_fails_parity(tmp_path, text):
    p = _judged_against_wrong_preprocessing(tmp_path, text, text.parent / "reviews.csv",
                                            lambda pre: pre.update(max_length=16))
    assert p.returncode == 1 and "moved by max_abs_diff" in p.stderr


def test_raw_data_for_a_model_without_preprocessing_is_refused(tmp_path, text):
    """Texts for a .pt2 that records no tokenizer: nothing could turn them into its inputs, so export refuses."""
    import torch

    ep = torch.export.export(torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),))
    torch.export.save(ep, tmp_path / "m.pt2")
    p = cli("export", tmp_path / "m.pt2", "--data", text.parent / "reviews.csv", "--out", tmp_path / "o")
    assert p.returncode == 2 and "raw texts, but" in p.stderr and "records no preprocessing" in p.stderr
    assert not (tmp_path / "o").exists()


def test_changed_tokenizer_file_is_refused(tmp_path, text_onnx):
    import shutil

    shutil.copytree(text_onnx.path, tmp_path / "t")
    tok = tmp_path / "t" / "preprocess" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(Exception, match="tokenizer files were modified"):
        open_preprocessor(load_artifact(tmp_path / "t"))


# ---- the codec: every raw form, every bad raw input ------------------------------------------------------

def _png(h, w, value=None, mode="L"):
    from PIL import Image

    rng = np.random.default_rng(h * w)
    a = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else np.full((h, w), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits_codec(cnn_onnx):
    return Codec(cnn_onnx.manifest, prep=open_preprocessor(cnn_onnx))


@pytest.fixture(scope="module")
def text_codec(text_onnx):
    return Codec(text_onnx.manifest, prep=open_preprocessor(text_onnx))


def test_image_forms(digits_codec):
    png = _png(40, 32)
    a = digits_codec.decode(png, "image/png").feed["pixels"]
    assert a.shape == (1, 1, 8, 8) and 0 <= a.min() and a.max() <= 1
    b64 = base64.b64encode(png).decode()
    np.testing.assert_array_equal(digits_codec.decode({"inputs": {"image_b64": b64}}).feed["pixels"], a)
    v2 = digits_codec.decode({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64, b64]}]})
    assert v2.feed["pixels"].shape == (2, 1, 8, 8) and v2.protocol == "v2"
    batch = digits_codec.decode({"inputs": [{"image_b64": b64}] * 3})
    assert batch.batched and batch.items == 3
    jpeg = io.BytesIO()
    from PIL import Image

    Image.open(io.BytesIO(png)).save(jpeg, format="JPEG")
    assert digits_codec.decode(jpeg.getvalue(), "image/jpeg").feed["pixels"].shape == (1, 1, 8, 8)
    assert digits_codec.decode(png).items == 1  # an image sent without its content type is still an image


def test_text_forms(text_codec, text):
    from transformers import AutoTokenizer

    one = text_codec.decode({"inputs": "this drug worked well"})
    assert set(one.feed) == {"input_ids", "attention_mask"} and not one.batched
    many = text_codec.decode({"inputs": ["great", "made me dizzy and sick"]})
    assert many.batched and many.items == 2 and many.feed["input_ids"].shape[1] == many.feed["attention_mask"].shape[1]
    assert text_codec.decode("plain text body", "text/plain").items == 1
    v2 = text_codec.decode({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]})
    assert v2.items == 2 and v2.protocol == "v2"
    enc = AutoTokenizer.from_pretrained(str(text))("this drug worked well")  # the tokenizer's full output
    assert "token_type_ids" in enc
    full = text_codec.decode({"inputs": {k: list(v) for k, v in enc.items()}})
    np.testing.assert_array_equal(full.feed["input_ids"], one.feed["input_ids"])
    long = text_codec.decode({"inputs": "word " * 400})
    assert long.notes == [{"truncated": True}] and long.feed["input_ids"].shape[1] == 128
    answer = text_codec.encode(long, {"logits": np.zeros((1, 3), np.float32)})
    assert answer["truncated"] is True


BAD_RAW = {
    "not_an_image": ("digits", b"GIF89 but not really an image at all", "image/png", "not an image"),
    "corrupt_image": ("digits", _png(16, 16)[:60], "image/png", "corrupt"),
    "pixel_bomb": ("digits", _png(8000, 6000, value=0), "image/png", "at most 40,000,000"),
    "bad_base64": ("digits", {"inputs": {"image_b64": "***"}}, None, "not valid base64"),
    "empty_image": ("digits", b"", "image/png", "empty image"),
    "text_to_image_model": ("digits", "hello", "text/plain", "this model takes image"),
    "empty_text": ("text", {"inputs": "   "}, None, "empty text"),
    "non_utf8": ("text", b"caf\xe9 \xff", "text/plain", "not UTF-8"),
    "token_types_second_segment": ("text", {"inputs": {"input_ids": [[2, 5, 3]], "attention_mask": [[1, 1, 1]],
                                                       "token_type_ids": [[0, 1, 1]]}}, None, "one segment"),
    "bytes_to_image_v2_not_strings": ("digits", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                             "data": [1]}]}, None, "list of strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_RAW))
def test_bad_raw_input_is_refused_with_a_message(digits_codec, text_codec, case):
    which, body, ct, message = BAD_RAW[case]
    with pytest.raises(InputError, match=message):
        (digits_codec if which == "digits" else text_codec).decode(body, ct)


def test_text_over_the_limit_refused_when_configured(text_onnx):
    from dataclasses import replace

    from modelship.preprocess import TextPreprocessor, spec_from_dict

    spec = replace(spec_from_dict(text_onnx.manifest.preprocess), truncation="refuse")
    codec = Codec(text_onnx.manifest, prep=TextPreprocessor(spec, text_onnx.path / "preprocess", text_onnx.manifest.inputs))
    with pytest.raises(InputError, match="at most 128"):
        codec.decode({"inputs": "word " * 400})
    assert codec.decode({"inputs": "short"}).items == 1


# ---- through the real TorchServe -------------------------------------------------------------------------

def _post(info, model, data, content_type):
    return requests.post(f"{info.inference_url}/predictions/{model}", data=data, timeout=30,
                         headers={"Content-Type": content_type, "Authorization": f"Bearer {info.token}"})


def test_served_png_and_text(served, cnn, text):
    raw, y = datasets.digits_raw({}, "test")
    want = softmax(TorchRunner(cnn).infer(reference_preprocessor(cnn)(raw[:4]))["logits"])
    for i in range(4):
        r = _post(served, "cnn-onnx", raw[i], "image/png")
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probabilities"], want[i], atol=1e-5)
    b64 = json.dumps({"inputs": {"image_b64": base64.b64encode(raw[0]).decode()}})
    assert _post(served, "cnn-onnx", b64, "application/json").json()["index"] == int(want[0].argmax())
    texts, _ = hf_models.reviews(3)
    art, module = open_source(text)
    want = softmax(TorchRunner(art, module=module).infer(reference_preprocessor(art)(texts[:1]))["logits"])
    r = _post(served, "text-onnx", json.dumps({"inputs": texts[0]}), "application/json")
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], want[0], atol=1e-5)
    r = _post(served, "text-onnx", texts[0].encode(), "text/plain; charset=utf-8")
    np.testing.assert_allclose(r.json()["probabilities"], want[0], atol=1e-5)
    for body, ct, message in ((_png(16, 16)[:60], "image/png", "corrupt"),
                              (b"caf\xe9", "text/plain", "not UTF-8")):
        r = _post(served, "cnn-onnx" if ct == "image/png" else "text-onnx", body, ct)
        assert r.status_code == 400 and message in r.json()["message"], r.text
    assert _post(served, "cnn-onnx", raw[1], "image/png").status_code == 200  # and it keeps serving


def test_json_labelled_text_plain_is_read_as_json_by_a_model_that_takes_no_text(cnn_onnx):
    """A tensor body sent as text/plain (curl -d ... -H 'Content-Type: text/plain') to the digits model is read as
    JSON; a text body that is not JSON gets a 400 naming what the model takes."""
    import json as _json

    from modelship.errors import InputError
    from modelship.preprocess import open_preprocessor
    from modelship.serving.codec import Codec

    codec = Codec(cnn_onnx.manifest, prep=open_preprocessor(cnn_onnx))
    body = _json.dumps({"inputs": np.zeros((1, 1, 8, 8)).tolist()}).encode()
    assert codec.decode(body, "text/plain").feed["pixels"].shape == (1, 1, 8, 8)
    with pytest.raises(InputError, match="a text/plain body, but this model takes image"):
        codec.decode(b"a review, not a digit", "text/plain")
