"""PNG figures of a run's training curves and of a benchmark's results (matplotlib, headless).

``promptbake plot RUN`` draws ``train_log.jsonl``: loss and training accuracy per epoch (and the
validation accuracy of ``--select best_val`` runs), with stage boundaries. ``promptbake benchmark
... --plot`` draws ``results.json``: base / novel / HM per method and dataset, and each method's
base and novel accuracy against zero-shot CLIP's (the base-to-novel trade-off at a glance).
Files are written whole (temp file, then rename).
"""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from training.runs import LOG_FILE, RUN_FILE, RunDir, RunError, atomic_write_bytes

METRICS = (("base_acc", "base"), ("novel_acc", "novel"), ("hm", "HM"))
BASELINE = "zeroshot"


def _pyplot():  # noqa: ANN202
    try:
        import matplotlib
    except ImportError:
        raise RunError("plots need matplotlib: pip install 'promptbake[plot]'") from None
    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of a run's ``train_log.jsonl`` (a torn last line is left out)."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        raise RunError(f"{run_dir}: no {LOG_FILE} (not a training run, or not started)")
    records = RunDir(run_dir).log_records()
    if not records:
        raise RunError(f"{path}: no finished epoch yet")
    return records


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and accuracy per epoch of a run -> PNG (default ``RUN/curves.png``)."""
    run_dir = Path(run_dir)
    records = read_log(run_dir)
    title = run_dir.name
    info_path = run_dir / RUN_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        title = f"{info.get('method', '?')} on {info.get('dataset', '?')} ({info.get('backbone', '?')}, seed {info.get('seed', '?')})"
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [r["epoch"] for r in records]
    ax_loss.plot(epochs, [r["loss"] for r in records], marker=".", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, label, colour in (("acc", "train (augmented)", "tab:blue"), ("val_acc", "validation", "tab:green")):
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker=".", label=label, color=colour)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if ax_acc.lines:
        ax_acc.legend(loc="lower right")
    stages = [(r["epoch"], r["stage"]) for r in records if "stage" in r]
    for (e, name), (_, previous) in zip(stages[1:], stages[:-1]):
        if name != previous:
            for ax in (ax_loss, ax_acc):
                ax.axvline(e - 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax_loss.annotate(name, (e - 0.5, 1), xycoords=("data", "axes fraction"), fontsize=8, va="top")
    fig.suptitle(title, y=1.03)
    return _save(fig, Path(out) if out else run_dir / "curves.png")


def _means(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """(method, dataset) -> mean of each metric over seeds."""
    acc: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for key, _ in METRICS:
            acc[(r["method"], r["dataset"])][key].append(float(r[key]))
    return {cell: {k: sum(v) / len(v) for k, v in metrics.items()} for cell, metrics in acc.items()}


def method_colours(plt: Any, methods: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per method: matplotlib's default cycle (tab10) repeats after ten, so a
    grid of eleven methods or more drew two of them alike; tab20 then, and beyond twenty a
    continuous map."""
    n = len(methods)
    if n <= 10:
        cmap, at = plt.get_cmap("tab10"), range(n)
    elif n <= 20:
        cmap, at = plt.get_cmap("tab20"), range(n)
    else:
        cmap, at = plt.get_cmap("turbo"), [i / (n - 1) for i in range(n)]
    return {m: cmap(x) for m, x in zip(methods, at)}


def plot_benchmark(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], datasets: Sequence[str],
                   out_dir: str | Path) -> list[Path]:
    """``results.json`` rows -> ``out_dir/b2n.png`` (base, novel and HM per dataset and method, with the
    average over datasets) and, when zero-shot is a row, ``out_dir/vs_zeroshot.png`` (each method's
    average base and novel gain over zero-shot). Cells not finished are left out."""
    means = _means(rows)
    datasets = [d for d in datasets if any((m, d) in means for m in methods)]
    methods = [m for m in methods if any((m, d) in means for d in datasets)]
    if not methods:
        raise RunError("no finished benchmark cell to plot")
    out_dir = Path(out_dir)
    plt = _pyplot()
    # the average over datasets only for methods that finished all of them
    complete = {m for m in methods if all((m, d) in means for d in datasets)}
    columns = [*datasets, "average"]
    fig, axes = plt.subplots(3, 1, figsize=(max(7.0, 1.2 * len(columns) + 3.0), 9.0), sharex=True)
    width = 0.8 / len(methods)
    colours = method_colours(plt, methods)
    for ax, (key, label) in zip(axes, METRICS):
        for i, m in enumerate(methods):
            values = [means[(m, d)][key] if (m, d) in means else math.nan for d in datasets]
            values.append(sum(values) / len(values) if m in complete else math.nan)
            ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(columns))], values, width, label=m,
                   color=colours[m])
        ax.set_ylabel(f"{label} accuracy (%)" if key != "hm" else "HM")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(columns)), [c.removeprefix("emoji-") for c in columns], rotation=30, ha="right")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    written = [_save(fig, out_dir / "b2n.png")]
    if BASELINE in methods and BASELINE in complete:
        others = [m for m in methods if m != BASELINE and m in complete]
        if others:
            fig, ax = plt.subplots(figsize=(5.5, 5))
            zs = {k: sum(means[(BASELINE, d)][k] for d in datasets) / len(datasets) for k, _ in METRICS}
            for m in others:
                base = sum(means[(m, d)]["base_acc"] for d in datasets) / len(datasets) - zs["base_acc"]
                novel = sum(means[(m, d)]["novel_acc"] for d in datasets) / len(datasets) - zs["novel_acc"]
                ax.scatter(base, novel, color=colours[m])
                ax.annotate(m, (base, novel), textcoords="offset points", xytext=(4, 3), fontsize=8)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set(xlabel="base accuracy − zero-shot (points)", ylabel="novel accuracy − zero-shot (points)",
                   title=f"average over {len(datasets)} dataset(s)")
            ax.grid(alpha=0.3)
            written.append(_save(fig, out_dir / "vs_zeroshot.png"))
    return written
