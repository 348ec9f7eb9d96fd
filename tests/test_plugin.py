"""The pytest plugin in make test, without the wheel build (tests/test_ci_examples.py builds it, with -m slow):
``pytest --modelship`` on a project of its own (pytest's ``pytester``) whose candidates are the good model and the
wrong ones of tests/adversaries.py, checked case by case in its JUnit file; and ``modelship.testing``'s
``assert_parity`` and ``assert_served`` passing and failing in this process."""

import contextlib
import xml.etree.ElementTree as ET

import pytest

import adversaries
import modelship as ms
from modelship.testing import assert_parity, assert_served

pytestmark = pytest.mark.serve


def test_pytest_modelship_fails_exactly_the_wrong_candidates_gates(pytester, cnn, cnn_onnx, tmp_path_factory):
    wrong = adversaries.zoo(cnn_onnx, tmp_path_factory.mktemp("plugin-zoo"))
    candidates = ", ".join([f'good = "{cnn_onnx.path}"'] + [f'{k} = "{a.path}"' for k, a in wrong.items()])
    pytester.makefile(".toml", pyproject=f"""
[tool.modelship]
source = "{cnn.path}"
candidates = {{{candidates}}}
users = 1
duration = "3s"
""")
    result = pytester.runpytest_subprocess("--modelship", "--junitxml=junit.xml", "-p", "no:cacheprovider",
                                           "-p", "no:xdist", timeout=900)
    cases = {}
    for case in ET.parse(pytester.path / "junit.xml").getroot().iter("testcase"):
        failure = case.find("failure")
        variant, gate = case.get("classname").split(".")[-1], case.get("name")
        cases[(variant, gate)] = failure.get("message") if failure is not None else None
    gates = ("parity", "served agreement", "failures")
    for variant in ("onnx", "good"):
        for gate in gates:
            assert cases[(variant, gate)] is None, (variant, gate, cases[(variant, gate)])
    for kind in adversaries.ZOO:
        assert cases[(kind, "parity")], kind  # every wrong candidate fails its parity gate, with a message
        assert cases[(kind, "failures")] is None, (kind, cases[(kind, "failures")])  # it answers: no errors
        if kind != "batch1_only":  # one user: each request alone, where that one is right
            assert cases[(kind, "served agreement")], kind
    assert "NaN or inf" in cases[("nan", "parity")] and "agreement" in cases[("label_shift", "parity")]
    outcome = result.parseoutcomes()
    assert outcome["failed"] == 2 * len(adversaries.ZOO) - 1 and outcome["passed"] == 2 * len(gates) + len(adversaries.ZOO) + 1
    assert (pytester.path / "modelship-gates" / "report.md").is_file()


def test_assert_parity_passes_the_good_and_fails_the_wrong(cnn_onnx, tmp_path):
    assert assert_parity(cnn_onnx.path).passed
    nan = adversaries.make("nan", cnn_onnx, tmp_path / "nan")
    with pytest.raises(AssertionError, match="parity gate failed .*NaN or inf"):
        assert_parity(nan.path)


def test_assert_served_passes_and_fails(served):
    server = ms.Server(served, None, contextlib.ExitStack())
    try:
        assert assert_served(server, "cnn-onnx", users=1, duration="2s").passed
        with pytest.raises(AssertionError, match="parity gate failed for served 'cnn-int8'"):  # INT8: not within 1e-7
            assert_served(server, "cnn-int8", users=1, duration="2s", max_prob_diff=1e-7)
        with pytest.raises(AssertionError, match="slo gate failed"):
            assert_served(server, "cnn-onnx", users=1, duration="2s", slo_p95_ms=0.001)
    finally:
        server.detach()  # the shared server: left running


def test_the_docs_ci_example_runs_as_written(pytester, cnn, cnn_onnx):
    """The test file of docs/how-to/ci.md, as written, in a project holding what it names: artifacts/onnx (with the
    PyTorch model it was exported from beside it, its reference) and a store serving it as 'onnx' (the
    modelship_server fixture serves the ini's modelship_store)."""
    import shutil

    from test_docs import marked_block

    code = marked_block("ci-example")
    assert code.startswith("# tests/test_my_model.py")
    shutil.copytree(cnn_onnx.path, pytester.path / "artifacts" / "onnx")
    shutil.copytree(cnn.path, pytester.path / "artifacts" / cnn.path.name)
    ms.archive(cnn_onnx, pytester.path / "store", name="onnx", workers=1, threads=1)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nmodelship_store = "store"\n')
    (pytester.path / "tests").mkdir()
    (pytester.path / "tests" / "test_my_model.py").write_text(code)
    result = pytester.runpytest_subprocess("tests", "-p", "no:cacheprovider", "-p", "no:xdist", timeout=600)
    result.assert_outcomes(passed=2)
