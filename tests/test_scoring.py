"""The one scoring path (exports.scoring): heads, the base/novel switch, names, softmax, top-k."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from exports import scoring
from exports.manifest import Head


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_one_head_is_scaled_cosine_and_ignores_the_mode():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 3, 8), _unit(rng, 4, 8)
    heads = [Head(image="i", text="t")]
    for mode in scoring.MODES:
        is_base = scoring.base_mask(["a", "b", "c", "d"], ["a"], mode)
        np.testing.assert_allclose(scoring.head_logits({"i": img}, {"t": txt}, heads, is_base, 50.0), 50.0 * img @ txt.T)
    assert not scoring.uses_switch(heads)


def test_switch_scores_base_and_novel_names_with_their_heads():
    # MMRL-like: base names fuse two image outputs, novel names use the first alone
    rng = np.random.default_rng(1)
    a, b, txt = _unit(rng, 2, 8), _unit(rng, 2, 8), _unit(rng, 3, 8)
    heads = [Head(image="a", text="t", base_weight=0.7, novel_weight=1.0), Head(image="b", text="t", base_weight=0.3, novel_weight=0.0)]
    names, base = ["cat", "Dog ", "owl"], ["dog", "cat"]
    is_base = scoring.base_mask(names, base, "auto")
    assert is_base.tolist() == [True, True, False]  # compared as normalised names
    out = scoring.head_logits({"a": a, "b": b}, {"t": txt}, heads, is_base, 10.0)
    np.testing.assert_allclose(out[:, :2], 10.0 * (0.7 * a @ txt[:2].T + 0.3 * b @ txt[:2].T))
    np.testing.assert_allclose(out[:, 2], 10.0 * (a @ txt[2]))
    forced = scoring.head_logits({"a": a, "b": b}, {"t": txt}, heads, scoring.base_mask(names, base, "novel"), 10.0)
    np.testing.assert_allclose(forced, 10.0 * a @ txt.T)
    assert scoring.uses_switch(heads)


@pytest.mark.parametrize("names, kind", [("cat", "not_a_list"), ([], "names_empty"), (["a", " \t"], "name_empty"),
                                         (["a", 3], "name_empty"), (["Cat", "cat "], "name_duplicate")])
def test_class_name_errors_have_kinds(names, kind):
    with pytest.raises(scoring.ClassNameError) as e:
        scoring.check_class_names(names)
    assert e.value.kind == kind


def test_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be one of auto, base, novel"):
        scoring.base_mask(["a"], ["a"], "both")


def test_softmax_and_top_k_are_stable():
    probs = scoring.softmax(np.array([[1000.0, 1000.0, -5.0]]))
    np.testing.assert_allclose(probs.sum(), 1.0)
    top = scoring.top_k(probs, ["x", "y", "z"], 5)
    assert [t["class_name"] for t in top[0]["top"]] == ["x", "y", "z"] and top[0]["label"] == "x"
    with pytest.raises(ValueError, match="top_k"):
        scoring.top_k(probs, ["x", "y", "z"], True)


def test_scoring_and_manifest_import_no_torch():
    code = "import sys, exports.scoring, exports.manifest, exports.text_cache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_schema_1_manifest_reads_as_one_head(exported):
    from exports.manifest import load_artifact, read_manifest

    _, art = exported("coop")
    path = art / "manifest.json"
    data = json.loads(path.read_text())
    v1 = {**data, "schema_version": 1}
    v1.pop("heads")
    v1["graphs"] = {k: g for k, g in v1["graphs"].items() if g is not None}  # no score graph in schema 1
    for g in v1["graphs"].values():
        g["output_name"] = g.pop("outputs")[0]
        g.pop("extra_image_inputs", None)
    original = path.read_text()
    try:
        path.write_text(json.dumps(v1))
        m = read_manifest(art)
        assert m.schema_version == 2 and [h.model_dump() for h in m.heads] == [
            {"image": "image_embeddings", "text": "class_embeddings", "base_weight": 1.0, "novel_weight": 1.0}]
        assert m.graphs.text.outputs == ["class_embeddings"]
        load_artifact(art)  # the files still match
    finally:
        path.write_text(original)


def test_predict_refuses_names_the_service_refuses(exported, tmp_path):
    # one check of class names: ["a", "A"] is a duplicate for predict as for the service
    from training.cli import main

    _, art = exported("coop")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    assert main(["predict", "--artifact", str(art), "--class-names", '["a", "A"]', str(img)]) == 2


def test_predict_takes_descriptions_for_methods_that_embed_them(exported, tmp_path, capsys):
    from PIL import Image

    from conftest import descriptions_for
    from training.cli import main

    _, art = exported("cupl")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(img)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), "--class-names", '["red", "lime"]', str(img)]) == 2
    assert "no descriptions for 1 class name(s): 'lime'" in capsys.readouterr().err  # red is shipped, lime is not
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps(descriptions_for(["lime"])))
    assert main(["predict", "--artifact", str(art), "--class-names", '["red", "lime"]', "--descriptions", str(desc),
                 str(img)]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] in ("red", "lime")


def test_description_templates_put_the_name_in_and_are_checked():
    from exports.prompts import check_description_template, prompt_rows

    rows = prompt_rows(["a photo of a {}."], ["cat", "dog"], {"cat": ["small", "furry"], "dog": ["loyal"]},
                       "a photo of a {name}, {description}")
    assert rows == [["a photo of a cat.", "a photo of a dog."], ["a photo of a cat, small", "a photo of a dog, loyal"],
                    ["a photo of a cat, furry", ""]]
    assert prompt_rows([], ["cat"], {"cat": ["a cat."]}) == [["a cat."]]  # default: the sentence itself (CuPL)
    for bad in ("{name}", "{description} {description}", "{description} {other}", "{name} {name} {description}"):
        with pytest.raises(ValueError, match="description template"):
            check_description_template(bad)
