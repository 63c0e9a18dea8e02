"""Behaviour of the text-side baselines: CoCoOp, KgCoOp, ProGrad and TCP."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from training.data import SampleDataset, build_train_transform, load_dataset, sample_few_shot, split_base_novel
from training.loop import TrainConfig, train
from training.methods import create_method
from training.methods.prograd import project_conflicting
from training.methods.tcp import default_inject_layer
from training.runs import LOG_FILE, RunDir

CLASSES = ["red apple", "dog", "tent"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: intra-op threads only add synchronisation (20x slower on a busy 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make(name, backbone, classes=CLASSES, **options):
    torch.manual_seed(0)
    return create_method(name, backbone, options or None, classes)


def _handwritten(backbone, template, names):
    """Normalised frozen-CLIP embeddings of hand-written prompts, straight from open_clip."""
    with torch.no_grad():
        return F.normalize(backbone.model.encode_text(backbone.tokenizer([template.format(n) for n in names])), dim=-1)


# -- CoCoOp ----------------------------------------------------------------------------------------
def test_cocoop_class_embeddings_depend_on_the_image(tiny_backbone):
    m = _make("cocoop", tiny_backbone)
    assert m.capabilities.text_depends_on_image
    assert m.meta_net.linear1.weight.shape == (32 // 16, 32) and m.meta_net.linear2.weight.shape == (64, 32 // 16)
    tokens = m.tokenize(CLASSES)
    feats = m.encode_image(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        emb = m.conditioned_class_embeddings(feats, tokens)  # [2, C, D]
    assert emb.shape == (2, len(CLASSES), 32)
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)
    # each image's embeddings are CoOp's with the context shifted by that image's meta-net bias
    coop = _make("coop", tiny_backbone, ctx_init="", n_ctx=m.n_ctx)
    bias = m.image_bias(feats)
    assert torch.equal(bias, m.meta_net(F.normalize(feats, dim=-1)))  # the reference feeds normalised features
    for b in range(2):
        with torch.no_grad():
            coop.ctx.copy_(m.ctx + bias[b])
            assert torch.allclose(emb[b], coop.class_embeddings(tokens), atol=1e-5)
    logits = m.logits_from_features(feats, tokens)
    expected = m.logit_scale() * torch.einsum("bd,bcd->bc", F.normalize(feats, dim=-1), emb)
    assert torch.allclose(logits, expected, atol=1e-4)


def test_cocoop_evaluation_chunks_images_without_changing_results(tiny_backbone, monkeypatch):
    from training.methods import cocoop

    m = _make("cocoop", tiny_backbone)
    tokens, feats = m.tokenize(CLASSES), torch.randn(7, 32)
    with torch.no_grad():
        whole = m.conditioned_class_embeddings(feats, tokens)
        monkeypatch.setattr(cocoop, "MAX_PROMPTS", 2 * len(CLASSES))  # chunks of 2 images
        calls, encode = [], m._encode
        monkeypatch.setattr(m, "_encode", lambda ctx, t: calls.append(ctx.shape[0]) or encode(ctx, t))
        assert torch.allclose(m.conditioned_class_embeddings(feats, tokens), whole, atol=1e-6)
    assert calls == [2, 2, 2, 1]


def test_cocoop_meta_net_receives_gradients(tiny_backbone):
    m = _make("cocoop", tiny_backbone)
    loss, _ = m.compute_loss(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), m.tokenize(CLASSES))
    loss.backward()
    for name, p in m.meta_net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"meta_net.{name} got no gradient"
    assert m.ctx.grad.abs().sum() > 0


# -- KgCoOp ----------------------------------------------------------------------------------------
def test_kgcoop_distance_is_zero_when_initialised_from_the_handcrafted_phrase(tiny_backbone):
    m = _make("kgcoop", tiny_backbone)  # ctx "a photo of a" + name + "." == "a photo of a {}."
    tokens = m.tokenize(CLASSES)
    with torch.no_grad():
        assert m.knowledge_loss(m.class_embeddings(tokens), tokens).abs() < 1e-6
        images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
        loss, logits = m.compute_loss(images, labels, tokens)
        assert torch.allclose(loss, F.cross_entropy(logits, labels), atol=1e-5)


@pytest.mark.parametrize("distance", ["cosine", "squared_l2"])
def test_kgcoop_loss_is_ce_plus_weighted_distance(distance, tiny_backbone):
    m = _make("kgcoop", tiny_backbone, distance=distance)
    with torch.no_grad():
        m.ctx.add_(0.5 * torch.randn_like(m.ctx))
    tokens = m.tokenize(CLASSES)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        loss, _ = m.compute_loss(images, labels, tokens)
        w = m.class_embeddings(tokens)
        w_clip = _handwritten(tiny_backbone, "a photo of a {}.", CLASSES)
        logits = tiny_backbone.model.logit_scale.exp() * F.normalize(tiny_backbone.model.encode_image(images), dim=-1) @ w.t()
        cos_dist = 1 - (w * w_clip).sum(-1).mean()
        l2_dist = (w - w_clip).pow(2).sum(-1).mean()
    assert cos_dist > 1e-3
    assert torch.allclose(l2_dist, 2 * cos_dist, atol=1e-5)  # the paper's form is twice the code's
    expected = F.cross_entropy(logits, labels) + 8.0 * (cos_dist if distance == "cosine" else l2_dist)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_kgcoop_refuses_tokens_of_other_classes(tiny_backbone):
    m = _make("kgcoop", tiny_backbone)
    other = m.tokenize(["cat", "car", "tree"])
    with pytest.raises(ValueError, match="training classes"):
        m.compute_loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), other)


# -- ProGrad ---------------------------------------------------------------------------------------
def _dassl_rule(a, b, lam):
    """TrainerBase.prograd_backward_and_update (BeierZhu/Prompt-align), written out."""
    b_norm = b / torch.linalg.norm(b)
    a_norm = a / torch.linalg.norm(a)
    if torch.dot(a_norm.flatten(), b_norm.flatten()) < 0:
        return a - lam * torch.dot(a.flatten(), b_norm.flatten()) * b_norm
    return a


def test_prograd_projection_rule_on_constructed_vectors():
    g, kl = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: g . kl < 0
    out = project_conflicting(g, kl, 1.0)
    assert torch.allclose(out, torch.tensor([0.5, 0.5]))
    assert torch.dot(out, kl).abs() < 1e-7  # the conflicting component is gone
    assert torch.allclose(project_conflicting(g, kl, 0.5), torch.tensor([0.75, 0.25]))
    agree = torch.tensor([1.0, 1.0])
    assert torch.equal(project_conflicting(g, agree, 1.0), g)
    assert torch.equal(project_conflicting(g, torch.zeros(2), 1.0), g)


def test_prograd_context_init_fills_the_last_slots(tiny_backbone):
    m = _make("prograd", tiny_backbone)
    ids = tiny_backbone.tokenizer(["a photo of a"])[0]
    assert m.ctx.shape == (16, 64)
    assert torch.equal(m.ctx[:12], torch.zeros(12, 64))
    assert torch.equal(m.ctx[12:], tiny_backbone.model.token_embedding(ids[1:5]))


@pytest.mark.parametrize("case", ["conflicting", "aligned"])
def test_prograd_backward_step_applies_the_reference_rule(case, tiny_backbone):
    names = ["blue", "cyan", "green", "red"]
    m = _make("prograd", tiny_backbone, names, ctx_init="", n_ctx=4, lambda_=1.0)
    tokens = m.tokenize(names)
    torch.manual_seed(0)
    feats = torch.randn(6, 32)
    with torch.no_grad():
        student = m.logits_from_features(feats, tokens).argmax(-1)
        teacher = (F.normalize(feats, dim=-1) @ _handwritten(tiny_backbone, "a photo of a {}.", names).t()).argmax(-1)
    # labels that agree with the student pull against the zero-shot teacher; the teacher's own agree with it
    labels = student if case == "conflicting" else teacher
    ce, kl, _ = m.losses(feats, labels, tokens, are_features=True)
    g_ce, = torch.autograd.grad(ce, [m.ctx], retain_graph=True)
    g_kl, = torch.autograd.grad(kl, [m.ctx])
    assert (torch.dot(g_ce.flatten(), g_kl.flatten()) < 0) == (case == "conflicting")

    scaler = torch.amp.GradScaler("cpu", enabled=False)
    m.zero_grad(set_to_none=True)
    loss, _ = m.backward_step(feats, labels, tokens, are_features=True, scaler=scaler)
    assert torch.allclose(loss, ce)
    assert torch.allclose(m.ctx.grad, _dassl_rule(g_ce, g_kl, 1.0), rtol=1e-5, atol=1e-6)
    if case == "conflicting":
        assert not torch.allclose(m.ctx.grad, g_ce, atol=1e-4)
        assert torch.dot(m.ctx.grad.flatten(), g_kl.flatten()).abs() < 1e-4 * g_ce.norm() * g_kl.norm()
    else:
        assert torch.allclose(m.ctx.grad, g_ce, rtol=1e-6, atol=1e-7)

    # with loss scaling (AMP) the gradient is the same projection, scaled
    scaled = torch.amp.GradScaler("cpu", init_scale=1024.0)
    m.zero_grad(set_to_none=True)
    m.backward_step(feats, labels, tokens, are_features=True, scaler=scaled)
    assert torch.allclose(m.ctx.grad / 1024.0, _dassl_rule(g_ce, g_kl, 1.0), rtol=1e-4, atol=1e-6)


# -- TCP -------------------------------------------------------------------------------------------
def test_tcp_default_injection_layer(tiny_backbone):
    assert default_inject_layer(12) == 8  # the reference's layer for ViT-B/16's text tower
    assert default_inject_layer(2) == 1
    with pytest.raises(ValueError, match="has 2 layers"):
        _make("tcp", tiny_backbone, inject_layer=2)


def _tcp_reference(m, tokens):
    """TCP's text path as the reference writes it: prefix/ctx/suffix, replace the slots before block k."""
    clip, n = m.clip, m.n_ctx
    tokens = F.pad(tokens, (0, clip.context_length - tokens.shape[-1]))  # the reference runs the full context
    learned, hand_tokens = tokens
    with torch.no_grad():
        hand = F.normalize(clip.encode_text(hand_tokens), dim=-1)
    class_tokens = m.meta_net(hand).reshape(len(learned), n, -1)
    emb = clip.token_embedding(learned)
    x = torch.cat([emb[:, :1], m.ctx.unsqueeze(0).expand(len(learned), -1, -1), emb[:, 1 + n :]], dim=1)
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i == m.inject_layer:
            x = torch.cat([x[:, :1], class_tokens, x[:, 1 + n :]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)[torch.arange(len(learned)), learned.argmax(-1)] @ clip.text_projection
    return F.normalize(x, dim=-1)


def test_tcp_injected_class_tokens_change_the_embeddings(tiny_backbone):
    m = _make("tcp", tiny_backbone)
    tokens = m.tokenize(CLASSES)
    assert tokens.shape[0] == 2 and m.inject_layer == 1
    emb = m.class_embeddings(tokens)
    assert torch.allclose(emb, _tcp_reference(m, tokens), atol=1e-5)
    # without injection (w = 0) TCP is CoOp with the same context
    plain = _make("tcp", tiny_backbone, inject_weight=0.0)
    coop = _make("coop", tiny_backbone, ctx_init="", n_ctx=4)
    with torch.no_grad():
        coop.ctx.copy_(plain.ctx)
        assert torch.allclose(plain.class_embeddings(tokens), coop.class_embeddings(coop.tokenize(CLASSES)), atol=1e-5)
        assert not torch.allclose(emb, coop.class_embeddings(coop.tokenize(CLASSES)), atol=1e-3)
        # the tokens come from the meta-net: changing it changes the embeddings (a random shift;
        # a constant one would vanish in the next block's LayerNorm)
        m.meta_net.linear2.bias.add_(torch.randn_like(m.meta_net.linear2.bias))
        assert not torch.allclose(m.class_embeddings(tokens), emb, atol=1e-3)
    # novel names get their own class-aware tokens from their own hand-crafted prompts
    novel = m.class_embeddings(m.tokenize(["cat", "car"]))
    assert novel.shape == (2, 32) and torch.allclose(novel.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match=r"tokens \[2, C, L\]"):
        m.class_embeddings(tokens[:1])


def test_tcp_handcrafted_branch_is_frozen(tiny_backbone):
    m = _make("tcp", tiny_backbone)
    tokens = m.tokenize(CLASSES)
    hand = m.handcrafted_embeddings(tokens[1])
    assert not hand.requires_grad
    assert torch.allclose(hand, _handwritten(tiny_backbone, "a photo of a {}.", CLASSES), atol=1e-6)
    before = m.class_embeddings(tokens).detach()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss, _ = m.compute_loss(images, labels, tokens)
    loss.backward()
    assert {n for n, p in m.named_parameters() if p.grad is not None} == set(m.learned_state())
    assert all(p.grad is None for p in m.clip.parameters())
    torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1).step()
    assert torch.equal(m.handcrafted_embeddings(tokens[1]), hand)  # the anchor did not move
    assert not torch.allclose(m.class_embeddings(tokens), before, atol=1e-5)
    # the loss's knowledge term is measured against that frozen anchor
    with torch.no_grad():
        loss, logits = m.compute_loss(images, labels, tokens)
        w = m.class_embeddings(tokens)
        expected = F.cross_entropy(logits, labels) + 8.0 * (1 - (w * hand).sum(-1).mean())
    assert torch.allclose(loss, expected, atol=1e-5)


# -- all four learn on the colour dataset ----------------------------------------------------------
@pytest.fixture(scope="module")
def base_split(colour_root):
    base, _ = split_base_novel(load_dataset(f"folder:{colour_root}"))
    return base


@pytest.mark.parametrize("name", ["cocoop", "kgcoop", "prograd", "tcp"])
def test_loss_falls_on_colours(name, tiny_backbone, base_split, tmp_path):
    m = _make(name, tiny_backbone, base_split.classnames)
    ds = SampleDataset(sample_few_shot(base_split.train, 8, 1), build_train_transform(tiny_backbone.preprocess))
    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.02, optimizer="adamw", warmup_epochs=0)
    train(m, ds, m.tokenize(base_split.classnames), cfg, RunDir(tmp_path), seed=1, progress=False)
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert len(log) == 6
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], [r["loss"] for r in log]
