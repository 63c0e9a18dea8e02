"""Every registered method end to end, the way a user drives it: ``promptbake train`` ->
``promptbake eval`` -> ``promptbake export`` (parity checked) -> ``promptbake verify`` -> served by the
BentoML service over HTTP (its ASGI app with a test client) with the same answers as the runtime.

Training and export happen once per session (the ``exported`` fixture in conftest, shared with
tests/test_export.py, which checks the graphs against torch in detail).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import descriptions_for, kind_of
from training.methods import get_method, list_methods

METHODS = [spec.name for spec in list_methods()]
NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
UNSEEN = ["crimson", "navy blue", "lime"]  # names the methods never saw


pytestmark = pytest.mark.usefixtures("restore_pillow_settings")  # the service hardens Pillow process-wide (conftest)


def test_all_ten_methods_are_registered():
    # the ten: zero-shot, CoOp and the eight baselines; a dropped registration fails here
    assert set(METHODS) >= {"zeroshot", "coop", "cocoop", "kgcoop", "prograd", "tcp", "vpt", "ivlp", "maple", "promptsrc"}


@pytest.mark.parametrize("name", METHODS)
def test_train_eval_export_verify_serve(name, exported, colour_root, capsys, monkeypatch, fresh_http_metrics):
    from starlette.testclient import TestClient

    from exports.manifest import load_artifact
    from exports.runtime import Predictor
    from service.service import PromptbakeService
    from training.cli import main

    run, art = exported(name)
    assert isinstance(art, Path), f"promptbake export failed for {name}: {art}"

    # eval: base / novel / HM written next to the run
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("base_acc", "novel_acc", "hm"):
        assert 0.0 <= metrics[key] <= 100.0, metrics
    assert name in capsys.readouterr().out

    # export kept parity; verify re-checks every file's hash
    manifest = load_artifact(art)
    assert manifest.method == name and manifest.parity.top1_agreement == 1.0
    assert main(["verify", str(art)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {art}: {name}")

    # served: the HTTP answers equal the runtime's, for trained and never-seen names
    monkeypatch.setenv("PROMPTBAKE_ARTIFACT", str(art))
    paths = sorted((colour_root / "test").rglob("*.png"))[::2]
    names = NAMES + UNSEEN
    predictor = Predictor(art)
    images = [Image.open(p).convert("RGB") for p in paths]
    # methods that embed classes from descriptions: the artifact ships the trained dataset's, the request the rest
    unseen = descriptions_for(UNSEEN, kind_of(manifest)) if manifest.capabilities.needs_class_descriptions else None
    want = predictor.classify(images, names, top_k=3, descriptions=unseen)
    with TestClient(PromptbakeService.to_asgi()) as client:
        assert client.get("/readyz").status_code == 200
        form = {"class_names": json.dumps(names), "top_k": "3", **({"descriptions": json.dumps(unseen)} if unseen else {})}
        r = client.post("/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                        data=form)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["artifact"]["method"] == name
        got = body["predictions"]
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want):
            assert [t["class_name"] for t in g["top"]] == [t["class_name"] for t in w["top"]]
            assert np.allclose([t["score"] for t in g["top"]], [t["score"] for t in w["top"]], atol=1e-5)

        r = client.post("/embed_image", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths[:3]])
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["embeddings"]) - predictor.embed_images(images[:3])).max() <= 1e-5

        r = client.post("/embed_text", json={"texts": names, "descriptions": unseen})
        if manifest.capabilities.text_depends_on_image:  # CoCoOp: no image-independent text embeddings
            assert r.status_code == 400 and r.json()["error"]["kind"] == "text_depends_on_image", r.text
        else:
            assert r.status_code == 200, r.text
            assert np.abs(np.array(r.json()["embeddings"]) - predictor.embed_texts(names, unseen)).max() <= 1e-5
        if unseen:  # a name the artifact ships no descriptions for, sent without any: the clear 400
            r = client.post("/classify", files=[("images", (paths[0].name, paths[0].read_bytes(), "image/png"))],
                            data={"class_names": json.dumps(NAMES[:2] + ["lime"])})
            assert r.status_code == 400 and r.json()["error"]["kind"] == "descriptions_missing", r.text
            assert "'lime'" in r.json()["error"]["message"]


SWITCH_METHODS = [n for n in METHODS if get_method(n).method_cls.capabilities_for(get_method(n).config_cls()).base_novel_switch]


def test_some_method_has_a_base_novel_switch():
    assert "mmrl" in SWITCH_METHODS


@pytest.mark.parametrize("name", SWITCH_METHODS)
def test_base_and_new_names_are_scored_by_their_heads_over_http(name, exported, colour_root, monkeypatch,
                                                                fresh_http_metrics):
    """The trained names use the base heads and new names the novel heads (``mode=auto``), over HTTP as in the
    runtime; forcing ``base`` or ``novel`` changes the trained names' scores, so the two heads really differ."""
    from starlette.testclient import TestClient

    from exports.runtime import Predictor
    from service.service import PromptbakeService

    run, art = exported(name)
    predictor = Predictor(art)
    base = list(predictor.manifest.base_classnames)
    assert base and set(base) < set(NAMES)
    names = base + UNSEEN
    paths = sorted((colour_root / "test").rglob("*.png"))[::3]
    images = [Image.open(p).convert("RGB") for p in paths]
    logits = {mode: predictor.logits(images, names, mode) for mode in ("auto", "base", "novel")}
    nb = len(base)
    np.testing.assert_allclose(logits["auto"][:, :nb], logits["base"][:, :nb])  # trained names: base heads
    np.testing.assert_allclose(logits["auto"][:, nb:], logits["novel"][:, nb:])  # new names: novel heads
    assert np.abs(logits["base"] - logits["novel"]).max() > 1e-3  # the heads differ

    monkeypatch.setenv("PROMPTBAKE_ARTIFACT", str(art))
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    with TestClient(PromptbakeService.to_asgi()) as client:
        for mode in ("auto", "base", "novel"):
            r = client.post("/classify", files=files, data={"class_names": json.dumps(names), "top_k": str(len(names)),
                                                            "mode": mode})
            assert r.status_code == 200, r.text
            want = predictor.classify(images, names, top_k=len(names), mode=mode)
            for g, w in zip(r.json()["predictions"], want):
                got = {t["class_name"]: t["score"] for t in g["top"]}
                assert np.allclose([got[t["class_name"]] for t in w["top"]], [t["score"] for t in w["top"]], atol=1e-6)
        r = client.post("/classify", files=files[:1], data={"class_names": json.dumps(names), "mode": "both"})
        assert r.status_code == 400 and r.json()["error"]["kind"] == "mode", r.text
