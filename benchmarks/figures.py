"""The benchmarks' figures in the documentation, read from their output files (a mkdocs hook, mkdocs.yml).

Each benchmark writes its figures with ``--json benchmarks/results/NAME.json``; a page quotes one as
``[[NAME.KEY]]`` or ``[[NAME.KEY:FORMAT]]`` (a Python format spec, e.g. ``.3f``; KEY as the file has it, e.g.
``int8_batch_max_diff[dynamic]``), and the whole INT8 recipe table of
``variants.py`` as ``[[table:variants]]``. A figure that is not in its file fails the build: no figure in the docs
is typed by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIGURE = re.compile(r"\[\[([a-z_]+)\.([A-Za-z0-9_]+(?:\[[^\]\n]+\])?)(?::([^\]]+))?\]\]")  # KEY may be NAME[RECIPE]
TABLE = re.compile(r"\[\[table:([a-z_]+)\]\]")


class MissingFigure(Exception):
    pass


def results(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise MissingFigure(f"{path}: no such benchmark output (run benchmarks/{name}.py --json {path})")
    return json.loads(path.read_text())


def figure(name: str, key: str, spec: str | None = None) -> str:
    figs = results(name)
    if key not in figs:
        raise MissingFigure(f"benchmarks/results/{name}.json has no figure '{key}'")
    value = figs[key]
    if value is None:
        raise MissingFigure(f"benchmarks/results/{name}.json: figure '{key}' is null (the run measured nothing)")
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def recipe_table(name: str) -> str:
    """Every INT8 recipe of a variants.py run: its p50 over the best FP32, agreement and batch gate."""
    figs = results(name)
    recipes = [k[len("int8_over_fp32["):-1] for k in figs if k.startswith("int8_over_fp32[")]
    rows = ["| INT8 recipe | / best FP32 p50 | agreement | same answer at any batch |", "|---|---|---|---|"]
    for r in recipes:
        batch = figs.get(f"int8_batch_passed[{r}]")
        rows.append(f"| {r} | {figs[f'int8_over_fp32[{r}]']:.3f} | {figs[f'int8_agreement[{r}]']:.4f} | "
                    f"{'—' if batch is None else 'yes' if batch else 'no'} |")
    return "\n".join(rows)


def render(markdown: str) -> str:
    markdown = TABLE.sub(lambda m: recipe_table(m.group(1)), markdown)
    markdown = FIGURE.sub(lambda m: figure(m.group(1), m.group(2), m.group(3)), markdown)
    prose = re.sub(r"^(```|~~~).*?^\1", "", markdown, flags=re.S | re.M)  # code blocks may hold [[ as they are
    left = re.findall(r"\[\[[^\]\n]*\]?\]?", prose)
    if left:
        raise MissingFigure(f"placeholder {left[0]!r} is not [[NAME.KEY]], [[NAME.KEY:FORMAT]] or [[table:NAME]]")
    return markdown


def on_page_markdown(markdown: str, page, config, files) -> str:  # the mkdocs hook
    from mkdocs.exceptions import PluginError

    try:
        return render(markdown)
    except MissingFigure as e:
        raise PluginError(f"{page.file.src_path}: {e}") from None
