"""SkipT: upper halves of both towers tuned, lower blocks skipped, classes skipped, class batches."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from training.methods import create_method
from training.methods.skipt import keep_probabilities

CLASSES = [f"class {i}" for i in range(12)]


def _make(backbone, **options):
    """On a private copy of the session's backbone: SkipT's tensors are the backbone's own."""
    torch.manual_seed(0)
    return create_method("skipt", copy.deepcopy(backbone), options or None, CLASSES)


def test_tunes_the_upper_half_and_the_heads_only(tiny_backbone):
    m = _make(tiny_backbone)
    learned = set(m.learned_state())
    assert m.text_start == 1 and m.vision_start == 1  # 2-block towers: block 1 up
    assert {"clip.text_projection", "clip.visual.proj", "clip.ln_final.weight", "clip.visual.ln_post.bias"} <= learned
    assert any(k.startswith("clip.transformer.resblocks.1.") for k in learned)
    assert not any(k.startswith(("clip.transformer.resblocks.0.", "clip.visual.transformer.resblocks.0.")) for k in learned)
    assert not learned & {"clip.logit_scale", "clip.token_embedding.weight", "clip.positional_embedding",
                          "clip.visual.conv1.weight", "clip.visual.ln_pre.weight", "clip.visual.class_embedding"}
    groups = m.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.25]
    assert all(any(p is q for q in m.clip.visual.parameters()) for p in groups[1]["params"])


def test_skipping_computes_what_the_full_towers_compute(tiny_backbone):
    m = _make(tiny_backbone)
    images, tokens = torch.randn(3, 3, 32, 32), m.tokenize(CLASSES)[0]
    with torch.no_grad():
        torch.testing.assert_close(m._image_skipping_lower(images), m.clip.visual(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m._text_upper(m._text_lower_states(tokens), tokens), m.encode_text(tokens), atol=1e-5, rtol=1e-5)
    m._image_skipping_lower(images).sum().backward()
    assert all(p.grad is None for p in m.clip.visual.transformer.resblocks[0].parameters())
    assert m.clip.visual.transformer.resblocks[1].attn.in_proj_weight.grad is not None


def test_keep_probabilities_are_the_references_exponential_ranks():
    p = keep_probabilities(10, 4, 0.3)
    assert torch.equal(p[:4], torch.ones(4)) and p[4] == 1.0 and p[-1] == 0.0
    assert torch.all(p[4:-1] >= p[5:]) and abs(float(p[5]) - math.exp(-1.0 / 0.3)) < 1e-6  # linspace(0, 5, 6)[1] = 1


def test_class_wise_skipping_keeps_the_labels_and_draws_its_mask_once(tiny_backbone):
    m = _make(tiny_backbone)
    images, labels, tokens = torch.randn(4, 3, 32, 32), torch.tensor([7, 7, 7, 7]), m.tokenize(CLASSES)
    loss, logits = m.compute_loss(images, labels, tokens)
    assert m.n_top == 6 and m._keep is not None and m._keep[:6].all()
    keep = m._keep.clone()
    kept = m.kept_classes(m._image_skipping_lower(images).detach(), labels)
    assert 7 in kept.tolist() and len(kept) >= m.n_top and torch.equal(m._keep, keep)
    assert torch.isinf(logits).any() == (len(kept) < len(CLASSES))
    # the loss is the cross-entropy over the kept classes
    with torch.no_grad():
        feats = F.normalize(m.clip.visual(images), dim=-1)
        text = F.normalize(m.encode_text(tokens[0][kept]), dim=-1)
        want = F.cross_entropy(m.logit_scale() * feats @ text.t(), (kept == 7).nonzero()[0].expand(4))
    torch.testing.assert_close(loss.detach(), want, atol=1e-4, rtol=1e-4)
    state = m.training_state()
    assert set(state) == {"prototypes", "keep"}
    fresh = _make(tiny_backbone)
    fresh.load_training_state(state)
    assert torch.equal(fresh._keep, keep)


def test_batches_hold_one_class_each(tiny_backbone):
    from types import SimpleNamespace

    m = _make(tiny_backbone)
    ds = SimpleNamespace(samples=[SimpleNamespace(label=i % 3) for i in range(3 * 9)])  # 9 images per class
    batches = m.train_batches(ds, 4, torch.Generator().manual_seed(0))
    assert len(batches) == 3 * 2  # floor(9 / 4) per class; the remainder of each class is dropped
    for b in batches:
        assert len(b) == 4 and len({ds.samples[i].label for i in b}) == 1
    assert len({i for b in batches for i in b}) == 24
    assert m.train_batches(ds, 10, torch.Generator()) is None  # fewer shots than a batch: plain shuffling
