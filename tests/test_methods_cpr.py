"""CPR: the prototype-attention head, list-dependent logits, visual and CuPL prototypes, the loss."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.data.transforms import build_eval_transform, build_train_transform
from training.methods import create_method
from training.prompts.knowledge import frozen_text_features

CLASSES = ["red", "green", "blue"]
DESCRIPTIONS = {"red": ["red, a warm colour", "red, like fire"], "green": ["green, like grass"],
                "blue": ["blue, like the sky"]}


class _Images(torch.utils.data.Dataset):
    """Labelled random pictures through a transform, as SampleDataset serves them."""

    def __init__(self, transform, labels):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in labels]
        self.labels, self.transform = list(labels), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def _make(backbone, **options):
    torch.manual_seed(0)
    m = create_method("cpr", copy.deepcopy(backbone), options or None, CLASSES)
    m.use_descriptions(DESCRIPTIONS)
    return m


def _started(backbone, **options):
    m = _make(backbone, **options)
    data = _Images(build_train_transform(m.backbone.preprocess, 0.5), [0, 1, 2, 0, 1, 2])
    m.on_train_start(data)
    return m, data


def test_head_init_and_the_rectified_logits(tiny_backbone):
    m, _ = _started(tiny_backbone)
    d = m.backbone.embed_dim
    for layer in (m.head.q, m.head.k, m.head.v):
        assert abs(float(layer.weight.std()) - math.sqrt(2 / d)) < 0.2 * math.sqrt(2 / d)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.tokenize(CLASSES)
    with torch.no_grad():
        f = F.normalize(m.clip.visual(x), dim=-1)
        t = F.normalize(m.encode_text(tokens[0]), dim=-1)

        def attend(keys):
            a = torch.softmax(m.head.q(f) @ m.head.k(keys).t() / math.sqrt(d), dim=-1) @ m.head.v(keys)
            return m.head.norm(m.head.out(a) + m.head.proj(f))

        e = F.normalize(t.unsqueeze(0) + (attend(m.visual_prototypes) + attend(t)).unsqueeze(1), dim=-1)
        want = m.logit_scale() * torch.einsum("bcd,bd->bc", e, f)
        torch.testing.assert_close(m(x, tokens), want, rtol=1e-5, atol=1e-5)


def test_a_class_logit_depends_on_the_other_names_of_the_request(tiny_backbone):
    m, _ = _started(tiny_backbone)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        three = m(x, m.tokenize(CLASSES))
        two = m(x, m.tokenize(CLASSES[:2]))
    assert not torch.allclose(three[:, :2], two)
    assert m.graph_signature().whole_class_list


def test_visual_prototypes_are_class_means_of_the_cache_keys_and_survive_a_resume(tiny_backbone):
    m, data = _started(tiny_backbone, prototype_views=3)
    assert m.visual_prototypes.shape == (3, m.backbone.embed_dim)
    # each prototype is a mean of unit keys (not re-normalised): shorter than 1
    norms = m.visual_prototypes.norm(dim=-1)
    assert bool(((norms > 0.5) & (norms <= 1.0 + 1e-6)).all())
    # with a fixed transform a key is the image's normalised feature, and a prototype its class's mean of them
    exact = _make(tiny_backbone, prototype_views=3)
    fixed = _Images(build_eval_transform(exact.backbone.preprocess), [0, 1, 2, 0, 1, 2])
    exact.on_train_start(fixed)
    with torch.no_grad():
        plain = F.normalize(exact.clip.visual(torch.stack([fixed[i][0] for i in range(6)])), dim=-1)
    torch.testing.assert_close(exact.visual_prototypes, (plain[:3] + plain[3:]) / 2)
    # the reference's order: a slot averages the i-th image of every pass's shuffle, so classes mix
    torch.manual_seed(0)
    mixed = _make(tiny_backbone, prototype_views=3, reference_cache_order=True)
    mixed.on_train_start(fixed)
    assert not torch.allclose(mixed.visual_prototypes, exact.visual_prototypes)
    state, learned = m.training_state(), {k: v.clone() for k, v in m.learned_state().items()}
    fresh = _make(tiny_backbone)
    fresh.load_learned_state(learned)
    fresh.load_training_state(state)
    fresh.on_train_start(data)  # a resumed run keeps the checkpoint's prototypes
    assert torch.equal(fresh.visual_prototypes, m.visual_prototypes)
    # novel names are served with the base prototypes
    fresh.eval()
    with torch.no_grad():
        assert fresh(torch.randn(1, 3, 32, 32), fresh.tokenize(["purple", "orange", "teal", "grey"])).shape == (1, 4)


def test_loss_is_cross_entropy_plus_eight_times_the_distance_to_the_cupl_prototypes(tiny_backbone):
    m, _ = _started(tiny_backbone)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    tokens = m.tokenize(CLASSES)
    m.train()
    with torch.no_grad():
        loss, logits = m.compute_loss(x, y, tokens)
        cupl = torch.stack([F.normalize(frozen_text_features(m, m.backbone.tokenizer(
            [f"a photo of a {c}.", *DESCRIPTIONS[c]])).mean(0), dim=-1) for c in CLASSES])
        f = F.normalize(m.clip.visual(x), dim=-1)
        e = m.rectified(f, m.class_embeddings(tokens))
        want = F.cross_entropy(logits, y) + 8 * (1 - F.cosine_similarity(e, cupl.unsqueeze(0), dim=-1).mean())
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
        # cached image features give the same step
        feats_loss, _ = m.compute_loss(m.clip.visual(x), y, tokens, are_features=True)
        torch.testing.assert_close(feats_loss, loss, rtol=1e-5, atol=1e-5)
    lacking = _make(tiny_backbone)
    lacking.use_descriptions({"red": ["red"]})
    with pytest.raises(ValueError, match="green"):
        lacking.cupl_prototypes(torch.device("cpu"))


def test_whole_class_list_is_only_for_score_graphs():
    from training.protocol import GraphSignature

    with pytest.raises(ValueError, match="scored"):
        GraphSignature(whole_class_list=True)
