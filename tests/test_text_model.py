"""The built-in text model: the pretrained MiniLM encoder with its head fitted on real drug reviews reaches the
held-out accuracy the README states, above the majority-class baseline, and exports with its tokenizer."""

import pytest

from modelship.manifest import load_artifact
from modelship.models.train import train_artifact

pytestmark = pytest.mark.slow  # it embeds ~860 reviews with a 22 M-parameter encoder


def test_held_out_accuracy_as_stated(tmp_path):
    art = train_artifact("text", tmp_path / "text")
    extra = art.manifest.extra
    assert extra["test_samples"] == 379 and extra["train_samples"] == 480
    assert round(extra["test_accuracy"], 3) == 0.694 and extra["test_accuracy"] > extra["majority_baseline"] + 0.03
    assert art.manifest.preprocess["kind"] == "text" and (art.path / "preprocess" / "tokenizer.json").is_file()
    assert load_artifact(art.path).manifest.labels == ["negative", "neutral", "positive"]
