"""PNG plots (matplotlib, Agg backend): training curves and probe accuracies (CPC), and the image
and CLIP recipes' diagnostics, spectra, downstream convergence and temperature sweeps."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter  # noqa: E402


def plot_training(records: Sequence[dict], path: str | Path, title: str = "CPC training") -> Path:
    """Loss against step, and the accuracy of each prediction step (last logged record, plus
    the curves of steps 1, 4, 8 and the last one)."""
    train = [r for r in records if "loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train])
        n_pred = len(train[-1]["step_accuracy"])
        for k in sorted({1, min(4, n_pred), min(8, n_pred), n_pred}):
            axes[1].plot(steps, [r["step_accuracy"][k - 1] for r in train], label=f"k={k}")
        axes[1].legend()
        first, last = train[0]["step_accuracy"], train[-1]["step_accuracy"]
        ks = list(range(1, n_pred + 1))
        axes[2].plot(ks, first, "o--", label=f"step {train[0]['step']}")
        axes[2].plot(ks, last, "o-", label=f"step {train[-1]['step']}")
        axes[2].legend()
    axes[0].set(xlabel="training step", ylabel="InfoNCE loss (mean over k)", title=title)
    axes[1].set(xlabel="training step", ylabel="accuracy", title="prediction accuracy per k")
    axes[2].set(xlabel="prediction step k", ylabel="accuracy", title="accuracy against k")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_step_curves(records: Sequence[dict], keys: Sequence[str], path: str | Path,
                     title: str = "validation") -> Path:
    """For each of ``keys`` (a list per record, one value per prediction step k): its value
    against ``record["step"]`` for k = 1, 4, 8 and the last k, and its value against k at the
    first and last records. Records without the key are skipped.

    Example:
        >>> plot_step_curves(records, ["val_step_loss", "val_step_accuracy"], out / "validation.png")
    """
    keys = list(keys)
    if not keys:
        raise ValueError("keys: expected at least one per-step metric name, got none")
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        held = [r for r in records if isinstance(r.get(key), (list, tuple)) and r[key]]
        if not held:
            _no_data(row[0])
            _no_data(row[1])
        else:
            steps = [r.get("step", i) for i, r in enumerate(held)]
            n = len(held[-1][key])
            for k in sorted({1, min(4, n), min(8, n), n}):
                row[0].plot(steps, [r[key][k - 1] if len(r[key]) >= k else float("nan")
                                    for r in held], "o-", markersize=3, label=f"k={k}")
            row[0].legend()
            ks = list(range(1, n + 1))
            row[1].plot(ks, held[0][key], "o--", label=f"step {steps[0]}")
            if len(held) > 1:
                row[1].plot(ks, held[-1][key], "o-", label=f"step {steps[-1]}")
            row[1].legend()
        row[0].set(xlabel="training step", title=f"{key} per k")
        row[1].set(xlabel="prediction step k", title=f"{key} against k")
        for ax in row:
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_probes(results: dict[str, dict[str, float]], path: str | Path,
                title: str = "linear probes on held-out utterances") -> Path:
    """Grouped bars: one group per probe label, one bar per feature kind."""
    kinds = list(results)
    labels = sorted({label for kind in kinds for label in results[kind]})
    fig, ax = plt.subplots(figsize=(max(5, 2 + 1.8 * len(labels)), 4))
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(labels))]
        ys = [results[kind].get(label, float("nan")) for label in labels]
        bars = ax.bar(xs, ys, width, label=kind)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Image and CLIP recipes: training diagnostics, spectra, downstream convergence, temperature
# ----------------------------------------------------------------------------------------------
def plot_curves(records: Sequence[dict], keys: Sequence[str], path: str | Path,
                title: str = "training") -> Path:
    """Each of ``keys`` against ``record["step"]`` (the record's position when it has no step),
    one panel per key, from the records holding a number under that key (NaN drawn as a gap,
    lists and other values skipped). A key no record holds gets an empty panel saying so.

    Example:
        >>> plot_curves(log.read(), ["loss", "alignment", "uniformity", "knn_top1"], out / "training.png")
    """
    keys = list(keys)
    if not keys:
        raise ValueError("keys: expected at least one metric name, got none")
    cols = min(len(keys), 4)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(records)
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [float(y) for y in ys], "o-", markersize=3 if len(xs) > 1 else 5)
        else:
            _no_data(ax)
        ax.set(xlabel="step", title=key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_spectra(spectra: dict[str, Sequence[float]], path: str | Path,
                 title: str = "singular-value spectra", normalize: bool = False) -> Path:
    """Singular values (descending) against their index on a log scale, one line per entry,
    labelled with the effective rank (Roy and Vetterli 2007). Dimensional collapse (Jing et
    al. 2021) shows as a cliff: the values after it drop by orders of magnitude. Zero and NaN
    values cannot be drawn on a log scale and are left out. ``normalize``: divide each spectrum
    by its largest value.

    Example:
        >>> plot_spectra({"backbone": s_feat.tolist(), "projection": s_proj.tolist()}, out / "spectra.png")
    """
    from recipes.common.diagnostics import effective_rank

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for name, values in spectra.items():
        s = [_number(v) for v in values]
        erank = _safe_erank(effective_rank, s)
        top = max((v for v in s if v > 0), default=0.0)
        points = [(i + 1, v / top if normalize and top > 0 else v) for i, v in enumerate(s) if v > 0]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-" if len(xs) == 1 else "-", label=f"{name} (erank {erank:.1f})")
        drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        _no_data(ax)
    ax.set(xlabel="singular value index", ylabel="singular value" + (" / largest" if normalize else ""),
           title=title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def plot_downstream(curves: dict[str, dict[str, Any]], path: str | Path,
                    title: str = "downstream convergence") -> Path:
    """Downstream metric against epoch: one panel per task, one line per pre-training, so
    "pre-trained converges faster than random init" reads off the picture.

    Args:
        curves: ``{task: {pretraining: curve}}`` where a curve is ``(epochs, metric)``, a
            :class:`recipes.common.evaluation.Curve`, or a dict with ``epochs`` and ``metric``
            (and optionally ``metric_name``, used as the y label).

    Example:
        >>> plot_downstream({"binary/frozen/10%": {"simclr": c1, "random_init": c0}}, out / "downstream.png")
    """
    tasks = list(curves)
    if not tasks:
        raise ValueError("curves: expected at least one task, got none")
    cols = min(len(tasks), 3)
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.6 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        ylabel = "metric"
        drawn = False
        for pretraining, curve in curves[task].items():
            epochs, metric, name = _curve_points(curve)
            ylabel = name or ylabel
            if not epochs:
                continue
            ax.plot(epochs, metric, "o-", markersize=3 if len(epochs) > 1 else 5, label=pretraining)
            drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            _no_data(ax)
        ax.set(xlabel="epoch", ylabel=ylabel, title=task)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def plot_temperature_sweep(results: dict[Any, dict[str, Any]], path: str | Path,
                           title: str = "temperature sweep") -> Path:
    """How the temperature trades uniformity against alignment (Wang and Liu 2021, "Understanding
    the Behaviour of Contrastive Loss"), four panels:

    1. the projection spectra, one line per temperature (log scale);
    2. uniformity and alignment against the temperature (log x);
    3. alignment against uniformity, each point a temperature (Wang and Isola 2020, Fig. 2);
    4. kNN top-1 against the temperature.

    Args:
        results: ``{temperature: {"uniformity": float, "alignment": float, "spectrum":
            [singular values], "knn_top1": float}}``; temperatures as numbers or strings of
            numbers (JSON keys); missing entries and NaN values are skipped.

    Example:
        >>> plot_temperature_sweep({0.1: {...}, 0.5: {...}}, out / "temperature.png")
    """
    if not results:
        raise ValueError("results: expected at least one temperature, got none")
    items = sorted(((float(t), r) for t, r in results.items()), key=lambda item: item[0])
    temps = [t for t, _ in items]

    def series(key: str) -> list[float]:
        return [_number(r.get(key)) for _, r in items]

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    spectra = {f"T={t:g}": r.get("spectrum") or [] for t, r in items}
    drawn = False
    for name, values in spectra.items():
        points = [(i + 1, _number(v)) for i, v in enumerate(values) if _number(v) > 0]
        if points:
            xs, ys = zip(*points)
            axes[0].plot(xs, ys, "o-" if len(xs) == 1 else "-", label=name)
            drawn = True
    if drawn:
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=8)
    else:
        _no_data(axes[0])
    axes[0].set(xlabel="singular value index", ylabel="singular value", title="projection spectra")

    unif, align, knn = series("uniformity"), series("alignment"), series("knn_top1")
    axes[1].plot(temps, unif, "o-", color="tab:blue", label="uniformity")
    axes[1].set(xlabel="temperature", ylabel="uniformity (lower: more uniform)",
                title="uniformity and alignment")
    twin = axes[1].twinx()
    twin.plot(temps, align, "s--", color="tab:orange", label="alignment")
    twin.set_ylabel("alignment (lower: better aligned)")
    axes[1].legend(handles=axes[1].get_lines() + twin.get_lines(), fontsize=8)

    axes[2].plot(unif, align, "o", color="tab:green")
    for t, u, a in zip(temps, unif, align):
        if math.isfinite(u) and math.isfinite(a):
            axes[2].annotate(f"T={t:g}", (u, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes[2].set(xlabel="uniformity", ylabel="alignment", title="alignment against uniformity")

    axes[3].plot(temps, knn, "o-", color="tab:red")
    axes[3].set(xlabel="temperature", ylabel="kNN top-1", title="kNN accuracy")
    for ax in (axes[1], axes[3]):
        if all(t > 0 for t in temps):
            ax.set_xscale("log")
        ax.set_xticks(temps, [f"{t:g}" for t in temps])       # the temperatures run, no minors
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _curve_points(curve: Any) -> tuple[list[float], list[float], str | None]:
    if hasattr(curve, "epochs") and hasattr(curve, "metric"):
        return list(curve.epochs), [_number(v) for v in curve.metric], getattr(curve, "metric_name", None)
    if isinstance(curve, dict):
        return list(curve["epochs"]), [_number(v) for v in curve["metric"]], curve.get("metric_name")
    epochs, metric = curve
    return list(epochs), [_number(v) for v in metric], None


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return float("nan")


def _safe_erank(effective_rank: Any, values: list[float]) -> float:
    try:
        return effective_rank(values) if values else float("nan")
    except ValueError:                     # negative values: not singular values
        return float("nan")


def _no_data(ax: Any) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
