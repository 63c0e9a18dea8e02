"""MMRL: representation tokens from block s on, two image features, fused base head, class-token novel head."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from exports import scoring
from training.methods import create_method
from training.methods.mmrl import IMAGE_REP, default_rep_start
from training.prompts.deep import run_blocks_inserting

BASE = ["red apple", "dog", "tent"]


def _make(backbone, **options):
    torch.manual_seed(0)
    m = create_method("mmrl", backbone, options or None, BASE)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def test_depth_scales_the_reference_block_5_of_12():
    assert default_rep_start(12) == 5
    assert [default_rep_start(n) for n in (2, 3, 4)] == [1, 1, 2]


def test_block_maps_start_identical_as_in_the_reference(tiny_backbone):
    torch.manual_seed(0)
    m = create_method("mmrl", tiny_backbone, {"rep_start": 0}, BASE)
    assert len(m.r2t) == len(tiny_backbone.model.transformer.resblocks)
    assert all(torch.equal(m.r2t[0].weight, p.weight) and torch.equal(m.r2v[0].bias, q.bias) for p, q in zip(m.r2t, m.r2v))


def test_inserted_tokens_enter_after_the_first_token_then_are_replaced(tiny_backbone):
    # with identity blocks the output shows exactly where the tokens went
    blocks = copy.deepcopy(tiny_backbone.model.transformer)
    for b in blocks.resblocks:
        b.forward = lambda x, attn_mask=None: x
    x = torch.randn(2, 4, 64)
    a, b = torch.full((3, 64), 1.0), torch.full((3, 64), 2.0)
    out = run_blocks_inserting(blocks, x, [a], first_block=1)
    assert out.shape == (2, 7, 64) and torch.equal(out[:, 1:4], a.expand(2, -1, -1)) and torch.equal(out[:, 4:], x[:, 1:])
    out = run_blocks_inserting(blocks, x, [a, b], first_block=0)
    assert torch.equal(out[:, 1:4], b.expand(2, -1, -1)) and torch.equal(out[:, 0], x[:, 0])


def test_text_tower_stays_causal_with_the_inserted_tokens(tiny_backbone):
    # padding after the end-of-text token must not reach the pooled feature (mask rebuilt for L + K)
    m = _make(tiny_backbone)
    tokens = m.tokenize(BASE)[0]
    full = tiny_backbone.tokenizer([m.config.template.format(c) for c in BASE])
    with torch.no_grad():
        torch.testing.assert_close(m.encode_text(tokens), m.encode_text(full), atol=1e-5, rtol=1e-5)


def test_base_names_fuse_both_heads_and_new_names_use_the_class_token(tiny_backbone):
    m = _make(tiny_backbone)
    images = torch.randn(3, 3, 32, 32)
    names = BASE[:2] + ["sunflower"]
    with torch.no_grad():
        img = {k: v.numpy() for k, v in m.image_outputs(images).items()}
        txt = {k: v.numpy() for k, v in m.text_outputs(m.tokenize(names)).items()}
        _, fused = m.compute_loss(images, torch.tensor([0, 1, 2]), m.tokenize(BASE))
    heads = m.graph_signature().heads
    logits = scoring.head_logits(img, txt, heads, scoring.base_mask(names, BASE, "auto"), float(m.logit_scale()))
    cls = 100.0 * img["image_embeddings"] @ txt["class_embeddings"].T
    rep = 100.0 * img[IMAGE_REP] @ txt["class_embeddings"].T
    np.testing.assert_allclose(logits[:, :2], 0.7 * cls[:, :2] + 0.3 * rep[:, :2], rtol=1e-6)
    np.testing.assert_allclose(logits[:, 2], cls[:, 2], rtol=1e-6)
    np.testing.assert_allclose(fused.numpy()[:, :2], logits[:, :2], rtol=1e-4, atol=1e-3)  # the loss's fused logits
    assert not np.allclose(rep, cls)


def test_loss_pulls_towards_the_frozen_clip(tiny_backbone):
    # with reg_weight the loss grows by exactly the two consistency terms
    m0, m1 = _make(tiny_backbone, reg_weight=0.0), _make(tiny_backbone, reg_weight=2.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    tokens = m0.tokenize(BASE)
    with torch.no_grad():
        l0, _ = m0.compute_loss(images, labels, tokens)
        l1, _ = m1.compute_loss(images, labels, tokens)
        f_cls = F.normalize(m1.encode_image(images), dim=-1)
        clip_img = F.normalize(tiny_backbone.model.visual(images), dim=-1)
        text = m1.class_embeddings(tokens)
        hand = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer([f"a photo of a {c}." for c in BASE])), dim=-1)
        reg = (1 - F.cosine_similarity(f_cls, clip_img).mean()) + (1 - F.cosine_similarity(text, hand).mean())
    torch.testing.assert_close(l1 - l0, 2.0 * reg, atol=1e-5, rtol=1e-4)
