"""The command line's shared options (tolerance, data, source, provider, --json) and how they become API
arguments: the gate's tolerance options reach a command as one ``Judge``."""

from __future__ import annotations

import functools
import inspect
from typing import List, Optional

import typer

from . import api
from .errors import ModelshipError


def judge(max_abs_diff=None, min_agreement=None, max_accuracy_drop=None, rtol=None, output_tol=(), allow_weak=False):
    """The gate's tolerance from the command line (``modelship.convert.Judge``)."""
    from .comparison import parse_output_tolerance

    tol = dict(parse_output_tolerance(t) for t in output_tol or [])
    return api.Judge(max_abs_diff, rtol, min_agreement, max_accuracy_drop, tol, allow_weak)


def judged(command):
    """A command with the gate's tolerance options (TOLERANCE), handed to it as one ``judge``."""
    sig = inspect.signature(command)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=a) for n, (a, o) in TOLERANCE.items()]

    @functools.wraps(command)
    def run(**kw):
        return command(judge=judge(**{n: kw.pop(n) for n in TOLERANCE}), **kw)
    run.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "judge"] + extra)
    return run  # typer reads the signature set here


O = typer.Option
JsonOpt = O(None, "--json", help="Write the machine-readable result to this file.")
TolAbs = O(None, "--max-abs-diff", help="Override the precision's default atol: max |ref - cand| per value.")
TolRel = O(None, "--rtol", help="Override the precision's default rtol: |ref - cand| <= atol + rtol*|ref|.")
TolOut = O([], "--output-tol", help="Per-output tolerance NAME=ATOL[:RTOL] (repeatable).")
TolAgree = O(None, "--min-agreement", help="Override the default minimum top-1 agreement.")
TolDrop = O(None, "--max-accuracy-drop", help="Override the default maximum accuracy drop (fraction).")
WeakOpt = O(False, "--allow-weak-parity", help="Accept on purpose a verdict the data cannot support (recorded).")
DataOpt = O(None, "--data", help="Evaluation data: a CSV/JSONL of text,label; a folder of images per class or a CSV "
                                 "of path,label; an .npz with one array per input name and optional 'labels'; or a "
                                 "shipped dataset's name (digits, drugreview, rottentomatoes). Recorded with its sha256.")
TaskOpt = O(None, "--task", help="classification or regression, when the checkpoint does not say (a .pt2 does not).")
WeightsOpt = O(None, "--weights", help="With SOURCE torchvision:NAME: the model's state_dict file.")
NamesOpt = O(None, "--output-names", help="Comma-separated output names (default: the program's own, or logits).")
TOLERANCE = {"max_abs_diff": (Optional[float], TolAbs), "rtol": (Optional[float], TolRel), "output_tol": (List[str], TolOut),
             "min_agreement": (Optional[float], TolAgree), "max_accuracy_drop": (Optional[float], TolDrop),
             "allow_weak": (bool, WeakOpt)}
ProviderOpt = O(None, "--provider", help="onnxruntime execution provider: auto, cpu, cuda, tensorrt.")
DeviceOpt = O("cpu", "--device", help="torch device for PyTorch artifacts: cpu or cuda.")


def names(text: Optional[str]) -> Optional[list]:
    return [x.strip() for x in text.split(",") if x.strip()] if text is not None else None


def int_list(text: str, opt: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ModelshipError(f"{opt} '{text}': expected comma-separated whole numbers, e.g. 1,8,32") from None
    if not vals or min(vals) < 1:
        raise ModelshipError(f"{opt} '{text}': expected whole numbers ≥ 1")
    return vals
