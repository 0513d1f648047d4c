"""metrics.jsonl (one JSON object per logged step) and plain-text tables."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


class MetricsLog:
    """Appends one JSON line per record to ``path``; ``truncate_after(step)`` drops records of
    later steps (used on resume so the file reads as one uninterrupted run)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_plain) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        kept = [r for r in self.read() if r.get("step", -1) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A left-aligned text table; floats as percentages when ``0 <= x <= 1`` is not assumed:
    format them yourself."""
    cells = [[str(h) for h in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


class RunLog:
    """What a run says while it works: lines printed (rank 0 only) and appended to a log file,
    and a progress display that is a tqdm bar on a terminal and, elsewhere (a file, a pipe, a
    CI log), one plain line every ``every`` updates instead of carriage-return redraws."""

    def __init__(self, path: str | os.PathLike | None, *, enabled: bool = True,
                 quiet: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled
        self.quiet = quiet

    def __call__(self, *parts: Any) -> None:
        if not self.enabled:
            return
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        self.write_file(text)

    def write_file(self, text: str) -> None:
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(text + "\n")

    def progress(self, total: int, desc: str, *, initial: int = 0, unit: str = "step",
                 every: int = 0) -> "Progress":
        return Progress(self, total, desc, initial=initial, unit=unit, every=every)


class Progress:
    """``update(n, **postfix)``, ``close()``. A tqdm bar when stdout is a terminal; otherwise a
    plain ``desc: i/total key=value`` line every ``every`` updates (default: about 20 lines per
    run), printed and written to the run's log file."""

    def __init__(self, log: RunLog, total: int, desc: str, *, initial: int = 0,
                 unit: str = "step", every: int = 0) -> None:
        import sys

        self.log, self.total, self.desc, self.n = log, total, desc, initial
        self.every = every or max(1, total // 20)
        self.bar = None
        self.active = log.enabled and not log.quiet
        if self.active and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                            dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
            if self.n % self.every == 0 or self.n == self.total:
                self.log.write_file(self._line(postfix))
        elif self.n % self.every == 0 or self.n == self.total:
            self.log(self._line(postfix))

    def _line(self, postfix: dict[str, Any]) -> str:
        extra = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
        return f"{self.desc}: {self.n}/{self.total} {extra}".rstrip()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
