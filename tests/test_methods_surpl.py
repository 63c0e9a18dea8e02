"""SurPL: value-path local tokens, the surrogate-feature generator, its three heads and losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.methods import create_method
from training.methods.surpl import IMAGE_TOKENS, SurrogateFeatureGenerator, top_k_counts
from training.prompts.knowledge import template_ensemble_features
from training.prompts.vision import value_path_tokens
from training.protocol import IMAGE_EMBEDDINGS

CLASSES = ["red", "green", "blue"]


def _make(backbone, **options):
    torch.manual_seed(0)
    return create_method("surpl", backbone, options or None, CLASSES)


def test_the_value_path_is_the_block_with_each_token_attending_to_itself(tiny_backbone):
    block = tiny_backbone.model.visual.transformer.resblocks[-1]
    x = torch.randn(2, 6, block.ln_1.normalized_shape[0])
    only_self = torch.full((6, 6), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        torch.testing.assert_close(value_path_tokens(block, x), block(x, attn_mask=only_self), rtol=1e-5, atol=1e-5)


def test_local_tokens_are_every_token_but_cls_and_the_outputs_pack_the_raw_global_feature(tiny_backbone):
    m = _make(tiny_backbone).eval()
    grid = tiny_backbone.model.visual.grid_size
    assert m.n_local == grid[0] * grid[1] + 4
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g, local = m.image_features(x)
        out = m.image_outputs(x)
    assert local.shape == (2, m.n_local, tiny_backbone.embed_dim)
    torch.testing.assert_close(out[IMAGE_EMBEDDINGS], F.normalize(g, dim=-1))
    torch.testing.assert_close(out[IMAGE_TOKENS], torch.cat([g[:, None], local], dim=1))
    # feature_proj starts as the identity (no bias)
    assert m.feature_proj.bias is None and torch.equal(m.feature_proj.weight, torch.eye(tiny_backbone.embed_dim))


def test_top_k_counts_keep_the_references_fractions():
    assert top_k_counts((10, 20, 30, 40), 200, True) == [10, 20, 30, 40]  # ViT-B/16: the reference's counts
    assert top_k_counts((10, 20, 30, 40), 40, True) == [2, 4, 6, 8]
    assert top_k_counts((10, 20, 30, 40), 20, False) == [10, 20, 20, 20]
    assert top_k_counts((10,), 5, True) == [1]


def test_the_single_key_generator_never_trains_its_query_and_key_projections():
    torch.manual_seed(0)
    sfg = SurrogateFeatureGenerator(32, 8)
    queries, key = torch.randn(5, 3, 32), torch.randn(1, 3, 32)
    out = sfg(queries, key)
    # one key: the attention output is the same for every query (a per-key shift, then the MLP)
    attn = sfg.attn(sfg.ln_1(queries), sfg.ln_1(key), sfg.ln_1(key), need_weights=False)[0]
    torch.testing.assert_close(attn, attn[:1].expand_as(attn))
    out.sum().backward()
    grad = sfg.attn.in_proj_weight.grad
    assert grad[:64].abs().max() < 1e-5 * grad[64:].abs().max()  # W_q, W_k: (numerically) no gradient
    with pytest.raises(ValueError, match="divide"):
        SurrogateFeatureGenerator(30, 8)


def test_the_three_heads_and_their_average(tiny_backbone):
    m = _make(tiny_backbone).eval()
    x, tokens = torch.randn(2, 3, 32, 32), m.tokenize(CLASSES)
    with torch.no_grad():
        g, local = m.image_features(x)
        l1, l2, *l3 = m.head_logits(g, local, m.text_outputs(tokens))
        t = m.encode_text(tokens[0])
        s = m.logit_scale()
        torch.testing.assert_close(l1, s * F.normalize(g, dim=-1) @ F.normalize(t, dim=-1).t())
        b, c = 1, 2  # one (image, class) pair by hand
        shifted = m.sfg(t[c][None, None], g[b][None, None])[0, 0]
        torch.testing.assert_close(l2[b, c], s * F.cosine_similarity(g[b], shifted, dim=0), rtol=1e-5, atol=1e-5)
        fg = m.sfg(t[c][None, None], m.fg_signals[3][None, None])[0, 0]
        sims = F.normalize(local[b], dim=-1) @ F.normalize(fg, dim=0)
        torch.testing.assert_close(l3[3][b, c], s * sims.sort(descending=True).values[: m.top_k[3]].mean(), rtol=1e-5, atol=1e-5)
        assert len(l3) == 4
        torch.testing.assert_close(m(x, tokens), (l1 + l2 + torch.stack(l3).mean(0)) / 3)
        torch.testing.assert_close(m.logits_from_outputs(m.image_outputs(x), tokens), m(x, tokens))


def test_the_loss_is_the_references_sum(tiny_backbone):
    m = _make(tiny_backbone)
    x, y, tokens = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2]), m.tokenize(CLASSES)
    loss, logits = m.compute_loss(x, y, tokens)
    g, local = m.image_features(x)
    l1, l2, *l3 = m.head_logits(g, local, m.text_outputs(tokens))
    ce = F.cross_entropy(l1, y) + F.cross_entropy(l2, y) + torch.stack([F.cross_entropy(l, y) for l in l3]).mean()
    frozen = F.normalize(m.clip.visual(x), dim=-1)
    target = template_ensemble_features(m, m.config.text_templates, CLASSES, torch.device("cpu"))
    text = F.normalize(m.encode_text(tokens[0]), dim=-1)
    want = ce + 10 * F.l1_loss(F.normalize(g, dim=-1), frozen) + 25 * F.l1_loss(text, target)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert len(m.config.text_templates) == 60
    loss.backward()
    assert m.fg_signals.grad is not None and m.feature_proj.weight.grad is not None and m.ctx.grad is not None
    assert m.clip.visual.conv1.weight.grad is None  # CLIP stays frozen
