"""Run configuration shared by the recipes: a dataclass filled from a preset, then a YAML/JSON
``--config`` file, then command-line flags (later wins), printed at start and saved with the run
and in every checkpoint; and the comparison ``--resume`` makes between a saved configuration and
the one asked for."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.json`` file, or in a YAML file (any other suffix)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r}: no such file (expected YAML or JSON)")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ValueError(f"config={str(path)!r}: expected a mapping at the top level, got "
                         f"{type(values).__name__}")
    return values


def check_int(name: str, value: Any, *, zero: bool = False) -> None:
    """``ValueError`` naming ``name`` and ``value`` unless ``value`` is an ``int`` (not a bool)
    ``>= 1``, or ``>= 0`` with ``zero``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero else value >= 1)
    if not ok:
        raise ValueError(f"{name}={value!r}: expected a {'non-negative' if zero else 'positive'} "
                         "integer")


def check_number(name: str, value: Any, *, zero: bool = False) -> None:
    """``ValueError`` naming ``name`` and ``value`` unless ``value`` is a finite int or float
    (not a bool) ``> 0``, or ``>= 0`` with ``zero``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= 0 if zero else value > 0)
    if not ok:
        raise ValueError(f"{name}={value!r}: expected a {'non-negative' if zero else 'positive'} "
                         "finite number")


def apply_values(target: Any, values: dict[str, Any], where: str) -> None:
    """Set the fields of dataclass ``target`` from ``values``; nested dataclasses take nested
    mappings. An unknown key raises ``ValueError`` naming it (``where`` prefixes the name:
    ``"--"``, ``"config."``, ``"preset."``)."""
    names = {f.name: f for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}{key}={value!r}: unknown setting; expected one of "
                             f"{sorted(names)}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}{key}={value!r}: expected a mapping")
            apply_values(current, value, f"{where}{key}.")
        else:
            setattr(target, key, value)


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted name, saved value, current value)`` for every setting that differs between two
    ``dataclasses.asdict`` configurations, nested mappings flattened; names in ``ignore`` (dotted)
    are not compared (settings a resumed run may change, such as the step budget)."""
    skip = set(ignore)
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
            return
        name = prefix[:-1]
        if name in skip:
            return
        # JSON turns tuples into lists: compare as lists
        norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
        if norm(a) != norm(b):
            out.append((name, a, b))

    walk(saved, current, "")
    return out


def layered_config(config: Any, presets: tuple[str, ...], preset_values: Callable[[str], dict],
                   file_values: dict[str, Any] | None, overrides: dict[str, Any] | None, *,
                   cuda: bool, gpu_preset: str, cpu_preset: str) -> Any:
    """Fill dataclass ``config`` from its preset, then ``file_values`` (a ``--config`` file),
    then ``overrides`` (flags; None values ignored); later wins. The preset ``"auto"`` becomes
    ``gpu_preset`` when the device is (or, for ``"auto"``, would be) CUDA, else ``cpu_preset``;
    the resolved name is stored in ``config.preset``."""
    file_values = dict(file_values or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.get("preset", file_values.get("preset", "auto"))
    if preset not in presets:
        raise ValueError(f"preset={preset!r}: expected one of {presets}")
    device = overrides.get("device", file_values.get("device", "auto"))
    if preset == "auto":
        on_cuda = str(device).startswith("cuda") or (device == "auto" and cuda)
        preset = gpu_preset if on_cuda else cpu_preset
    apply_values(config, preset_values(preset), "preset.")
    apply_values(config, file_values, "config.")
    apply_values(config, overrides, "--")
    config.preset = preset
    return config
