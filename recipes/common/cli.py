"""The recipes' command-line entry point: run, and turn the errors a user can fix into one
``error: ...`` line on stderr and exit status 2 (no traceback)."""
from __future__ import annotations

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
