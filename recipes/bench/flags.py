"""Flag parsing shared by the training-step benchmarks (``recipes.bench_images``,
``recipes.bench_clip``): an argparse parser that raises instead of exiting, and the checks of
comma-separated integer lists, positive budgets and the device. Every error is a ValueError
naming the flag, the value given and what was expected, raised before any work."""
from __future__ import annotations

import argparse
import math

import torch


class RaisingParser(argparse.ArgumentParser):
    """argparse that raises ValueError (the flag named by argparse) instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def int_list(flag: str, text: str, *, minimum: int) -> tuple[int, ...]:
    """``"64,256"`` -> ``(64, 256)``: integers ``>= minimum``, none repeated.

    >>> int_list("--batch-sizes", "64, 256", minimum=2)
    (64, 256)
    """
    parts = [s.strip() for s in text.split(",")]
    if any(not s for s in parts):
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 64,256")
    values = []
    for s in parts:
        try:
            v = int(s)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {s!r} is not an integer") from None
        if v < minimum:
            raise ValueError(f"{flag} {text!r}: {v} is below {minimum}; expected integers "
                             f">= {minimum}")
        values.append(v)
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r}: a value is repeated")
    return tuple(values)


def positive(flag: str, value: float | None) -> None:
    """A budget flag: None (its default) or a finite number above 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} {value!r}: expected a positive number")


def resolve_device(text: str) -> str:
    """``--device``: cpu, cuda, cuda:N (a device this machine has) or auto (cuda if there is
    one, else cpu)."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text!r}: CUDA is not available on this machine; "
                             "expected cpu or auto")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
        return text
    raise ValueError(f"--device {text!r}: expected cpu, cuda, cuda:N or auto")
