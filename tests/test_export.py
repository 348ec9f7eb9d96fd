"""Zoo training, export of every source kind, the parity gate and bad-input errors (issue: the spine)."""

import json

import numpy as np
import pytest
import torch

from conftest import cli
from modelship.errors import ArtifactError, InputError
from modelship.manifest import load_artifact
from modelship.runners import open_runner


def _check_record(rec, accuracy=True):
    assert rec["passed"] is True
    assert rec["top1_agreement"] == 1.0
    assert rec["max_abs_diff"] <= 1e-4
    if accuracy:
        assert rec["accuracy"] >= 0.97
        assert rec["samples"] == 360
    else:
        assert rec["accuracy"] is None


def test_cnn_cli_train_export_parity(tmp_path):
    cli("train", "cnn", "--out", tmp_path / "A", check=0)
    cli("export", tmp_path / "A", "--out", tmp_path / "B", "--json", tmp_path / "b.json", check=0)
    rec = json.loads((tmp_path / "b.json").read_text())
    _check_record(rec)
    man = load_artifact(tmp_path / "B").manifest
    assert man.format == "onnx" and man.parity == rec
    assert man.parent == "../A" and man.parent_sha256 == load_artifact(tmp_path / "A").manifest.sha256
    assert man.inputs[0].shape == ["batch", 1, 8, 8]


def test_mlp_export(tmp_path):
    from modelship.exporters.onnx_export import export
    from modelship.models.checkpoints import open_source
    from modelship.models.train import train_artifact
    from modelship.stages import gate_parity

    art, module = open_source(train_artifact("mlp", tmp_path / "mlp").path)
    _check_record(gate_parity(export(art, module, tmp_path / "onnx"), reference=(art, module)))


def test_text_export_and_sequence_lengths(text_onnx):
    from modelship.models.checkpoints import open_source
    from modelship.runners.torch_runner import TorchRunner

    rec = text_onnx.manifest.parity
    assert rec["passed"] and rec["top1_agreement"] == 1.0 and rec["max_abs_diff"] <= 1e-4
    assert rec["samples"] == 48 and rec["accuracy"] == rec["reference_accuracy"]  # raw reviews with their labels
    runner = open_runner(text_onnx)
    art, module = open_source(text_onnx.resolve(text_onnx.manifest.reference))
    ref = TorchRunner(art, module=module)
    for seq in (8, 128):
        ids = np.random.default_rng(seq).integers(3, 400, size=(3, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[1, seq // 2:] = 0
        feed = {"input_ids": ids, "attention_mask": mask}
        out = runner.infer(feed)["logits"]
        assert out.shape == (3, 3)
        np.testing.assert_allclose(out, ref.infer(feed)["logits"], atol=1e-4)


def test_batch_1_and_33(cnn_onnx):
    runner = open_runner(cnn_onnx)
    for b in (1, 33):
        x = np.random.default_rng(b).random((b, 1, 8, 8), dtype=np.float32)
        assert runner.infer({"pixels": x})["logits"].shape == (b, 10)


def test_hf_directory(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=3)).save_pretrained(tmp_path / "hf")
    cli("export", tmp_path / "hf", "--out", tmp_path / "onnx", "--json", tmp_path / "r.json", check=0)
    rec = json.loads((tmp_path / "r.json").read_text())
    _check_record(rec, accuracy=False)
    man = load_artifact(tmp_path / "onnx").manifest
    assert man.outputs[0].shape == ["batch", 3] and man.inputs[1].name == "attention_mask"


def test_pt2_program(tmp_path, cnn):
    from modelship.models.checkpoints import open_source

    _, module = open_source(cnn.path)
    ep = torch.export.export(module, (torch.randn(4, 1, 8, 8),),
                             dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(ep, tmp_path / "cnn.pt2")
    cli("export", tmp_path / "cnn.pt2", "--data", "digits", "--out", tmp_path / "onnx", "--json", tmp_path / "r.json",
        check=0)
    _check_record(json.loads((tmp_path / "r.json").read_text()))
    assert load_artifact(tmp_path / "onnx").manifest.extra["exporter"] == "dynamo"


def test_runner_validates_inputs(cnn_onnx, cnn):
    for runner in (open_runner(cnn_onnx), open_runner(cnn)):
        good = np.zeros((2, 1, 8, 8), np.float32)
        with pytest.raises(InputError, match="missing input.*pixels"):
            runner.infer({})
        with pytest.raises(InputError, match="unexpected input.*extra"):
            runner.infer({"pixels": good, "extra": good})
        with pytest.raises(InputError, match="dtype float64, expected float32"):
            runner.infer({"pixels": good.astype(np.float64)})
        with pytest.raises(InputError, match=r"expected \[batch, 1, 8, 8\]"):
            runner.infer({"pixels": np.zeros((2, 1, 8, 9), np.float32)})
        with pytest.raises(InputError, match="has 3 dims"):
            runner.infer({"pixels": np.zeros((1, 8, 8), np.float32)})


def test_runner_checks_shared_dims(text_onnx):
    runner = open_runner(text_onnx)
    ids = np.ones((2, 8), np.int64)
    with pytest.raises(InputError, match="dim 'sequence' is 9 but 8"):
        runner.infer({"input_ids": ids, "attention_mask": np.ones((2, 9), np.int64)})


def test_parity_failure_is_fatal(tmp_path, cnn, cnn_onnx):
    """An artifact compared with the wrong reference fails, exits non-zero and names the output."""
    from modelship.models.train import train_artifact

    other = train_artifact("cnn", tmp_path / "other", seed=7, epochs=1)
    p = cli("parity", other.path, cnn_onnx.path, "--json", tmp_path / "p.json", check=1)
    assert "output 'logits'" in p.stderr and "Traceback" not in p.stderr
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["passed"] is False and rec["failures"]
    cli("parity", cnn.path, cnn_onnx.path, check=0)


def test_tampered_model_file_is_refused(tmp_path, cnn_onnx):
    import shutil

    shutil.copytree(cnn_onnx.path, tmp_path / "t")
    with open(tmp_path / "t" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_artifact(tmp_path / "t")


@pytest.mark.parametrize("case", ["missing", "not_checkpoint", "corrupt_onnx", "unknown_arch", "pt2_no_examples",
                                  "plain_dir"])
def test_bad_inputs_get_one_line_errors(tmp_path, cnn_onnx, cnn, case):
    import shutil

    if case == "missing":
        args, want = ("export", tmp_path / "nope", "--out", tmp_path / "o"), "no such file or directory"
    elif case == "not_checkpoint":
        (tmp_path / "x.txt").write_text("hello")
        args, want = ("export", tmp_path / "x.txt", "--out", tmp_path / "o"), "not a checkpoint"
    elif case == "plain_dir":
        (tmp_path / "d").mkdir()
        args, want = ("export", tmp_path / "d", "--out", tmp_path / "o"), "without manifest.json or config.json"
    elif case == "corrupt_onnx":
        from modelship.manifest import write_artifact

        shutil.copytree(cnn_onnx.path, tmp_path / "c")
        (tmp_path / "c" / "model.onnx").write_bytes(b"not an onnx file")
        write_artifact(tmp_path / "c", load_artifact(tmp_path / "c", verify=False).manifest)
        args, want = ("parity", cnn.path, tmp_path / "c"), "onnxruntime cannot load this model"
    elif case == "unknown_arch":
        args, want = ("train", "resnet9000", "--out", tmp_path / "o"), "unknown architecture 'resnet9000'"
    else:
        from modelship.models.checkpoints import open_source

        _, module = open_source(cnn.path)
        ep = torch.export.export(module, (torch.randn(2, 1, 8, 8),))
        ep._example_inputs = None
        torch.export.save(ep, tmp_path / "bare.pt2")
        args, want = ("export", tmp_path / "bare.pt2", "--out", tmp_path / "o"), "without example inputs"
    p = cli(*args)
    assert p.returncode != 0
    assert want in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.strip()]) == 1, p.stderr


def test_missing_provider_is_explained(cnn_onnx):
    from modelship.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError, match="not available"):
        open_runner(cnn_onnx, provider="tensorrt")


def test_bench_cli(tmp_path, cnn, cnn_onnx):
    p = cli("bench", cnn.path, cnn_onnx.path, "--batch-sizes", "1,32", "--seconds", "0.2", "--json", tmp_path / "b.json",
            check=0)
    rows = json.loads((tmp_path / "b.json").read_text())
    assert {(r["backend"], r["batch"]) for r in rows} == {("torch", 1), ("torch", 32), ("onnxruntime", 1),
                                                          ("onnxruntime", 32)}
    assert all(r["p50_ms"] > 0 and r["p95_ms"] >= r["p50_ms"] and r["throughput_per_s"] > 0 for r in rows)
    assert "p50 ms" in p.stdout
