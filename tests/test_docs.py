"""The README and the docs are tested like code.

Every shell and Python block of README.md and docs/ is preceded by ``<!-- run: NAME -->`` (a test here, or the
test named in RUN_BY, runs it as written) or ``<!-- not run: REASON -->``; the site builds in strict mode (a broken
link, anchor or reference fails), with its CLI and Python API references generated from the code; the README
fits two screens and every link in it resolves. The blocks run in a fresh folder, with the files they name made
here first. Four things are changed for CI and said so: load-test durations (30s -> 2s), the teacher's training
(8 epochs instead of the recipe's 25), the load test's p95 SLO (50 ms -> 2000 ms: other test workers share the
two cores, so a latency target says nothing here) and the server's port (a free one instead of 8080)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelship import data as datasets
from modelship.models.checkpoints import open_source
from modelship.serving import config, lifecycle

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# the blocks run by tests outside this file: each of those files must select its block with marked_block(NAME)
RUN_BY = {"triton-client": "tests/test_oip.py", "ci-example": "tests/test_plugin.py"}
MARKER = re.compile(r"^\s*<!-- (run|not run|output of): (.*?) -->\s*$")  # output of: a run block's printed output
OPEN = re.compile(r"^(\s*)(`{3,}|~{3,})\s*\{?\s*\.?([\w+-]*)")
QUIET = {"text", "toml", "yaml", "yml", "json", "ini", "promql", "csv", "diff"}  # data and output: no marker needed


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def blocks(page: Path) -> list[tuple[str | None, str, str, str]]:
    """(``run`` / ``not run`` / None, its name or reason, language, code) of every fenced block of a page: fences of
    backticks or tildes, indented (in lists and admonitions) or not, the marker on the line right above."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        mark = MARKER.match(lines[i - 1]) if i else None
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        out.append((mark.group(1) if mark else None, mark.group(2) if mark else "", lang,
                    "\n".join(body) + ("\n" if body else "")))
    return out


def marked_block(name: str) -> str:
    """The block marked ``<!-- run: NAME -->`` (the same in every page that shows it)."""
    found = {code for page in pages() for how, what, _, code in blocks(page) if how == "run" and what == name}
    assert len(found) == 1, f"<!-- run: {name} -->: {len(found)} different blocks"
    return found.pop()


def output_block(name: str) -> str:
    """The block marked ``<!-- output of: NAME -->``: what the block ``run: NAME`` printed once, shown as is."""
    found = [code for page in pages() for how, what, _, code in blocks(page) if how == "output of" and what == name]
    assert len(found) == 1, f"<!-- output of: {name} -->: {len(found)} blocks"
    return found[0]


BOX = re.compile(r"[\u2500-\u257f]")  # a table's borders; its vertical ones (│┃║) separate cells
KEPT = ("version ", 'version="', "was ")  # numbers that name things, not measurements


def _shape(line: str) -> str:
    """A printed line without what changes from run to run: measured numbers (#), colours, a table's borders and
    padding; its cells stay apart and version numbers stay."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = BOX.sub(lambda m: " | " if m.group() in "│┃║" else " ", line)

    def mask(m):
        return m.group() if line[:m.start()].endswith(KEPT) else "#"

    return " ".join(re.sub(r"(?<![\w.])\d+(\.\d+)?(e-?\d+)?", mask, line).split())


def assert_printed(shown: str, stdout: str, stderr: str = "", commands: str = "") -> None:
    """The shown output of a block is what it printed, numbers aside: each line (but the commands, "$ ...") is a
    line of its stdout or stderr, in the order that stream printed them; each "$ " line is one of ``commands``."""
    streams = [[_shape(line) for line in text.splitlines()] for text in (stdout, stderr)]
    ran = {c.strip().replace("$M ", "modelship ") for c in commands.splitlines()}
    at, checked, missing = [0, 0], 0, []
    for line in shown.splitlines():
        if line.startswith("$ "):
            command = line[2:].split("  #")[0].strip()
            assert not commands or command in ran, f"shown command not in the block: {command}"
            continue
        shape = _shape(line)
        if not shape:
            continue
        checked += 1
        found = [(k, stream.index(shape, at[k])) for k, stream in enumerate(streams) if shape in stream[at[k]:]]
        if not found:
            missing.append(line)
            continue
        k, n = found[0]
        at[k] = n + 1
    assert checked >= 3, f"only {checked} lines shown: nothing to compare"
    assert not missing, "shown in the docs but not printed by the block, in this order:\n" + "\n".join(missing)


def quick_start() -> str:
    return marked_block("quick-start")


def run_block(script: str, cwd: Path, state: Path, timeout: int):
    """A README shell block run by bash (stopping at the first failing command); the server it started from
    ``state`` is stopped whatever happened."""
    try:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        if (state / "serve.json").is_file():
            lifecycle.stop(state)


@pytest.mark.serve
def test_quick_start_block_runs_as_written(tmp_path, cnn):
    script = quick_start()
    assert script.count("\n$M ") >= 14  # every stage: train ... serve --stop
    feed = _pt2_and_npz(tmp_path, cnn)  # the files the block names
    np.save(tmp_path / "sample.npy", feed["pixels"][0])
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=3)).save_pretrained(tmp_path / "my-hf-bert")
    run = (script.replace("M=.venv/bin/modelship", f"M={Path(sys.executable).with_name('modelship')}")
           .replace("--duration 30s", "--duration 2s").replace("--slo-p95-ms 50", "--slo-p95-ms 2000")
           .replace("$M train cnn --out runs/x/cnn", "$M train cnn --out runs/x/cnn --epochs 8")
           .replace("--state runs/x/state --detach", f"--state runs/x/state --detach --port {config.free_port()}"))
    assert "--epochs 8" in run and "--duration 2s" in run and "--slo-p95-ms 2000" in run
    p = run_block(run, tmp_path, tmp_path / "runs/x/state", timeout=900)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert (tmp_path / "parity.json").is_file() and (tmp_path / "runs/x/store/cnn-int8.mar").is_file()
    assert '"label"' in p.stdout and "loadtest cnn-int8" in p.stdout and "stopped" in p.stdout


@pytest.mark.serve
def test_python_api_example_runs_as_written(tmp_path, monkeypatch):
    """The Python API block (README.md, docs/python-api.md), in a folder holding a small fine-tuned BERT (`my-hf-bert`) and 48 labelled
    reviews (`reviews.csv`). Two things change for CI, as in the quick start: the load test runs 3 s instead of 20 s,
    and its p95 SLO is 2000 ms instead of 50 ms (other test workers share the cores)."""
    import hf_models

    code = marked_block("python-api")  # README.md and docs/python-api.md show the same block
    assert code.startswith("import modelship as ms")
    hf_models.fine_tune(hf_models.text_classifier(tmp_path / "my-hf-bert", "bert"))
    hf_models.write_reviews_csv(tmp_path / "reviews.csv")
    run = code.replace('duration="20s"', 'duration="3s"').replace("slo_p95_ms=50", "slo_p95_ms=2000")
    assert 'duration="3s"' in run and "slo_p95_ms=2000" in run
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(run, "docs/python-api.md", "exec"), scope)
    assert scope["res"].passed and scope["res"].checked == scope["res"].requests > 0
    assert scope["int8"].manifest.precision == "int8" and all(r.passed for r in scope["results"])
    assert scope["server"].stopped and not (tmp_path / "runs/x/store").joinpath("serve.json").exists()


@pytest.mark.serve
def test_parity_in_production_block_runs_as_written(tmp_path, cnn, cnn_onnx, cnn_int8):
    """The docs' shadow-and-promote block (docs/how-to/production.md), on the quick start's models (copied to runs/x/ under their names).
    For CI: a free port instead of 9080 (and its metrics port instead of 9085), and a p95 SLO of 2000 ms instead
    of 50 ms (other test workers share the cores)."""
    import shutil

    block = marked_block("production")
    assert block.startswith("# parity in production")
    for art in (cnn, cnn_onnx, cnn_int8):
        shutil.copytree(art.path, tmp_path / "runs/x" / art.path.name)
    port = config.free_port()
    run = (block.replace("M=.venv/bin/modelship", f"M={Path(sys.executable).with_name('modelship')}")
           .replace("--port 9080", f"--port {port}").replace("127.0.0.1:9085", f"127.0.0.1:{port + 5}")
           .replace("--slo-p95-ms 50", "--slo-p95-ms 2000"))
    assert str(port + 5) in run and "--slo-p95-ms 2000" in run
    p = run_block(run, tmp_path, tmp_path / "runs/p/state", timeout=600)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert "version 2.0 PROMOTED" in p.stdout and "version 2.0 is the default (was 1.0)" in p.stdout
    assert 'modelship_shadow_checked_total{model="digits",version="2.0"}' in p.stdout  # each version counts
    assert "version 1.0 is the default (was 2.0)" in p.stdout and "stopped" in p.stdout
    assert_printed(output_block("production"), p.stdout, p.stderr, block)  # the output shown is this block's


def _pt2_and_npz(folder: Path, cnn) -> dict:
    """model.pt2 (the digits CNN as a torch.export program) and mine.npz (120 held-out digits with labels); the
    held-out feed."""
    _, module = open_source(cnn.path)
    ep = torch.export.export(module, (torch.randn(4, 1, 8, 8),),
                             dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(ep, folder / "model.pt2")
    feed, y = datasets.load({"name": "digits"}, "test", cnn.manifest.inputs)
    np.savez(folder / "mine.npz", pixels=feed["pixels"][:120], labels=y[:120])
    return feed


@pytest.mark.serve
def test_readme_quick_start_runs_as_written(tmp_path, cnn):
    """The README's own quick start: a .pt2 and an .npz exported, quantized, archived, served, load-tested, stopped.
    For CI: a 2 s load test, a 2000 ms SLO and a free port."""
    script = marked_block("readme-quick-start")
    _pt2_and_npz(tmp_path, cnn)
    run = (script.replace("M=.venv/bin/modelship", f"M={Path(sys.executable).with_name('modelship')}")
           .replace("--duration 30s", "--duration 2s").replace("--slo-p95-ms 50", "--slo-p95-ms 2000")
           .replace("--state runs/q/state --detach", f"--state runs/q/state --detach --port {config.free_port()}"))
    assert "--duration 2s" in run and "--slo-p95-ms 2000" in run and "--port" in run
    p = run_block(run, tmp_path, tmp_path / "runs/q/state", timeout=600)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    assert (tmp_path / "runs/q/store/int8.mar").is_file() and "loadtest int8" in p.stdout and "stopped" in p.stdout


def test_every_block_runs_or_says_why():
    """Each block of the README and the docs that is not data or output (``text``, ``toml``, ``yaml``, ...) is run
    by a test (one here, or the file RUN_BY names, selecting it with marked_block) or carries the reason it cannot
    run here; a block without a language must say what it is."""
    here = Path(__file__).read_text()
    unmarked, unknown = [], []
    for page in pages():
        for how, what, lang, code in blocks(page):
            if how == "output of" and (f'output_block("{what}")' not in here or lang not in QUIET):
                unknown.append(f"{page.relative_to(ROOT)}: output of {what} ({lang}): not checked by a test here")
            if lang in QUIET:
                continue
            where = f"{page.relative_to(ROOT)}: ```{lang} {code.splitlines()[0][:60] if code.strip() else '(empty)'}"
            if how is None or not what.strip():
                unmarked.append(where)
            elif how == "run":
                runner = here if what not in RUN_BY else (ROOT / RUN_BY[what]).read_text()
                if f'marked_block("{what}")' not in runner:
                    unknown.append(f"{where} (run: {what})")
    assert not unmarked, "blocks neither run nor saying why not:\n" + "\n".join(unmarked)
    assert not unknown, "blocks marked run (or output of) that no test selects:\n" + "\n".join(unknown)


def test_a_shown_output_must_be_what_the_block_prints():
    """assert_printed ignores measured numbers and border widths, nothing else: a line the run did not print, a
    value in another column, another version, lines out of order or a command the block does not run fail it."""
    out = ("        promote digits: version 2.0 PROMOTED      \n┃ p95 ms    │ 15.5   │ 15.6 (SLO 50) ┃\n"
           "│ answered in a burst │    │ 32 │\ndigits: version 2.0 is the default (was 1.0)\n")
    err = "registering digits.mar as version 2.0 of digits\n"
    block = "M=.venv/bin/modelship\n$M promote next.mar --samples 300\n"
    good = ("$ modelship promote next.mar --samples 300   # the promote\nregistering digits.mar as version 2.0 of "
            "digits\npromote digits: version 2.0 PROMOTED\n│ p95 ms │ 9.1 │ 12 (SLO 2000) │\n"
            "│ answered in a burst │ │ 64 │\ndigits: version 2.0 is the default (was 1.0)\n")
    assert_printed(good, out, err, block)
    wrong = {"promote digits: version 2.0 PROMOTED": "promote digits: version 2.0 REFUSED",
             "│ p95 ms │ 9.1": "│ p99 ms │ 9.1",  # another row
             "│ answered in a burst │ │ 64 │": "│ answered in a burst │ 64 │ │",  # another column
             "(was 1.0)": "(was 3.0)",  # another version
             "--samples 300   #": "--samples 30 --force   #"}  # a command the block does not run
    for this, that in wrong.items():
        with pytest.raises(AssertionError):
            assert_printed(good.replace(this, that), out, err, block)
    swapped = good.replace("│ answered in a burst │ │ 64 │\n", "").replace("promote digits:", "│ answered in a burst │ │ 64 │\npromote digits:")
    with pytest.raises(AssertionError, match="in this order"):
        assert_printed(swapped, out, err, block)
    with pytest.raises(AssertionError, match="nothing to compare"):
        assert_printed("$ modelship promote next.mar --samples 300\n", out, err, block)


def test_block_parser_sees_every_fence(tmp_path):
    """Indented fences, tildes, braces and upper case are blocks too; a marker must sit on the line above."""
    page = tmp_path / "p.md"
    page.write_text("- item\n\n    ```Shell\n    ls\n    ```\n\n~~~ {.python}\nx = 1\n~~~\n<!-- not run: why -->\n```\n"
                    "echo\n```\n")
    found = blocks(page)
    assert [(b[0], b[2], b[3]) for b in found] == [(None, "shell", "ls\n"), (None, "python", "x = 1\n"),
                                                    ("not run", "", "echo\n")]


def test_readme_fits_two_screens_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), \
        [link for link in links if not (ROOT / link).exists()]
    assert "make demo" in text and "make test" in text
    assert (DOCS / "img" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the report, as make demo drew it


def test_every_figure_the_docs_quote_comes_from_a_tracked_benchmark_output():
    """The files the docs' figures are read from are in the repository (a fresh clone builds the same site), each
    named for the benchmark script that writes it with --json (the build fails on a figure missing from it)."""
    names = {m.group(1) for page in pages() for m in re.finditer(r"\[\[(?:table:)?([a-z_]+)[.\]]", page.read_text())}
    git = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, capture_output=True, text=True)
    tracked = git.stdout.split() if git.returncode == 0 else [  # not a git checkout (an exported tree): on disk
        str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").glob("*.json")]
    assert names and all(f"benchmarks/results/{n}.json" in tracked for n in names), (names, tracked)
    for n in names:  # written by a script of that name, which takes --json
        assert "--json" in (ROOT / "benchmarks" / f"{n}.py").read_text(), n
        assert json.loads((ROOT / "benchmarks" / "results" / f"{n}.json").read_text())


def test_the_site_builds_in_strict_mode_with_its_references(tmp_path):
    """mkdocs build --strict: a broken link or anchor, a page left out of the nav, a figure missing from the
    benchmarks' output files or an unresolved API reference fails it. The CLI reference holds every command and
    option of the typer app, the API reference every public function's docstring."""
    from modelship import api
    from modelship.cli import app

    p = subprocess.run([Path(sys.executable).with_name("mkdocs"), "build", "--strict", "--site-dir", tmp_path / "site"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    cli_page = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__.replace("_", "-")
        assert f"modelship {name}" in cli_page, name
    assert "--activations" in cli_page and "--until-parity" in cli_page
    api_page = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in api.__all__ if hasattr(api, "__all__") else ("export", "quantize", "parity", "archive", "serve"):
        assert f"modelship.api.{name}" in api_page or f'id="{name}"' in api_page, name
    bench = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "[[" not in bench  # every figure placeholder replaced from benchmarks/results
