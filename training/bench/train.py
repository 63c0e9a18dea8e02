"""``promptbake bench train``: promptbake's training loop against a reference-style loop, side by side.

The reference style is Dassl's as CoOp uses it: every epoch reads and decodes each training image
from disk and augments it with PIL through a DataLoader, the text tower sees every prompt at the
full 77-token context, and the image encoder runs on every step. promptbake's loop differs in
three switches of :class:`training.config.TrainConfig`, all measured here on the same method,
backbone, dataset, shots, seed, epochs and thread count, each training in a fresh process:

- ``full_context`` off: prompts trimmed after the longest one (exact for the causal text tower);
- ``images_in_memory`` on: the training images decoded once (identical tensors);
- ``feature_cache_views`` N (only where the method leaves the image graph alone and trains on
  images): image features of N augmented views computed once, one drawn per image per epoch. This
  one changes the protocol's statistics (each image is seen in at most N augmentations), so it is
  a row of its own and off by default.

Time per epoch is the loop's own timing (``train_log.jsonl``; set-up and evaluation excluded); the
feature cache's one-off cost is reported in the ``train s`` column (every epoch plus the cache).
The one-off decode of ``images_in_memory`` happens in set-up and is not counted (0.45 s for the
emoji benchmarks' 1,632 training images under cProfile; it replaces a decode per image per epoch).
Every row is then evaluated (Base / Novel / HM after the same epochs).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from statistics import median
from typing import Any, Mapping, Sequence

from training.bench.train_cost import _run_child, train_argv

#: (label, train options) of the rows; the first is the reference-style loop every ratio is to
LOOPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("reference-style", {"full_context": True, "images_in_memory": False, "feature_cache_views": 0}),
    ("promptbake", {"full_context": False, "images_in_memory": True, "feature_cache_views": 0}),
)


def bench_train(method: str, backbone: str, dataset: str, *, epochs: int = 2, shots: int = 16, seed: int = 1,
                threads: int = 1, cache_views: int = 0, train_options: Mapping[str, Any] | None = None,
                test_per_class: int | None = None, workdir: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per loop (see :data:`LOOPS`; plus the feature cache with ``cache_views`` > 0)."""
    from training.jobs import eval_job
    from training.methods import get_method
    from training.runs import RunDir

    spec = get_method(method)
    if spec.method_cls.needs_init_run:
        raise ValueError(f"{method} starts from another run; bench its host")
    loops = list(LOOPS)
    if cache_views:
        caps = spec.method_cls.capabilities_for(spec.config_cls())
        if caps.changes_image_graph or spec.method_cls.training_data != "images":
            raise ValueError(f"{method} changes the image graph or trains on texts: no image features to cache")
        loops.append((f"promptbake + feature cache ({cache_views} views)",
                      {**LOOPS[1][1], "feature_cache_views": cache_views}))
    rows = []
    with tempfile.TemporaryDirectory(prefix="promptbake-bench-train-", dir=workdir) as tmp:
        for i, (label, options) in enumerate(loops):
            run = Path(tmp) / f"loop{i}"
            argv = train_argv(method, backbone, dataset, shots, seed, epochs, run, {**(train_options or {}), **options})
            rc, wall, peak, err = _run_child(argv, threads)
            if rc != 0:
                raise RuntimeError(f"promptbake train ({label}) failed ({rc}): {err.strip().splitlines()[-1] if err.strip() else ''}")
            log = RunDir(run).log_records()
            recorded = json.loads((run / "run.json").read_text())["train"]  # what the child trained with
            metrics = eval_job(run, progress=False, test_per_class=test_per_class)
            cache_seconds = sum(r.get("cache_seconds", 0.0) for r in log)
            rows.append({"loop": label, "train_config": {k: recorded[k] for k in options}, "epochs": len(log),
                         "cache_seconds": cache_seconds, "epoch_seconds": median(r["seconds"] for r in log),
                         "train_seconds": sum(r["seconds"] for r in log) + cache_seconds,
                         "peak_rss_mb": peak / 2**20, "wall_seconds": wall, "threads": threads,
                         "base_acc": metrics["base_acc"], "novel_acc": metrics["novel_acc"], "hm": metrics["hm"]})
    return rows


def format_train_table(rows: Sequence[dict[str, Any]], method: str, dataset: str) -> str:
    """Markdown; speed-ups are to the first row (the reference-style loop)."""
    ref = rows[0]
    lines = ["| loop | s / epoch | speed-up per epoch | train s | speed-up | base | novel | HM | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loop']} | {r['epoch_seconds']:.2f} | {ref['epoch_seconds'] / r['epoch_seconds']:.2f}x | "
                     f"{r['train_seconds']:.1f} | {ref['train_seconds'] / r['train_seconds']:.2f}x | "
                     f"{r['base_acc']:.2f} | {r['novel_acc']:.2f} | {r['hm']:.2f} | {r['peak_rss_mb']:.0f} |")
    lines.append(f"\n{method} on {dataset}, {ref['epochs']} epochs each, {ref['threads']} torch thread(s), one fresh "
                 "process per row; s / epoch = median of the loop's epoch times; train s = every epoch plus the feature "
                 "cache's one-off cost; accuracy after those epochs.")
    return "\n".join(lines)
