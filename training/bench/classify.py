"""``promptbake bench classify``: what one classification costs with each method's artifact.

Artifacts of different methods differ in what a request runs: CoOp-like methods (learned text
context only) run the image graph and reuse the class embeddings of a repeated class list; deep
prompts (VPT, IVLP, MaPLe, PromptSRC) lengthen the image graph's token sequence; CoCoOp's text
depends on the image, so it runs the text graph on every (image, class name) pair and caches
nothing. This measures ``Predictor.classify`` in-process (no HTTP) for every artifact at every
(class names, images per call) setting, for a repeated class list (the cache applies where it can)
and for a new class list on every call, side by side: artifacts take turns in short blocks, and
each figure is the median over the blocks, so machine load that comes and goes falls on all of
them alike. Ratios are to the first artifact at the same setting.

Images are synthetic JPEGs decoded once (preprocessing is timed, decoding is not).
"""
from __future__ import annotations

import io
import itertools
import os
import statistics
import time
from typing import Any, Iterator, Sequence

from PIL import Image

from training.bench.serve import synthetic_jpegs

LISTS = ("repeated", "new")


def _name_lists(n: int, class_list: str) -> Iterator[list[str]]:
    """Lists of ``n`` distinct class names: the same list every time ("repeated") or a new one ("new")."""
    if class_list == "repeated":
        return itertools.repeat([f"thing {i} of kind 0" for i in range(n)])
    return ([f"thing {i} of kind {call}" for i in range(n)] for call in itertools.count(1))


def _descriptions(names: list[str], n: int, attributes: Sequence[str] = ()) -> dict[str, Any]:
    """``n`` distinct sentences per name, for artifacts that embed classes from descriptions; for one
    that reads attribute trees (TAP), ``n`` sentences per attribute."""
    if attributes:
        return {name: {a: [f"{name}, {a} detail {j} of it." for j in range(n)] for a in attributes} for name in names}
    return {name: [f"{name}, detail {j} of it." for j in range(n)] for name in names}


def _block_seconds(predictor, images: list[Image.Image], lists: Iterator[list[str]], calls: int,
                   descriptions: int = 0) -> float:
    """Seconds per call over ``calls`` calls of ``classify``, each with the next class list (and, for an
    artifact that needs them, ``descriptions`` sentences per name sent with the request)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        names = next(lists)
        layout = predictor.manifest.layout
        extra = _descriptions(names, descriptions, layout.attributes if layout else ()) if predictor.described else None
        predictor.classify(images, names, top_k=1, descriptions=extra)
    return (time.perf_counter() - t0) / calls


def bench_classify(
    artifacts: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[int] = (10, 100),
    images: Sequence[int] = (1, 8),
    seconds: float = 1.0,
    rounds: int = 5,
    device: str = "cpu",
    descriptions: int = 5,
) -> list[dict[str, Any]]:
    """One row per (artifact, names, images, class list): ms per call, images/s and the ratio to the
    first artifact. ``seconds`` is the length of one block of one artifact; ``rounds`` blocks each.
    An artifact that embeds classes from descriptions gets ``descriptions`` sentences per name with
    every request (the other artifacts get none)."""
    from exports.runtime import Predictor

    if not artifacts:
        raise ValueError("give at least one artifact")
    if rounds < 1 or seconds <= 0:
        raise ValueError("rounds must be >= 1 and seconds > 0")
    if any(n < 1 for n in (*names, *images, descriptions)):
        raise ValueError("class-name, image and description counts must be >= 1")
    predictors = [Predictor(a, device=device) for a in artifacts]
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in synthetic_jpegs(max(images))]
    rows = []
    for n_names in names:
        for n_images in images:
            batch = pictures[:n_images]
            for class_list in LISTS:
                lists = [_name_lists(n_names, class_list) for _ in predictors]
                calls = []
                for p, it in zip(predictors, lists):  # warm-up, and how many calls fill a block
                    per_call = _block_seconds(p, batch, it, 1, descriptions)
                    calls.append(max(1, int(seconds / max(per_call, 1e-6))))
                times: list[list[float]] = [[] for _ in predictors]
                for _ in range(rounds):
                    for k, (p, it) in enumerate(zip(predictors, lists)):
                        times[k].append(_block_seconds(p, batch, it, calls[k], descriptions))
                medians = [statistics.median(t) for t in times]
                for path, p, med in zip(artifacts, predictors, medians):
                    rows.append({
                        "artifact": str(path),
                        "method": p.manifest.method,
                        "names": n_names,
                        "images": n_images,
                        "class_list": class_list,
                        "ms_per_call": med * 1e3,
                        "images_per_s": n_images / med,
                        "vs_first": med / medians[0],
                    })
    return rows


def format_classify_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| artifact | method | class names | images/call | class list | ms/call | images/s | time vs first |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = os.path.basename(os.path.normpath(r["artifact"]))
        lines.append(f"| {name} | {r['method']} | {r['names']} | {r['images']} | {r['class_list']} | {r['ms_per_call']:.1f} "
                     f"| {r['images_per_s']:.1f} | {r['vs_first']:.2f}x |")
    return "\n".join(lines)
