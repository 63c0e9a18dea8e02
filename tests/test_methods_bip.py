"""BIP: class-aware text tokens, image-aware visual tokens, fusion with frozen features, prototype head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.methods import create_method
from training.methods.bip import default_inject_layer
from training.prompts.deep import run_blocks_injecting
from training.prompts.knowledge import frozen_text_features

CLASSES = ["red", "green", "blue"]


def _make(backbone, **options):
    torch.manual_seed(0)
    return create_method("bip", backbone, options or None, CLASSES)


class _Images(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_learned_state_and_the_injection_depth(tiny_backbone):
    m = _make(tiny_backbone)
    assert set(m.learned_state()) == {
        "ctx", "ctx_visual", *(f"{g}.linear{i}.{p}" for g in ("meta_net", "meta_vis") for i in (1, 2) for p in ("weight", "bias"))}
    assert "proto" not in m.learned_state() and set(m.training_state()) == {"proto", "proto_ready"}
    assert default_inject_layer(12) == 8 and (m.text_layer, m.vision_layer) == (1, 1)
    with pytest.raises(ValueError, match="inject_layer"):
        _make(tiny_backbone, inject_layer=2)
    assert m.train_defaults_for(m.config)["adam_eps"] == 1e-3  # the TCP configs' Adam eps


def test_both_features_are_fused_with_the_frozen_clips(tiny_backbone):
    m = _make(tiny_backbone).eval()
    images, tokens = torch.randn(2, 3, 32, 32), m.tokenize(CLASSES)
    with torch.no_grad():
        f0 = F.normalize(m.clip.visual(images), dim=-1)
        f = m.encode_image(images)
        torch.testing.assert_close(f, F.normalize(F.normalize(m.prompted_image(images, f0), dim=-1) + f0, dim=-1))
        t0 = frozen_text_features(m, tokens[1])
        t = m.class_embeddings(tokens)
        torch.testing.assert_close(t, F.normalize(F.normalize(m.prompted_text(tokens[0], t0), dim=-1) + t0, dim=-1))
        # the visual tokens depend on the image: the frozen feature of another image changes the prompted pass
        other = m.prompted_image(images, f0.flip(0))
        assert not torch.allclose(other, m.prompted_image(images, f0))


def test_injection_mixes_the_generated_tokens_into_their_slots(tiny_backbone):
    blocks = tiny_backbone.model.visual.transformer
    x, tokens = torch.randn(2, 7, blocks.width), torch.randn(2, 3, blocks.width)
    seen = []
    hook = blocks.resblocks[1].register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[0].clone()), with_kwargs=True)
    try:
        before = blocks.resblocks[0](x)
        run_blocks_injecting(blocks, x, tokens, block=1, start=-3, weight=0.75)
    finally:
        hook.remove()
    torch.testing.assert_close(seen[0][:, :4], before[:, :4])
    torch.testing.assert_close(seen[0][:, 4:], 0.75 * tokens + 0.25 * before[:, 4:])


def test_the_prototype_head_starts_at_the_class_means_once(tiny_backbone):
    m = _make(tiny_backbone)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    m.on_train_start(_Images(x, y))
    f0 = F.normalize(m.clip.visual(x), dim=-1).detach()
    want = F.normalize(torch.stack([f0[2 * c : 2 * c + 2].mean(0) for c in range(3)]), dim=-1)
    torch.testing.assert_close(m.proto.detach(), want)
    state = {k: v.clone() for k, v in m.training_state().items()}
    resumed = _make(tiny_backbone)
    resumed.load_training_state(state)
    resumed.on_train_start(_Images(torch.randn(6, 3, 32, 32), y))  # a resumed run keeps its head
    torch.testing.assert_close(resumed.proto.detach(), want)


def test_the_loss_is_the_references_sum(tiny_backbone):
    m = _make(tiny_backbone)
    x, y, tokens = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]), m.tokenize(CLASSES)
    m.on_train_start(_Images(x, y))
    plain = _make(tiny_backbone, text_weight=0.0, image_weight=0.0, proto_weight=0.0)
    plain.on_train_start(_Images(x, y))
    loss, logits = m.compute_loss(x, y, tokens)
    ce, _ = plain.compute_loss(x, y, tokens)
    torch.testing.assert_close(ce, F.cross_entropy(logits, y))
    f, f0 = m._image(x)
    t, t0 = m._text(tokens)
    proto = F.normalize(m.proto, dim=-1)
    extra = (0.5 * (F.cross_entropy(10 * f @ proto.t(), y) + F.cross_entropy(10 * f0 @ proto.t(), y))
             + 8.0 * (1 - F.cosine_similarity(t, t0).mean()) + 4.0 * (1 - F.cosine_similarity(f0, f).mean()))
    torch.testing.assert_close(loss, ce + extra, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert m.proto.grad is not None and m.meta_vis.linear2.weight.grad is not None and m.ctx.grad is not None
