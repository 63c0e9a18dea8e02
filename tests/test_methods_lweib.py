"""LwEIB: conv adapters in both towers, gradient scaling, slow-fast scales, description prompts, negatives."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from training.methods import create_method
from training.methods.lweib import ConvAdapter
from training.prompts.text import description_rows

CLASSES = ["red", "green", "blue"]
DESCRIPTIONS = {"red": ["a warm colour", "like fire"], "green": ["like grass"], "blue": ["like the sky", "cold", "deep"]}


def _make(backbone, classes=CLASSES, **options):
    """On a private copy: the adapters go inside the backbone's blocks."""
    torch.manual_seed(0)
    return create_method("lweib", copy.deepcopy(backbone), options or None, classes)


def _adapters(m):
    return [mod for mod in m.modules() if isinstance(mod, ConvAdapter)]


def test_adapters_sit_on_ln_1_and_the_mlp_hidden_layer_of_every_block(tiny_backbone):
    m = _make(tiny_backbone)
    learned = set(m.learned_state())
    n_text, n_image = len(m.clip.transformer.resblocks), len(m.clip.visual.transformer.resblocks)
    assert len(learned) == 2 * (n_text + n_image)
    assert all(k.endswith(("ln_1.conv.weight", "mlp.c_fc.conv.weight")) for k in learned)
    # zero convolutions: exactly CLIP
    plain = copy.deepcopy(tiny_backbone.model).eval()
    with torch.no_grad():
        for a in _adapters(m):
            a.conv.weight.zero_()
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.tokenize(CLASSES, DESCRIPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), plain.encode_image(x), rtol=1e-5, atol=1e-5)
        full = F.pad(tokens[0], (0, tiny_backbone.context_length - tokens.shape[-1]))  # open_clip takes the whole context
        torch.testing.assert_close(m.encode_text(full), plain.encode_text(full), rtol=1e-5, atol=1e-5)
    assert m.description_template() == "a photo of a {name}, {description}" and m.prompt_templates() == []


def test_the_image_adapter_convolves_the_patch_grid_and_leaves_the_class_token(tiny_backbone):
    m = _make(tiny_backbone).eval()
    adapter = next(a for a in _adapters(m) if a.grid)
    z = torch.randn(2, 1 + 16, adapter.conv.in_channels)
    out = adapter._conv(z)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    grid = z[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)  # row-major, as conv1 flattens its patches
    want = F.conv2d(grid, adapter.conv.weight, padding=1, groups=adapter.conv.in_channels).reshape(2, -1, 16).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], want)


def test_the_text_adapter_looks_ahead_and_prompts_keep_exactly_that_much_padding(tiny_backbone):
    m = _make(tiny_backbone).eval()
    n_blocks = len(tiny_backbone.model.transformer.resblocks)
    assert m.lookahead() == 2 * n_blocks  # two adapters per block, kernel 3: one position each
    full = tiny_backbone.tokenizer(["a photo of a red, warm"])
    eot = int((full[0] == tiny_backbone.eot_token_id).nonzero()[0])
    with torch.no_grad():
        base = m.encode_text(full)
        near, far = full.clone(), full.clone()
        near[0, eot + m.lookahead()] = 320  # within reach of the end of text
        far[0, eot + m.lookahead() + 1] = 320  # one past it
        # each step back goes through one adapter, s = 0.025 each: tiny, but not zero
        assert not torch.equal(m.encode_text(near), base)
        assert torch.equal(m.encode_text(far), base)
        # so trimming to the longest prompt + lookahead is exact
        torch.testing.assert_close(m.encode_text(full[:, : eot + 1 + m.lookahead()]), base, rtol=1e-5, atol=1e-5)
    assert m.tokenize(CLASSES, DESCRIPTIONS).shape[-1] < tiny_backbone.context_length


def test_gradient_scaling_gives_the_convolution_an_unscaled_gradient(tiny_backbone):
    grads = {}
    for scaling in (True, False):
        m = _make(tiny_backbone, gradient_scaling=scaling, slow_fast_ratio=1.0).train()
        a = next(a for a in _adapters(m) if not a.grid)  # a text adapter: tokens [N, T, C]
        z = torch.randn(3, 7, a.conv.in_channels, requires_grad=True)
        ident = copy.deepcopy(a)
        ident.module = torch.nn.Identity()
        ident(z).pow(2).sum().backward()
        grads[scaling] = (ident.conv.weight.grad.clone(), z.grad.clone())
    s = 0.025
    torch.testing.assert_close(grads[True][0], grads[False][0] / s)  # the weights: as if s were 1
    torch.testing.assert_close(grads[True][1], grads[False][1])  # the frozen stream: unchanged


def test_slow_fast_scales_are_drawn_per_block_in_training_only(tiny_backbone):
    x = torch.randn(1, 3, 32, 32)
    for ratio, want in ((1.0, 0.025), (0.0, 0.0625)):
        m = _make(tiny_backbone, slow_fast_ratio=ratio).train()
        m.encode_image(x)
        assert {a.scale.value for a in _adapters(m) if a.grid} == {want}
        m.eval()
        m.encode_image(x)
        assert {a.scale.value for a in _adapters(m) if a.grid} == {0.025}
    m = _make(tiny_backbone, slow_fast_ratio=0.5).train()
    torch.manual_seed(3)
    m.encode_image(x)
    blocks = [a for a in _adapters(m) if a.grid]
    assert all(blocks[i].scale is blocks[i + 1].scale for i in range(0, len(blocks), 2))  # ln_1 and c_fc share a draw


def test_negative_classes_and_one_description_per_class_per_step(tiny_backbone):
    classes = [f"class {i}" for i in range(20)]
    m = _make(tiny_backbone, classes=classes)
    labels = torch.tensor([5, 2, 5])
    torch.manual_seed(0)
    chosen, targets = m.step_classes(labels, 20)
    assert chosen[:2].tolist() == [2, 5] and len(chosen) == 2 + 14 and len(set(chosen.tolist())) == 16
    assert torch.equal(chosen[targets], labels)
    assert len(_make(tiny_backbone, classes=classes, neg_sampling=-1).step_classes(labels, 20)[0]) == 20
    assert len(m.step_classes(labels, 3)[0]) == 3  # fewer classes than the batch: all of them

    m = _make(tiny_backbone)
    tokens = m.tokenize(CLASSES, DESCRIPTIONS)
    real = description_rows(tokens, tiny_backbone.eot_token_id)
    for _ in range(20):
        drawn = m.drawn_prompts(tokens, torch.arange(3))
        for c in range(3):  # always one of the class's own descriptions, never a padding row
            assert any(torch.equal(drawn[c], tokens[s, c]) for s in range(tokens.shape[0]) if real[s, c])


def test_classes_are_the_mean_of_their_own_descriptions(tiny_backbone):
    m = _make(tiny_backbone).eval()
    tokens = m.tokenize(CLASSES, DESCRIPTIONS)
    with torch.no_grad():
        emb = m.class_embeddings(tokens)
        green = F.normalize(m.encode_text(tokens[:1, 1]), dim=-1)  # one description: itself
        torch.testing.assert_close(emb[1], green[0], rtol=1e-5, atol=1e-5)
        blue = F.normalize(m.encode_text(tokens[:, 2]), dim=-1).mean(0)
        torch.testing.assert_close(emb[2], F.normalize(blue, dim=-1), rtol=1e-5, atol=1e-5)
