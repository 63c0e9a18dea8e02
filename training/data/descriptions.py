"""Per-class text descriptions: CuPL-format files, matching them to class names, the shipped emoji ones.

A description file is CuPL's format, ``{"class name": ["sentence", ...]}``; an attribute file is
TAP's, ``{"class name": {"attribute": ["sentence", ...]}}``. Keys match class names the way
ProText's reference code matches them: lower-cased, ``_`` read as a space. The emoji benchmark's
files are built from Unicode CLDR and emoji-test.txt by :mod:`training.benchmark.descriptions`.

Torch-free: nothing here (or in what it imports) loads torch.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

__all__ = [
    "description_key",
    "load_any_descriptions",
    "load_attributes",
    "load_descriptions",
    "match_descriptions",
]


def description_key(classname: str) -> str:
    """The key a class name is matched under: lower case, ``_`` as a space (ProText's rule)."""
    return classname.lower().replace("_", " ")


def _read_object(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"description file {os.fspath(path)!r}: cannot read it ({e.strerror or e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"description file {os.fspath(path)!r}: not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"description file {os.fspath(path)!r}: expected an object of class name -> "
                         f"[sentence, ...], got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"description file {os.fspath(path)!r}: holds no classes")
    return data


def _sentences(path: str | os.PathLike, where: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"description file {os.fspath(path)!r}: {where}: expected a non-empty list of "
                         f"sentences, got {json.dumps(value)[:60]}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"description file {os.fspath(path)!r}: {where}: item {i} is not a non-empty "
                             f"string ({json.dumps(s)[:60]})")
    return list(value)


def load_descriptions(path: str | os.PathLike) -> dict[str, list[str]]:
    """A CuPL-format file ``{"class name": ["sentence", ...]}``, validated, in file order.

    Raises:
        ValueError: naming the file and the problem: unreadable or not JSON, not an object, empty,
            an empty class name, a value that is not a non-empty list of non-empty strings.
    """
    data = _read_object(path)
    out: dict[str, list[str]] = {}
    for name, value in data.items():
        if not name.strip():
            raise ValueError(f"description file {os.fspath(path)!r}: an empty class name")
        out[name] = _sentences(path, f"class {name!r}", value)
    return out


def load_attributes(path: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """An attribute-tree file ``{"class name": {"attribute": ["sentence", ...]}}``, validated.

    Raises:
        ValueError: naming the file and the problem, as :func:`load_descriptions`; a class's value
            must be a non-empty object of attribute -> sentences.
    """
    data = _read_object(path)
    out: dict[str, dict[str, list[str]]] = {}
    for name, tree in data.items():
        if not name.strip():
            raise ValueError(f"description file {os.fspath(path)!r}: an empty class name")
        if not isinstance(tree, dict) or not tree:
            raise ValueError(f"description file {os.fspath(path)!r}: class {name!r}: expected a non-empty "
                             f"object of attribute -> [sentence, ...], got {json.dumps(tree)[:60]}")
        out[name] = {attr: _sentences(path, f"class {name!r}, attribute {attr!r}", v) for attr, v in tree.items()}
    return out


def load_any_descriptions(path: str | os.PathLike) -> dict[str, list[str]] | dict[str, dict[str, list[str]]]:
    """A description file of either kind: attribute trees when its first class's value is an object
    (:func:`load_attributes`), else CuPL sentences (:func:`load_descriptions`)."""
    first = next(iter(_read_object(path).values()))
    return load_attributes(path) if isinstance(first, dict) else load_descriptions(path)


def match_descriptions(descriptions: Mapping[str, list[str]] | Mapping[str, dict],
                       classnames: Iterable[str]) -> tuple[dict, list[str]]:
    """The descriptions of ``classnames``, matched under :func:`description_key`.

    Args:
        descriptions: a loaded file (descriptions or attribute trees).
        classnames: the dataset's class names, in label order.

    Returns:
        ``(matched, unmatched)``: ``{classname: value}`` in ``classnames`` order for the names that
        have an entry (keyed by the caller's spelling), and the class names that have none.

    Raises:
        ValueError: two keys of ``descriptions`` match the same class name (ambiguous).
    """
    by_key: dict[str, str] = {}
    for name in descriptions:
        key = description_key(name)
        if key in by_key:
            raise ValueError(f"descriptions {by_key[key]!r} and {name!r} both match class names spelled {key!r}")
        by_key[key] = name
    matched, unmatched = {}, []
    for classname in classnames:
        name = by_key.get(description_key(classname))
        if name is None:
            unmatched.append(classname)
        else:
            matched[classname] = descriptions[name]
    return matched, unmatched
