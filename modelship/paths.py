"""Nothing lost: a command never writes into (or clears) a folder that holds what it reads."""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError


def check_out(out, **inputs) -> None:
    """Refuse ``out`` when it is, or contains, one of the command's ``inputs`` (name -> path; None and names that
    are not paths, such as a shipped dataset's, are skipped), before anything is touched."""
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None or not Path(str(path)).exists():
            continue
        p = Path(str(path)).resolve()
        if p == o or o in p.parents:
            raise ArtifactError(f"--out {out} {'is' if p == o else 'contains'} the {what.replace('_', ' ')} {path}: "
                                "writing there could overwrite or delete it; pass an --out folder outside it")


def data_path(spec: dict | None) -> str | None:
    """The user's data file or folder a data spec names (None for shipped or generated data)."""
    return (spec or {}).get("path")
