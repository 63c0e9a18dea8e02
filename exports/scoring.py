"""The one scoring path: class names checked, heads fused into logits, softmax, top-k.

Evaluation (``training.evaluate``), offline prediction (:class:`exports.runtime.Predictor`), the
bench commands and the service all turn embeddings into answers through these functions, so a
method's declared heads and base/novel switch mean the same thing everywhere.

A method's logits are a sum of heads (``exports.manifest.Head``, or the protocol's ``Head``: any
object with ``image``, ``text``, ``base_weight`` and ``novel_weight``)::

    logits[b, c] = logit_scale * sum_h w_h(c) * <image[h.image][b], text[h.text][c]>

with ``w_h(c)`` the head's ``base_weight`` when class ``c`` is treated as a base class and its
``novel_weight`` otherwise. Which names are base is decided by :func:`base_mask`: ``auto`` treats
exactly the names the method was trained on as base (what the papers do at test time), ``base``
and ``novel`` force one head set for every name. A plain method has one head with both weights 1,
so the mode changes nothing.

Torch-free (numpy only): the service imports it.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

Mode = Literal["auto", "base", "novel"]
MODES: tuple[str, ...] = ("auto", "base", "novel")


class HeadLike(Protocol):
    image: str
    text: str
    base_weight: float
    novel_weight: float


def normalize_name(name: str) -> str:
    """The form names are compared in: Unicode NFC, whitespace collapsed, lower-cased.

    The CLIP tokenizer lower-cases and collapses whitespace itself, so names equal in this form
    get the same tokens.
    """
    return " ".join(unicodedata.normalize("NFC", name).split()).lower()


def _visible(ch: str) -> bool:
    """Not a control, format (zero-width), separator or unassigned character."""
    return unicodedata.category(ch)[0] not in ("C", "Z")


class ClassNameError(ValueError):
    """A class-name list that cannot be scored; ``kind`` says why (the service's error kind)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def check_class_names(class_names: Sequence[str], what: str = "class names", unique: bool = True) -> list[str]:
    """A non-empty list of non-blank strings, distinct after :func:`normalize_name` when ``unique``.

    The one check of class names: ``predict``, the :class:`~exports.runtime.Predictor` and the
    service all call it (the service adds its size limits).

    Raises:
        ClassNameError: naming the first offending entry (kinds ``not_a_list``, ``names_empty``,
            ``name_empty``, ``name_duplicate``).
    """
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ClassNameError("not_a_list", f"{what} must be a list of strings")
    names = list(class_names)
    if not names:
        raise ClassNameError("names_empty", f"{what} must not be empty")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        key = normalize_name(n) if isinstance(n, str) else ""
        if not any(_visible(ch) for ch in key):  # "", spaces, or only invisible characters (U+200B, ...)
            raise ClassNameError("name_empty", f"{what}[{i}] is empty, only whitespace or invisible characters, or not a string: {n!r}")
        if unique and key in seen:
            raise ClassNameError("name_duplicate", f"{what} must be unique: {what}[{i}] {n!r} repeats {what}[{seen[key]}] {names[seen[key]]!r} "
                                 "(names are compared ignoring case and extra whitespace)")
        seen.setdefault(key, i)
    return names


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def base_mask(class_names: Sequence[str], base_names: Sequence[str], mode: str = "auto") -> np.ndarray:
    """``[C]`` bool: which names the base heads score (``auto``: the names trained on)."""
    check_mode(mode)
    if mode != "auto":
        return np.full(len(class_names), mode == "base")
    base = {normalize_name(n) for n in base_names}
    return np.array([normalize_name(n) in base for n in class_names], dtype=bool)


def uses_switch(heads: Sequence[HeadLike]) -> bool:
    """Whether base and novel names are scored differently."""
    return any(h.base_weight != h.novel_weight for h in heads)


def head_logits(image: Mapping[str, np.ndarray], text: Mapping[str, np.ndarray], heads: Sequence[HeadLike],
                is_base: np.ndarray, logit_scale: float) -> np.ndarray:
    """``[B, C]`` float64 logits from normalised image outputs ``{name: [B, D]}`` and class outputs ``{name: [C, D]}``."""
    if not heads:
        raise ValueError("a method needs at least one head")
    is_base = np.asarray(is_base, dtype=bool)
    out: np.ndarray | None = None
    for h in heads:
        img, txt = image[h.image], text[h.text]
        if txt.shape[0] != is_base.shape[0]:
            raise ValueError(f"head {h.text!r}: {txt.shape[0]} class rows for {is_base.shape[0]} names")
        weight = np.where(is_base, float(h.base_weight), float(h.novel_weight))  # [C]
        if not weight.any():
            continue  # a head no name uses (e.g. the base head of an all-novel list)
        term = np.asarray(img, dtype=np.float64) @ np.asarray(txt, dtype=np.float64).T * weight[None, :]
        out = term if out is None else out + term
    if out is None:
        b = next(iter(image.values())).shape[0]
        out = np.zeros((b, is_base.shape[0]), dtype=np.float64)
    return float(logit_scale) * out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the names, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """One prediction per row: ``{"label", "score", "top": [{"class_name", "score"}, ...]}``, best first.

    Ties keep the order of ``class_names`` (a stable sort).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
    k = min(int(k), len(class_names))
    results = []
    for row in probs:
        order = np.argsort(-row, kind="stable")[:k]
        top = [{"class_name": class_names[j], "score": float(row[j])} for j in order]
        results.append({"label": top[0]["class_name"], "score": top[0]["score"], "top": top})
    return results
