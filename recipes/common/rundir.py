"""Run folders that are never clobbered silently.

A recipe's ``--out`` may be new or empty (a fresh run), hold an earlier run of the same recipe
that ``--resume`` continues, or be replaced with ``--overwrite``. Anything else is refused
before any work starts: an existing run without either flag (forgetting ``--resume`` would
otherwise delete the previous run's metrics), ``--overwrite`` of a folder that does not look like
a run of this recipe (a typo such as ``--out .`` must not delete a source tree), and
``--resume`` with nothing to resume.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from recipes.common import distributed as D
from recipes.common.checkpoint import load_resume
from recipes.common.logging import RunLog

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


def write_config(out: str | os.PathLike, config: dict[str, Any]) -> None:
    """Save the run's resolved configuration as ``out/config.json`` (indented JSON): the record of
    what ran, and the :data:`MARKER` that makes ``out`` a run folder for ``--overwrite``."""
    (Path(out) / MARKER).write_text(json.dumps(config, indent=2) + "\n")


def open_run(out: str | os.PathLike, info: D.DistInfo, *, resume: str | None, overwrite: bool,
             quiet: bool, config: dict[str, Any], resumable: tuple[str, ...],
             override_config: bool, checkpoint: str = "checkpoint.pt"
             ) -> tuple[Path, RunLog, dict | None]:
    """A training run's start: ``out`` checked and made ready (:func:`prepare_run_dir`), the
    run's log ``out/train.log`` (printing on rank 0 only), and with ``--resume`` (``resume`` not
    None) the checkpoint to continue from, its saved configuration checked against ``config``
    except the ``resumable`` settings (:func:`recipes.common.checkpoint.load_resume`). Returns
    ``(out, log, checkpoint or None)``.

    Under torchrun only rank 0 looks at ``out`` and reads the checkpoint; the outcome (the
    checkpoint, or the error every rank then raises) is broadcast to the other ranks, so they
    need not see rank 0's filesystem: checkpoints are written by rank 0 alone, and a resumed
    run works when the ranks do not share ``out``. The other ranks create ``out`` locally for
    what they write themselves (nothing, unless a recipe says so).

    Example:
        >>> out, log, state = open_run(cfg.out, info, resume=args.resume, overwrite=False,
        ...                            quiet=False, config=cfg.to_dict(), resumable=("threads",),
        ...                            override_config=False)
    """
    def on_main() -> dict | None:
        prepare_run_dir(out, resume=resume is not None, overwrite=overwrite,
                        checkpoint=checkpoint, main=True)
        if resume is None:
            return None
        return load_resume(out, resume, checkpoint, config=config, ignore=resumable,
                           override=override_config)[1]

    if info.enabled:
        import torch.distributed as dist

        payload: list[Any] = [None]
        if info.is_main:
            try:
                payload = [("ok", on_main())]
            except Exception as err:  # every rank raises it, none waits forever
                payload = [("error", err)]
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise value
        state = value
        Path(out).mkdir(parents=True, exist_ok=True)
    else:
        state = on_main()
    out = Path(out)
    log = RunLog(out / "train.log", enabled=info.is_main, quiet=quiet)
    return out, log, state
