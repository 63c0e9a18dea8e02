"""TAP: the attribute layout, expert tokens, vision-conditional pooling, phases, subsampling and GPA."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exports.prompts import DescriptionLayout, MissingDescriptionError, prompt_rows
from training.methods import create_method, get_method
from training.methods.tap import CLS_TEMPLATES, PoolingHead, derived_layout, gaussian_weights
from training.protocol import Stage

CLASSES = ["red", "green", "blue", "yellow"]
TREES = {
    "red": {"hue": ["red, warm.", "red, like fire.", "red, like blood."], "shape": ["red, round."]},
    "green": {"hue": ["green, like grass."], "shape": ["green, square."]},
    "blue": {"hue": ["blue, like the sky.", "blue, cold."]},
    "yellow": {"hue": ["yellow, like the sun."], "shape": ["yellow, tall."], "smell": ["yellow, lemon."]},
}


def _make(backbone, **options):
    torch.manual_seed(0)
    cfg = {"attributes": ("hue", "shape"), "rows_per_attribute": (2, 1), **options}
    return create_method("tap", copy.deepcopy(backbone), cfg, CLASSES)


def test_layout_from_the_training_trees(tiny_backbone):
    # attributes at least half of the classes have, first-seen order; counts cut at the quantile
    assert derived_layout(TREES, (), 1.0) == (("hue", "shape"), (3, 1))
    assert derived_layout(TREES, (), 0.5) == (("hue", "shape"), (int(np.quantile([3, 1, 2, 1], 0.5)), 1))
    assert derived_layout(TREES, ("smell",), 1.0) == (("smell",), (1,))
    with pytest.raises(ValueError, match="attribute trees"):
        derived_layout({"red": ["a sentence."]}, (), 1.0)
    spec = get_method("tap")
    derived = spec.method_cls.options_for_descriptions(spec.config_cls(), TREES)
    assert derived == {"attributes": ("hue", "shape"), "rows_per_attribute": (3, 1)}
    with pytest.raises(ValueError, match="fixed set of attributes"):
        create_method("tap", tiny_backbone, None, CLASSES)


def test_rows_cut_pad_and_fall_back_to_the_name():
    layout = DescriptionLayout(("hue", "shape"), (2, 1))
    rows = prompt_rows(["T {}."], CLASSES, TREES, "a photo of a {description}", layout)
    per_class = {c: [r[i] for r in rows] for i, c in enumerate(CLASSES)}
    assert per_class["red"] == ["T red.", "a photo of a red, warm.", "a photo of a red, like fire.", "a photo of a red, round."]
    assert per_class["green"] == ["T green.", "a photo of a green, like grass.", "", "a photo of a green, square."]
    # blue has no shape: its name stands in; yellow's "smell" is not in the layout
    assert per_class["blue"][-1] == "a photo of a blue."
    # a tree with none of the layout's attributes (a minority class of the training file): its name everywhere
    only_other = prompt_rows(["T {}."], ["yellow"], {"yellow": {"colour": ["x."]}}, "{description}", layout)
    assert [r[0] for r in only_other] == ["T yellow.", "yellow.", "", "yellow."]
    with pytest.raises(MissingDescriptionError):
        prompt_rows(["T {}."], ["yellow"], {"yellow": {"hue": []}}, "{description}", layout)
    with pytest.raises(ValueError, match="blank sentence"):
        prompt_rows(["T {}."], ["yellow"], {"yellow": {"hue": [" "]}}, "{description}", layout)
    # sentence methods keep an empty description a prompt (only a tree's padding is empty)
    assert prompt_rows([], ["cat"], {"cat": [""]}, "a photo of a {name}, {description}") == [["a photo of a cat, "]]
    with pytest.raises(ValueError, match="attribute tree per class"):
        prompt_rows(["T {}."], ["red"], {"red": ["a sentence."]}, "{description}", layout)
    with pytest.raises(ValueError, match="not an attribute tree"):
        prompt_rows(["T {}."], ["red"], {"red": {"hue": ["x."]}}, "{description}")


def test_prompts_start_with_the_context_words_and_padding_rows_are_zero(tiny_backbone):
    m = _make(tiny_backbone)
    assert m.prompt_templates()[0] == "a photo of a itap of a {}." and len(m.prompt_templates()) == len(CLS_TEMPLATES)
    tokens = m.tokenize(CLASSES, {k: {a: v for a, v in t.items() if a != "smell"} for k, t in TREES.items()})
    assert tokens.shape[:2] == (len(CLS_TEMPLATES) + 3, 4)
    n_ctx = m.ctx.shape[0]
    real = tokens[..., 1] != tiny_backbone.eot_token_id
    start = tiny_backbone.tokenizer(["a photo of a"])[0, 1 : 1 + n_ctx]
    assert torch.equal(tokens[real][:, 1 : 1 + n_ctx], start.expand(int(real.sum()), -1))
    with torch.no_grad():
        rows = m.text_outputs(tokens)["description_features"]  # [C, R, D]
        # with the context at its initial words the rows are the frozen CLIP's features of the prompts
        full = tiny_backbone.tokenizer([f"a photo of a {t.format(c)}" for t in CLS_TEMPLATES[:1] for c in CLASSES])
        plain = F.normalize(tiny_backbone.model.encode_text(full), dim=-1)
    assert rows.shape[:2] == (4, tokens.shape[0])
    assert torch.equal(rows.norm(dim=-1) > 0, real.t())  # green's second hue row is padding
    assert torch.allclose(rows[:, 0], plain, atol=1e-5)


def test_expert_tokens_change_the_class_token_and_deep_prompts_add(tiny_backbone):
    m = _make(tiny_backbone).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g, e = m.image_features(x)
        frozen = tiny_backbone.model.visual(x)
        assert e.shape == (2, 2, tiny_backbone.embed_dim)
        assert not torch.allclose(g, frozen, atol=1e-4)  # no mask: the class token attends to the experts
        m.deep_experts.normal_()  # added, not replacing: zero deep prompts are the shallow experts alone
        g2, _ = m.image_features(x)
        assert not torch.allclose(g, g2)
        m.deep_experts.zero_()
        assert torch.allclose(m.image_features(x)[0], g)
    assert m.deep_experts.shape[0] == len(tiny_backbone.model.visual.transformer.resblocks) - 1
    assert _make(tiny_backbone, deep=False).deep_experts.shape[0] == 0


def test_pooling_is_a_masked_attention_over_normalised_rows():
    head = PoolingHead(4)
    rows = F.normalize(torch.randn(3, 5, 4), dim=-1)
    real = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        head.q.weight.zero_()  # zero queries: uniform weights over the real rows
        pooled = head(F.normalize(torch.randn(2, 4), dim=-1), rows, real)
    for c in range(3):
        want = F.normalize(rows[c][real[c]].mean(dim=0), dim=-1)
        assert torch.allclose(pooled[:, c], want.expand(2, -1), atol=1e-6)
    # scores scale by 1/sqrt(D): a query aligned with one key's projection weighs it more
    torch.manual_seed(0)
    head = PoolingHead(4)
    q = F.normalize(torch.randn(1, 4), dim=-1)
    scores = torch.einsum("bd,ckd->bck", head.q(q), head.k(rows)) / 2.0
    a = scores.masked_fill(~real, torch.finfo(scores.dtype).min).softmax(-1)
    assert torch.allclose(head(q, rows, real), F.normalize(torch.einsum("bck,ckd->bcd", a, rows), dim=-1), atol=1e-6)


def test_logits_fuse_the_cls_bag_and_the_attributes(tiny_backbone):
    m = _make(tiny_backbone).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = m.tokenize(CLASSES, TREES)
    with torch.no_grad():
        out = m.image_outputs(x)
        heads = m.head_logits(out["image_embeddings"], out["attribute_embeddings"], m.text_outputs(tokens)["description_features"])
        fused = m(x, tokens)
    assert heads.shape == (3, 3, 4)  # two attributes, then the cls bag
    assert torch.allclose(fused, 0.4 * heads[2] + 0.3 * (heads[0] + heads[1]), atol=1e-5)


def test_phases_train_their_own_tensors(tiny_backbone):
    m = _make(tiny_backbone)
    tokens = m.tokenize(CLASSES, TREES)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for track in ("vision", "text"):
        m.begin_stage(Stage(track, 0.5, track=track))
        m.zero_grad(set_to_none=True)
        loss, logits = m.compute_loss(x, y, tokens)
        loss.backward()
        has_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if track == "vision":  # experts, deep prompts and pooling heads; not the context (its features are cached)
            assert "experts" in has_grad and "poolings.0.q.weight" in has_grad and "ctx" not in has_grad
        else:  # the context only, through the frozen pooling heads
            assert has_grad == {"ctx"}
        assert logits.shape == (4, 4) and not any(n.startswith("clip.") for n in has_grad)
    assert m.param_groups()[0]["params"] == [m.ctx]


def test_text_steps_score_a_subset_of_many_classes(tiny_backbone):
    names = [f"class {i}" for i in range(10)]
    torch.manual_seed(0)
    m = create_method("tap", copy.deepcopy(tiny_backbone), {"attributes": ("hue",), "rows_per_attribute": (1,),
                                                             "max_text_classes": 4}, names)
    tokens = m.tokenize(names, {n: {"hue": [f"{n}, a hue."]} for n in names})
    m.begin_stage(Stage("text", 0.5, track="text"))
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([7, 2, 7])
    loss, logits = m.compute_loss(x, y, tokens)
    scored = logits[0] > torch.finfo(logits.dtype).min
    assert torch.isfinite(loss) and int(scored.sum()) == 4 and bool(scored[7]) and bool(scored[2])
    assert torch.equal(scored, (logits > torch.finfo(logits.dtype).min).all(dim=0))
    m.begin_stage(Stage("vision", 0.5, track="vision"))  # vision steps score every class
    assert bool((m.compute_loss(x, y, tokens)[1] > torch.finfo(logits.dtype).min).all())


def test_gpa_weights_match_the_reference_and_load_at_each_tracks_last_epoch(tiny_backbone):
    # the reference's text weights over 10 epochs, N(9, 2) normalised (rounded to 3 places)
    want = [0.000, 0.001, 0.003, 0.011, 0.035, 0.083, 0.156, 0.227, 0.257, 0.227]
    assert [round(w, 3) for w in gaussian_weights(10, 0.9, 0.2)] == want
    assert math.isclose(sum(gaussian_weights(50, 0.9, 0.2)), 1.0)
    m = _make(tiny_backbone, cycles=2, vision_epochs=2, text_epochs=1)  # V V T V V T over 6 epochs
    seen = {"ctx": [], "experts": []}
    for epoch in range(1, 7):
        with torch.no_grad():
            m.ctx.fill_(float(epoch))
            m.experts.fill_(float(epoch))
        seen["ctx"].append(epoch)
        m.on_epoch_end(epoch, 6)
        if epoch == 5:  # the vision track's last epoch (vision epochs 1, 2, 4, 5): its average is loaded
            w = gaussian_weights(4, 0.9, 0.2)
            assert torch.allclose(m.experts, torch.full_like(m.experts, sum(wi * e for wi, e in zip(w, [1, 2, 4, 5]))))
    w = gaussian_weights(2, 0.9, 0.2)
    assert torch.allclose(m.ctx, torch.full_like(m.ctx, w[0] * 3 + w[1] * 6))  # text epochs 3 and 6
    state = m.training_state()
    assert {k.split("/")[0] for k in state} == {"gpa_vision", "gpa_text"}
    other = _make(tiny_backbone, cycles=2, vision_epochs=2, text_epochs=1)
    other.load_training_state(state)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_training_state({"other/x": torch.zeros(1)})


def test_reference_options_per_dataset_and_for_short_runs():
    cls = get_method("tap").method_cls
    assert cls.options_for_dataset("coop:dtd:/data") == {"kl_template": "{} texture.", "max_len_quantile": 1.0,
                                                         "text_lr_scale": 0.5, "vision_lr_scale": 1.5, "u3": 3.0}
    assert cls.options_for_dataset("emoji-nature") == {}
    cfg = get_method("tap").config_cls()
    from training.protocol import stage_plan

    assert cls.options_for_epochs(cfg, 60) == {}
    assert cls.options_for_epochs(cfg, 6) == {"cycles": 1}
    assert cls.options_for_epochs(cfg, 3) == {"cycles": 1, "vision_epochs": 2}
    with pytest.raises(ValueError, match="at least 2 epochs"):
        cls.options_for_epochs(cfg, 1)
    from training.methods.tap import tap_stages

    for epochs in range(2, 130):  # every run length gets a plan that gives each phase an epoch
        c = get_method("tap").config_cls.from_dict({**cfg.to_dict(), **cls.options_for_epochs(cfg, epochs)})
        stage_plan(epochs, tap_stages(c.vision_epochs, c.text_epochs, c.cycles))
    m_stages = [Stage(f"v{i}", 5 / 18, track="vision") if i % 2 == 0 else Stage(f"t{i}", 1 / 18, track="text")
                for i in range(6)]
    assert [p.epochs for p in stage_plan(20, m_stages)] == [6, 1, 5, 1, 6, 1]  # cumulative rounding


def test_served_tap_reads_trees_and_refuses_sentences(exported, colour_root, monkeypatch, tmp_path, capsys,
                                                       fresh_http_metrics, restore_pillow_settings):
    import json

    from PIL import Image
    from starlette.testclient import TestClient

    from exports.manifest import load_artifact
    from exports.runtime import Predictor
    from service.service import PromptbakeService
    from training.cli import main

    _, art = exported("tap")
    manifest = load_artifact(art)
    assert manifest.description_layout.attributes == ["channels", "value"]  # from the colour trees (conftest)
    assert set(manifest.class_descriptions["red"]) == {"channels", "value"}  # the artifact ships trees
    predictor = Predictor(art)
    image = Image.open(sorted((colour_root / "test").rglob("*.png"))[0]).convert("RGB")
    tree = {"lime": {"value": ["lime, the colour 190 230 50."], "taste": ["sour."]}}  # "taste": not read, ignored
    with_taste = predictor.logits([image], ["red", "lime"], descriptions=tree)
    without = predictor.logits([image], ["red", "lime"], descriptions={"lime": {"value": tree["lime"]["value"]}})
    assert np.allclose(with_taste, without)
    with pytest.raises(ValueError, match="attribute tree per class"):
        predictor.logits([image], ["red", "lime"], descriptions={"lime": ["lime, a colour."]})
    with pytest.raises(ValueError, match="none of its attributes"):
        predictor.logits([image], ["red", "lime"], descriptions={"lime": {"taste": ["sour."]}})

    desc = tmp_path / "trees.json"  # predict takes a tree file
    desc.write_text(json.dumps(tree))
    img = tmp_path / "x.png"
    image.save(img)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), "--class-names", '["red", "lime"]', "--descriptions", str(desc),
                 str(img)]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["label"] in ("red", "lime")

    monkeypatch.setenv("PROMPTBAKE_ARTIFACT", str(art))
    with TestClient(PromptbakeService.to_asgi()) as client:
        assert client.get("/readyz").status_code == 200  # the readiness probe sends a tree
        assert client.post("/info", json={}).json()["artifact"]["description_attributes"] == ["channels", "value"]
        files = [("images", ("x.png", img.read_bytes(), "image/png"))]
        r = client.post("/classify", files=files, data={"class_names": json.dumps(["red", "lime"]),
                                                        "descriptions": json.dumps({"lime": ["lime, a colour."]})})
        assert r.status_code == 400 and r.json()["error"]["kind"] == "descriptions", r.text
        assert "attribute tree" in r.json()["error"]["message"]
        r = client.post("/classify", files=files, data={"class_names": json.dumps(["red", "lime"]),
                                                        "descriptions": json.dumps(tree)})
        assert r.status_code == 200, r.text


def test_a_run_too_short_to_alternate_fails_before_run_json(colour_spec, tmp_path, capsys):
    from training.cli import main

    attributes = colour_spec.removeprefix("folder:") + "/attributes.json"
    args = ["train", "--method", "tap", "--backbone", "test-tiny", "--dataset", colour_spec, "--shots", "1",
            "--descriptions", attributes, "--no-progress", "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one"), "--epochs", "1"]) == 2
    assert "at least 2 epochs" in capsys.readouterr().err and not (tmp_path / "one").exists()
    # cycles given by the caller win over the fitted ones: a plan the epochs cannot hold is refused up front
    assert main([*args, "--out", str(tmp_path / "three"), "--epochs", "3", "--cycles", "3"]) == 2
    assert "gets no epoch" in capsys.readouterr().err and not (tmp_path / "three").exists()


def test_a_killed_run_resumes_to_the_same_tensors(tiny_backbone, colour_root, tmp_path):
    """Both tracks' optimizers and GPA sums, and the phase, come back from the checkpoint: a run killed in
    its second vision phase ends with the tensors of an uninterrupted one (the reference keeps neither)."""
    from conftest import KillAt, KilledRun, colour_attributes
    from training.data import SampleDataset, build_train_transform, load_dataset, sample_few_shot, split_base_novel
    from training.loop import TrainConfig, train
    from training.runs import RunDir

    base, _ = split_base_novel(load_dataset(f"folder:{colour_root}"))
    trees = {k: v for k, v in colour_attributes().items() if k in base.classnames}

    def setup(seed):
        torch.manual_seed(seed)
        m = create_method("tap", copy.deepcopy(tiny_backbone), {"attributes": ("channels", "value"),
                                                                 "rows_per_attribute": (1, 1), "cycles": 2,
                                                                 "vision_epochs": 2, "text_epochs": 1}, base.classnames)
        ds = SampleDataset(sample_few_shot(base.train, 4, 1), build_train_transform(tiny_backbone.preprocess))
        return m, ds, m.tokenize(base.classnames, trees)

    cfg = TrainConfig(epochs=6, batch_size=4, lr=0.01, optimizer="adamw")  # V V T V V T
    m, ds, tokens = setup(0)
    full = train(m, ds, tokens, cfg, RunDir(tmp_path / "full"), seed=1, progress=False)
    m2, ds2, _ = setup(0)
    with pytest.raises(KilledRun):  # dies in epoch 4: the second vision phase, after a text phase
        train(m2, KillAt(ds2, 3 * len(ds2) + 2), tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    m3, ds3, _ = setup(7)  # another init: everything must come from the checkpoint
    resumed = train(m3, ds3, tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    assert set(full) == set(resumed)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
