"""``promptbake bench cache``: what the image-feature cache buys, measured side by side.

Trains the same method, dataset, seed and epochs twice — cache off (the reference protocol: fresh
augmentations every epoch) and cache on (features of N augmented views computed once) — then
evaluates both and prints wall time, speed-up and Base / Novel / HM.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from training.jobs import eval_job, train_job


def bench_cache(
    method: str,
    backbone: str,
    dataset: str,
    shots: int = 16,
    seed: int = 1,
    views: int = 10,
    train_options: Mapping[str, Any] | None = None,
    test_per_class: int | None = None,
    workdir: str | Path | None = None,
) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for label, n in (("off", 0), (f"on ({views} views)", views)):
            opts = {**(train_options or {}), "feature_cache_views": n}
            t0 = time.perf_counter()
            run = train_job(method, backbone, dataset, shots, seed, Path(tmp) / f"cache{n}", train_options=opts, progress=False)
            seconds = time.perf_counter() - t0
            m = eval_job(run.path, progress=False, test_per_class=test_per_class)
            rows.append({"cache": label, "train_seconds": seconds, "base_acc": m["base_acc"], "novel_acc": m["novel_acc"], "hm": m["hm"]})
    return rows


def format_cache_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["train_seconds"]
    lines = ["| feature cache | train s | speed-up | base | novel | HM |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['cache']} | {r['train_seconds']:.1f} | {base / r['train_seconds']:.2f}x | "
            f"{r['base_acc']:.2f} | {r['novel_acc']:.2f} | {r['hm']:.2f} |"
        )
    return "\n".join(lines)
