"""Atomic checkpoints that load without running code.

Writing: the state goes to a temporary file in the same folder, is flushed to disk, then
``os.replace`` puts it in place in one step, so a killed run leaves either the old checkpoint
or the new one, never half a file.

Reading: ``torch.load(..., weights_only=True)`` only rebuilds tensors and plain containers. A
checkpoint whose pickle names any other callable (the way a malicious file runs code) is
refused with :class:`UnsafeCheckpointError`. Keep checkpoints to tensors, dicts, lists,
tuples, strings and numbers (configs as ``dataclasses.asdict``).
"""
from __future__ import annotations

import math
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from recipes.common.config import config_differences


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that would execute code (or build arbitrary objects) when unpickled."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint={str(path)!r}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint={str(path)!r} was refused: it contains objects other than tensors and "
            "plain containers, and unpickling it could run code. Expected a checkpoint written "
            f"by this toolkit. (torch.load with weights_only=True said: {str(err).splitlines()[0]})"
        ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resume(out: str | os.PathLike, resume: str, name: str, *,
                config: dict[str, Any] | None = None, ignore: tuple[str, ...] = (),
                override: bool = False) -> tuple[Path, dict]:
    """The checkpoint a ``--resume [CHECKPOINT]`` flag names: ``out / name`` for ``"auto"`` (the
    flag without a value), else the given path; returns ``(path, checkpoint)``. With ``config``
    (the ``dataclasses.asdict`` of the configuration asked for), a saved configuration that
    differs in any setting outside ``ignore`` raises ``ValueError`` naming each difference,
    unless ``override`` (``--override-config``).

    Example:
        >>> path, state = load_resume(out, args.resume, "checkpoint.pt", config=cfg.to_dict(),
        ...                           ignore=("stop_after",), override=args.override_config)
    """
    path = Path(out) / name if resume == "auto" else Path(resume)
    checkpoint = load_checkpoint(path, map_location="cpu")
    if config is not None:
        diffs = config_differences(checkpoint["config"], config, ignore=ignore)
        if diffs and not override:
            named = "; ".join(f"{n}: {a!r} in the checkpoint, {b!r} now" for n, a, b in diffs)
            raise ValueError(f"--resume {str(path)!r}: the configuration differs ({named}); "
                             "expected the checkpoint's settings, or pass --override-config")
    return path, checkpoint


def restore_training(checkpoint: dict[str, Any], metrics: Any, main: bool, **stateful: Any) -> int:
    """Put a run back where ``checkpoint`` left it: every ``stateful`` object (a module, an
    optimizer, a sampler: anything with ``load_state_dict``) loads ``checkpoint[keyword]``, the
    RNGs get their saved states, and on the main process ``metrics`` (a
    :class:`recipes.common.logging.MetricsLog`) drops the lines written after the checkpoint's
    step. Returns that step, where training goes on.

    Example:
        >>> start = restore_training(state, metrics, info.is_main, model=model, optimizer=opt)
    """
    for key, obj in stateful.items():
        obj.load_state_dict(checkpoint[key])
    start = int(checkpoint["step"])
    set_rng_state(checkpoint["rng"])
    if main:
        metrics.truncate_after(start)
    return start


def stop_if_diverged(loss: float, done: int, save: Callable[[int], Any]) -> None:
    """After step ``done`` (1-based) logged a non-finite ``loss``: save the checkpoint of the step
    before (``save(done - 1)``, the last finite state) and raise ``FloatingPointError``; a
    no-op for a finite loss.

    Example:
        >>> stop_if_diverged(float(loss), step + 1, save)
    """
    if not math.isfinite(loss):
        save(done - 1)
        raise FloatingPointError(f"loss={loss} at step {done}: training diverged (checkpoint of "
                                 "the step before saved); expected a finite loss: lower --lr")
