"""The main job end to end on the tiny backbone: train, eval, export, classify novel names."""
from __future__ import annotations

import json

from training.cli import main


def test_quickstart_runs_every_step(colour_root, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--epochs", "1", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == set(result["zeroshot_metrics"]) == {"base_acc", "novel_acc", "hm"}
    assert json.loads((out / "run" / "run.json").read_text())["train"]["min_crop_scale"] == 0.5
    assert json.loads((out / "zeroshot" / "run.json").read_text())["method"] == "zeroshot"
    assert (out / "run" / "metrics.json").is_file() and (out / "artifact" / "manifest.json").is_file()
    novel = {"magenta", "red", "yellow"}
    assert result["examples"] and all(e["truth"] in novel and e["predicted"] in novel for e in result["examples"])
    assert main(["verify", str(out / "artifact")]) == 0


def test_default_served_artifact_is_the_embedded_backbone(tmp_path, monkeypatch):
    """The real thing once: emoji-vit-s exports with parity and classifies a benchmark image by name."""
    from exports.manifest import load_artifact
    from exports.runtime import Predictor
    from PIL import Image

    from training.data import load_dataset, split_base_novel
    from training.defaults import DEFAULT_ARTIFACT_NAME, DEFAULT_BACKBONE_VERSION, ensure_default_artifact

    monkeypatch.setenv("PROMPTBAKE_HOME", str(tmp_path))
    art = ensure_default_artifact()
    manifest = load_artifact(art)
    assert manifest.backbone == DEFAULT_BACKBONE_VERSION and manifest.method == "zeroshot"  # the version, not the alias
    assert art.name == f"{DEFAULT_BACKBONE_VERSION}-zeroshot"  # a new version is exported anew, never a stale cache
    assert manifest.parity.max_abs_diff_image <= 1e-4 and manifest.parity.max_abs_diff_text <= 1e-4
    stamp = (art / "manifest.json").stat().st_mtime_ns
    assert ensure_default_artifact() == art and (art / "manifest.json").stat().st_mtime_ns == stamp

    # onnxruntime through the service's runtime predicts what torch predicts on benchmark test images
    from training.evaluate import predict_samples
    from training.jobs import load_run_method

    _, novel = split_base_novel(load_dataset("emoji-nature"))
    samples = list(novel.test)[::25]  # 41 images over the novel classes
    images = []
    for s in samples:
        with Image.open(s.path) as im:
            images.append(im.convert("RGB"))
    preds = Predictor(art).classify(images, list(novel.classnames), top_k=5)
    assert all(len(p["top"]) == 5 for p in preds)
    method, _ = load_run_method(tmp_path / "artifacts" / f".{DEFAULT_ARTIFACT_NAME}-run")
    torch_labels = predict_samples(method, samples, novel.classnames).tolist()
    assert [p["label"] for p in preds] == [novel.classnames[i] for i in torch_labels]
