"""HiCroPL: the two mappings (the paper's differentiable one, the reference's in-place copy), fusion, loss."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exports.onnx_export import ExportError
from training.export import check_method_exportable
from training.methods import create_method
from training.methods.hicropl import pooling_nets, proxy_tokens
from training.prompts.knowledge import frozen_text_features

CLASSES = ["red", "green", "blue"]
DESCRIPTIONS = {"red": ["red, a warm colour", "red, like fire"], "green": ["green, like grass"],
                "blue": ["blue, like the sky", "blue, cold", "blue, deep"]}


def _make(backbone, **options):
    torch.manual_seed(0)
    return create_method("hicropl", copy.deepcopy(backbone), options or None, CLASSES)


def _step(m, seed=0):
    torch.manual_seed(seed)
    m.train()
    m.zero_grad(set_to_none=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss, _ = m.compute_loss(x, y, m.tokenize(CLASSES, DESCRIPTIONS))
    loss.backward()
    return loss


MAPPING_NETS = ("text2visual.", "visual2text.", "text_pooling.", "vision_pooling.", "text_proxies.", "vision_proxies.")


def test_differentiable_mapping_trains_every_learned_tensor(tiny_backbone):
    m = _make(tiny_backbone)
    _step(m)
    learned = dict(m.named_parameters())
    missing = [n for n in m.learned_state() if learned[n].grad is None or not learned[n].grad.abs().sum() > 0]
    assert missing == []
    assert any(n.startswith("text2visual.") for n in m.learned_state())


def test_coded_mapping_as_the_reference_mappers_pooling_and_proxies_get_no_gradient(tiny_backbone):
    """The reference copies the mapper outputs into the prompts with ``.data.copy_``: outside autograd."""
    m = _make(tiny_backbone, mapping="coded")
    _step(m)
    params = dict(m.named_parameters())
    untrained = sorted(n for n, p in params.items() if p.requires_grad and p.grad is None)
    assert untrained and all(n.startswith(MAPPING_NETS) for n in untrained)
    assert {n.split(".")[0] for n in untrained} == {p.rstrip(".") for p in MAPPING_NETS}
    for name in ("ctx", "vision_ctx", "deep_text.0", "deep_vision.0"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0


def test_the_reference_builds_each_group_from_one_tensor_and_moving_the_model_separates_them():
    """The reference wraps one tensor in a Parameter per layer: one storage on the CPU, but ``model.to(device)``
    (``Module._apply``, like the ``.double()`` here) converts each parameter on its own."""
    t = torch.randn(4, 8)
    group = nn.ParameterList([nn.Parameter(t) for _ in range(3)])
    assert len({p.data_ptr() for p in group}) == 1
    group.double()
    assert len({p.data_ptr() for p in group}) == 3
    assert all(torch.equal(p, group[0]) for p in group)


def test_coded_mapping_starts_each_group_equal_on_separate_tensors_as_the_reference_trains(tiny_backbone):
    coded, paper = _make(tiny_backbone, mapping="coded"), _make(tiny_backbone)
    for m, equal in ((coded, True), (paper, False)):
        visual = [m.vision_ctx, *m.deep_vision]
        assert len({p.data_ptr() for p in visual}) == len(visual) > 1
        assert all(torch.equal(p, visual[0]) for p in visual[1:]) is equal
    for equal in (True, False):
        proxies = proxy_tokens(6, 8, equal=equal)
        assert len({p.data_ptr() for p in proxies}) == 6
        assert all(torch.equal(p, proxies[0]) for p in proxies[1:]) is equal
        nets = pooling_nets(3, 8, 2, equal=equal)
        same = [torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()) if a.numel() > 8]
        assert all(same) is equal
    # text prompts are drawn one by one in both (the reference draws each)
    assert not torch.equal(coded.ctx, coded.deep_text[0])


def test_coded_mapping_moves_the_prompts_at_every_forward_and_refuses_export(tiny_backbone):
    m = _make(tiny_backbone, mapping="coded").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = m.vision_ctx.detach().clone()
        a = m.encode_image(x)
        after_one = m.vision_ctx.detach().clone()
        b = m.encode_image(x)
    assert not torch.equal(before, after_one)
    assert not torch.allclose(a, b)
    # each forward rewrites the visual prompts of layers < k and the text prompts of layers >= k, nothing else
    text0, vision0 = ([p.detach().clone() for p in group] for group in m._raw_prompts())
    m.coded_update()
    text1, vision1 = m._raw_prompts()
    kt, kv = m.cross_text, m.cross_vision
    assert [not torch.equal(a, b) for a, b in zip(vision0, vision1)] == [i < kv for i in range(len(vision0))]
    assert [not torch.equal(a, b) for a, b in zip(text0, text1)] == [i >= kt for i in range(len(text0))]
    with pytest.raises(ExportError, match="mapping='coded'"):
        check_method_exportable(m)


def test_differentiable_mapping_is_a_pure_function_of_the_learned_state(tiny_backbone):
    m = _make(tiny_backbone).eval()
    x = torch.randn(2, 3, 32, 32)
    state = {k: v.clone() for k, v in m.learned_state().items()}
    with torch.no_grad():
        a, b = m.encode_image(x), m.encode_image(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in m.learned_state().items())
    check_method_exportable(m)


def test_prompts_flow_text_to_image_in_the_first_layers_and_back_in_the_others(tiny_backbone):
    m = _make(tiny_backbone).eval()
    kt, kv = m.cross_text, m.cross_vision
    with torch.no_grad():
        v0, t0 = m.vision_prompts(), m.text_prompts()
        text_raw, vision_raw = m._raw_prompts()
        # mapped layers differ from the raw parameters, the others are the raw ones
        assert not torch.allclose(v0[0], vision_raw[0])
        torch.testing.assert_close(t0[0], text_raw[0])
        assert not torch.allclose(t0[1][kt - 1], text_raw[kt])
        torch.testing.assert_close(v0[1][kv - 1], vision_raw[kv])
        # the early text prompts steer the early visual prompts; the late visual prompts steer the late text prompts
        m.ctx.add_(torch.randn_like(m.ctx))
        assert not torch.allclose(m.vision_prompts()[0], v0[0])
        torch.testing.assert_close(m.text_prompts()[1][kt - 1], t0[1][kt - 1])
        m.deep_vision[kv - 1].add_(torch.randn_like(m.deep_vision[kv - 1]))
        assert not torch.allclose(m.text_prompts()[1][kt - 1], t0[1][kt - 1])


def test_classes_and_images_are_fused_with_the_frozen_model(tiny_backbone):
    m = _make(tiny_backbone).eval()
    tokens = m.tokenize(CLASSES, DESCRIPTIONS)  # [1 + 3, C, L]: learned prompt, then up to 3 descriptions
    assert tokens.shape[:2] == (4, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = F.normalize(m.encode_text(tokens[0]), dim=-1)
        w = torch.stack([F.normalize(frozen_text_features(m, m.backbone.tokenizer(DESCRIPTIONS[c])).mean(0), dim=-1)
                         for c in CLASSES])
        torch.testing.assert_close(m.class_embeddings(tokens), F.normalize(t + w, dim=-1), rtol=1e-5, atol=1e-5)
        f0 = F.normalize(m.clip.visual(x), dim=-1)
        f = F.normalize(super(type(m), m).encode_image(x), dim=-1)
        torch.testing.assert_close(m.encode_image(x), F.normalize(f + f0, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="descriptions"):
        m.tokenize(CLASSES)


def test_loss_is_cross_entropy_plus_lambda_times_both_distillation_terms(tiny_backbone):
    m = _make(tiny_backbone)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    tokens = m.tokenize(CLASSES, DESCRIPTIONS)
    m.train()
    with torch.no_grad():
        loss, logits = m.compute_loss(x, y, tokens)
        f, f0 = m._image(x)
        t, w = m._text(tokens)
    torch.testing.assert_close(logits, m.logit_scale() * f @ t.t())
    distill = (1 - F.cosine_similarity(t, w).mean()) + (1 - F.cosine_similarity(f, f0).mean())
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) + 12.0 * distill, rtol=1e-5, atol=1e-5)


def test_cross_layer_and_heads_are_checked(tiny_backbone):
    with pytest.raises(ValueError, match="cross_layer"):
        _make(tiny_backbone, cross_layer=2)  # the tiny towers have 2 layers: nothing left to map back
    with pytest.raises(ValueError, match="heads"):
        _make(tiny_backbone, heads=7)
    with pytest.raises(ValueError, match="mapping"):
        _make(tiny_backbone, mapping="inplace")
    with pytest.raises(ValueError, match="prompt_depth"):
        _make(tiny_backbone, prompt_depth=1)


def test_coded_mapping_trains_from_the_cli_and_its_export_is_refused_with_the_reason(exported):
    from training.runs import LEARNED_FILE

    run, artifact = exported("hicropl[mapping=coded]")
    assert (run / LEARNED_FILE).is_file()
    assert isinstance(artifact, str) and "mapping='coded'" in artifact and "Traceback" not in artifact
