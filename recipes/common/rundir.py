"""Run folders that are never clobbered silently.

A recipe's ``--out`` may be new or empty (a fresh run), hold an earlier run of the same recipe
that ``--resume`` continues, or be replaced with ``--overwrite``. Anything else is refused
before any work starts: an existing run without either flag (forgetting ``--resume`` would
otherwise delete the previous run's metrics), ``--overwrite`` of a folder that does not look like
a run of this recipe (a typo such as ``--out .`` must not delete a source tree), and
``--resume`` with nothing to resume.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

MARKER = "config.json"


def prepare_run_dir(out: str | os.PathLike, *, resume: bool, overwrite: bool,
                    checkpoint: str = "checkpoint.pt", main: bool = True) -> Path:
    """Check ``out`` against the flags and make it ready; returns it as a ``Path``.

    ``main=False`` (ranks other than 0 under torchrun) only checks, never deletes or creates.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: expected at most one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out={str(out)!r} is a file; expected a folder for the run")
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    if resume:
        if not (out / checkpoint).is_file():
            raise ValueError(f"--resume: --out={str(out)!r} holds no {checkpoint}; expected the "
                             "folder of an earlier run (or drop --resume to start a new one)")
        return out
    if existing:
        if not overwrite:
            raise ValueError(
                f"--out={str(out)!r} already holds {len(existing)} entries "
                f"({', '.join(sorted(existing)[:4])}{', ...' if len(existing) > 4 else ''}); "
                "expected a new or empty folder. Pass --resume to continue that run, "
                "--overwrite to replace it, or another --out.")
        if not (out / MARKER).is_file():
            raise ValueError(
                f"--overwrite: --out={str(out)!r} is not empty and has no {MARKER}, so it does "
                "not look like a run folder; refusing to delete it. Expected a folder written "
                "by this recipe, or an empty or new one.")
        if main:
            shutil.rmtree(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    return out
