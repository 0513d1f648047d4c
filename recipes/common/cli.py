"""The recipes' command-line entry point: run, and turn the errors a user can fix into one
``error: ...`` line on stderr and exit status 2 (no traceback)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence


def cli_main(run: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None,
             errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)) -> int:
    """``run(argv)``; 0 when it returns, 2 after printing ``error: <message>`` to stderr when it
    raises one of ``errors`` (bad flags, missing files: the messages name what was expected).
    Any other exception propagates with its traceback (a bug, not a usage error).

    Example:
        >>> def main(argv=None): return cli_main(run, argv, (ValueError, FileNotFoundError))
    """
    try:
        run(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def add_resume_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--resume [CHECKPOINT]``, ``--override-config`` and ``--overwrite``: the run-folder
    flags that :func:`recipes.common.rundir.open_run` reads (``args.resume`` is None, ``"auto"``
    for the flag alone, or the checkpoint path given)."""
    group.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue the run in --out (default checkpoint: "
                       "<out>/checkpoint.pt); the continued run computes what an uninterrupted "
                       "one would. Refused if the configuration differs (the differing fields "
                       "are named) unless --override-config.")
    group.add_argument("--override-config", action="store_true", help="with --resume: accept a "
                       "configuration that differs from the checkpoint's.")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run in "
                       "--out (without it, or --resume, an existing run is never touched).")
