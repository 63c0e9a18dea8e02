"""TAC: k-means centres of the descriptions, cluster tokens on both towers, the patch mask, views, averaging."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data.transforms import MultiView, build_resize_transform, build_train_transform
from training.methods import create_method
from training.prompts.clustering import cosine_kmeans

CLASSES = ["red", "green", "blue", "yellow"]
DESCRIPTIONS = {"red": ["red, a warm colour", "red, like fire"], "green": ["green, like grass"],
                "blue": ["blue, like the sky", "blue, cold"], "yellow": ["yellow, like the sun"]}


def _make(backbone, **options):
    torch.manual_seed(0)
    m = create_method("tac", copy.deepcopy(backbone), {"n_clusters": 2, **options}, CLASSES)
    m.use_descriptions(DESCRIPTIONS)
    return m


def _batch(m, n=2):
    pre = m.backbone.preprocess
    transform = m.train_transform(build_train_transform(pre, 0.4), pre)
    rng = np.random.default_rng(0)
    return torch.stack([transform(Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))) for _ in range(n)])


def test_cosine_kmeans_finds_separated_directions_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(3)
    x = torch.cat([a + 0.05 * torch.randn(20, 3, generator=g) for a in axes])
    centres, assign = cosine_kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    # each true cluster is one assignment, and its centre points along its axis
    for i in range(3):
        labels = assign[20 * i: 20 * (i + 1)]
        assert (labels == labels[0]).all()
        assert F.cosine_similarity(centres[labels[0]], axes[i], dim=0) > 0.99
    again, _ = cosine_kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(centres, again)
    with pytest.raises(ValueError, match="k must be <="):
        cosine_kmeans(x[:2], 3)


def test_centres_come_from_the_descriptions_at_train_start_and_survive_a_resume(tiny_backbone):
    m = _make(tiny_backbone)
    assert torch.equal(m.centres, torch.zeros_like(m.centres)) and "centres" in m.learned_state()
    m.on_train_start(None)
    teacher = m.description_embeddings(torch.device("cpu"))
    # each centre is a normalised mean of teacher rows (what cosine k-means leaves)
    assert torch.allclose(m.centres.norm(dim=-1), torch.ones(2))
    sims = m.centres @ teacher.t()
    assert (sims.max(dim=1).values > 0.5).all()
    # a resumed run keeps the checkpoint's centres instead of clustering again
    state, learned = m.training_state(), {k: v.clone() for k, v in m.learned_state().items()}
    fresh = _make(tiny_backbone, ctx_init="")
    fresh.load_learned_state(learned)
    fresh.load_training_state(state)
    torch.manual_seed(123)
    fresh.on_train_start(None)
    assert torch.equal(fresh.centres, m.centres)
    # training needs every training class's descriptions
    lacking = _make(tiny_backbone)
    lacking.use_descriptions({k: v for k, v in DESCRIPTIONS.items() if k != "blue"})
    with pytest.raises(ValueError, match="blue"):
        lacking.on_train_start(None)


def test_the_teacher_is_the_normalised_mean_of_unnormalised_description_features(tiny_backbone):
    m = _make(tiny_backbone)
    with torch.no_grad():
        want = torch.stack([F.normalize(m.clip.encode_text(m.backbone.tokenizer(DESCRIPTIONS[c])).mean(0), dim=-1)
                            for c in CLASSES])
    torch.testing.assert_close(m.description_embeddings(torch.device("cpu")), want, rtol=1e-5, atol=1e-5)


def test_text_prompt_is_cluster_tokens_then_context_then_the_whole_handcrafted_prompt(tiny_backbone):
    m = _make(tiny_backbone)
    tokens = m.tokenize(["red"])[0]
    bb = m.backbone
    words = bb.tokenizer(["a photo of a red."])[0]
    n = m.centres.shape[0] + m.config.n_ctx_text
    eot = int((words == bb.eot_token_id).nonzero()[0])
    assert torch.equal(tokens[0, 1 + n: 1 + n + eot], words[1: 1 + eot])
    # the context starts as positions 1..5 of "a photo of a": its four words and the end of text
    phrase = bb.tokenizer(["a photo of a"])[0]
    assert int(phrase[5]) == bb.eot_token_id
    torch.testing.assert_close(m.ctx.detach(), m.clip.token_embedding(phrase[1:6]))
    # the cluster tokens lead every layer's text prompts: moving the centres moves the class embeddings
    with torch.no_grad():
        before = m.class_embeddings(m.tokenize(CLASSES))
        m.centres.copy_(F.normalize(torch.randn_like(m.centres), dim=-1))
        assert not torch.allclose(m.class_embeddings(m.tokenize(CLASSES)), before)
        ct = m.project_text(m.centres)
        ctx, deep = m.text_prompts()
        assert all(torch.equal(p[: len(ct)], ct) for p in [ctx, *deep])


def test_patch_tokens_do_not_attend_to_the_cluster_tokens(tiny_backbone):
    m = _make(tiny_backbone).eval()
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hook = m.clip.visual.transformer.resblocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.detach()))
    with torch.no_grad():
        m.encode_image(x)
        m.project_vision.bias.add_(torch.randn_like(m.project_vision.bias))  # other cluster tokens
        m.encode_image(x)
    hook.remove()
    grid = m.clip.visual.grid_size[0] * m.clip.visual.grid_size[1]
    a, b = seen
    torch.testing.assert_close(a[:, 1: 1 + grid], b[:, 1: 1 + grid])  # patches: untouched
    assert not torch.allclose(a[:, 0], b[:, 0])  # the class token reads them


def test_views_transform_stacks_augmentations_and_the_resized_image(tiny_backbone):
    pre = tiny_backbone.preprocess
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    torch.manual_seed(0)
    out = MultiView(build_train_transform(pre, 0.4), 4, extra=(build_resize_transform(pre),))(img)
    assert out.shape == (5, 3, 32, 32)
    assert not torch.equal(out[0], out[1])
    torch.testing.assert_close(out[4], build_resize_transform(pre)(img))


def test_loss_over_views_with_the_two_l1_terms_against_the_unaugmented_teacher(tiny_backbone):
    m = _make(tiny_backbone, dropout=0.0)
    m.on_train_start(None)
    x, y = _batch(m), torch.tensor([0, 2])
    tokens = m.tokenize(CLASSES)
    m.train()
    with torch.no_grad():
        loss, logits = m.compute_loss(x, y, tokens)
        views = x[:, :4].transpose(0, 1).reshape(8, *x.shape[2:])
        f = F.normalize(m.encode_image(views), dim=-1)
        t = m.class_embeddings(tokens)
        z = F.normalize(m.clip.visual(x[:, 4]), dim=-1).repeat(4, 1)
        full = m.logit_scale() * f @ t.t()
        want = (F.cross_entropy(full, y.repeat(4)) + 20 * F.l1_loss(t, m.description_embeddings(torch.device("cpu")))
                + 25 * F.l1_loss(f, z))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, full[:2])
    with pytest.raises(ValueError, match="views"):
        m.compute_loss(x[:, 0], y, tokens)


def test_dropout_acts_in_training_only_and_on_the_teacher_by_the_reference(tiny_backbone):
    x = torch.randn(2, 3, 32, 32)
    m = _make(tiny_backbone)
    m.train()
    with torch.no_grad():
        assert not torch.equal(m.encode_image(x), m.encode_image(x))
        m.eval()
        assert torch.equal(m.encode_image(x), m.encode_image(x))
    plain = F.normalize(m.clip.visual(x), dim=-1)
    for flag in (True, False):
        m = _make(tiny_backbone, teacher_dropout=flag).train()
        a, b = m.teacher_features(x), m.teacher_features(x)
        assert torch.equal(a, b) is not flag
        if not flag:
            torch.testing.assert_close(a, plain)


def test_the_run_keeps_the_uniform_average_of_the_epoch_ends_and_not_of_the_centres(tiny_backbone):
    m = _make(tiny_backbone)
    m.on_train_start(None)
    snapshots = []
    for epoch in range(1, 4):
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        snapshots.append({k: v.clone() for k, v in m.learned_state().items()})
        m.on_epoch_end(epoch, 3)
    centres = m.centres.clone()
    final = m.final_learned_state()
    for k in final:
        if k == "centres":
            assert torch.equal(final[k], centres)
        else:
            torch.testing.assert_close(final[k], sum(s[k] for s in snapshots) / 3)
    off = _make(tiny_backbone, average_epochs=False)
    off.on_epoch_end(1, 3)
    assert off.training_state().keys() == {"centres_ready"}
