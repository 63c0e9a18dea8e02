"""DeKg: the knowledge-guided term plus HSIC, as a plug-in that trains its host (CoOp or TCP)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from training.jobs import make_train_config
from training.methods import create_method, get_method
from training.methods.dekg import hsic
from training.prompts.knowledge import frozen_text_features

CLASSES = ["red apple", "dog", "tent", "blue whale"]


def _dekg(backbone, **options):
    torch.manual_seed(0)
    return create_method("dekg", copy.deepcopy(backbone), options, CLASSES)


def test_hsic_is_the_references_linear_kernel_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    xs, ys = x / x.norm(), y / y.norm()
    centred = ys.t() @ (xs - xs.mean(dim=0))  # trace(H Kx H Ky) = ||Y'^T H X'||_F^2
    torch.testing.assert_close(hsic(x, y), centred.pow(2).sum())
    torch.testing.assert_close(hsic(3.0 * x, 0.5 * y), hsic(x, y))  # the whole matrix is normalised...
    row_scaled = x * torch.arange(1.0, 7.0).unsqueeze(1)
    assert not torch.allclose(hsic(row_scaled, y), hsic(x, y))  # ...not each row: raw features differ (DeKg_TCP)
    assert float(hsic(x, x)) > float(hsic(x, y)) > 0


def test_on_coop_the_loss_is_ce_plus_both_terms_and_test_time_is_coop(tiny_backbone):
    m = _dekg(tiny_backbone, host="coop", weight=8.0, hsic_weight=6.0).train()
    assert sorted(m.learned_state()) == ["host.ctx"]
    coop = create_method("coop", m.backbone, m.host.config.to_dict(), CLASSES)
    with torch.no_grad():
        m.host.ctx.add_(0.05 * torch.randn_like(m.host.ctx))
        coop.ctx.copy_(m.host.ctx)
    tokens = m.tokenize(CLASSES)
    assert torch.equal(tokens, coop.tokenize(CLASSES))
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    loss, logits = m.compute_loss(images, labels, tokens)
    with torch.no_grad():
        text = coop.class_embeddings(tokens)
        hand = frozen_text_features(coop, m.backbone.tokenizer([f"a photo of a {c}." for c in CLASSES]))
        want_logits = coop(images, tokens)
        want = (F.cross_entropy(want_logits, labels) + 8.0 * (1 - F.cosine_similarity(text, hand).mean())
                + 6.0 * hsic(text, hand))
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert m.host.ctx.grad is not None and m.host.ctx.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.text_outputs(tokens)["class_embeddings"], coop.class_embeddings(tokens))


def test_the_hsic_term_changes_the_gradient(tiny_backbone):
    grads = []
    for w2 in (0.0, 6.0):
        m = _dekg(tiny_backbone, hsic_weight=w2).train()
        loss, _ = m.compute_loss(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
                                 torch.tensor([0, 1, 2, 3]), m.tokenize(CLASSES))
        loss.backward()
        grads.append(m.host.ctx.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_on_tcp_it_replaces_tcps_loss_and_shares_the_anchor_template(tiny_backbone):
    m = _dekg(tiny_backbone, host="tcp", weight=5.0, hsic_weight=0.0, handcrafted_template="a {} on a table.").train()
    assert m.host.config.handcrafted_template == "a {} on a table."  # the host's class-aware tokens use DeKg's anchor
    assert "host.meta_net.linear1.weight" in m.learned_state() and "host.ctx" in m.learned_state()
    tcp = create_method("tcp", m.backbone, {**m.host.config.to_dict(), "weight": 5.0}, CLASSES).train()
    tcp.load_learned_state({k.removeprefix("host."): v for k, v in m.learned_state().items()})
    tokens = m.tokenize(CLASSES)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([3, 2, 1, 0])
    torch.testing.assert_close(m.compute_loss(images, labels, tokens)[0], tcp.compute_loss(images, labels, tokens)[0])
    # its own template in host_options wins
    own = _dekg(tiny_backbone, host="tcp", host_options=json.dumps({"handcrafted_template": "itap of a {}."}))
    assert own.host.config.handcrafted_template == "itap of a {}."


def test_raw_hsic_features_reproduce_dekg_tcp(tiny_backbone):
    m = _dekg(tiny_backbone, host="tcp", weight=0.0, hsic_weight=1.0, hsic_features="raw").train()
    tokens = m.tokenize(CLASSES)
    feats, labels = torch.randn(4, tiny_backbone.embed_dim), torch.tensor([0, 1, 2, 3])
    loss, logits = m.compute_loss(feats, labels, tokens, are_features=True)
    with torch.no_grad():
        raw = m.host.class_features(tokens)
        hand = frozen_text_features(m, m.backbone.tokenizer([f"a photo of a {c}." for c in CLASSES]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels) + hsic(raw, hand))
    normalised = _dekg(tiny_backbone, host="tcp", weight=0.0, hsic_weight=1.0).train()
    assert not torch.allclose(loss, normalised.compute_loss(feats, labels, tokens, are_features=True)[0])


def test_reference_schedules_and_templates_per_host():
    cls = get_method("dekg").method_cls
    coop_cfg = make_train_config("dekg", {}, cls.config_cls(host="coop"))
    tcp_cfg = make_train_config("dekg", {"epochs": 3}, cls.config_cls(host="tcp"))
    assert (coop_cfg.epochs, coop_cfg.batch_size, coop_cfg.optimizer) == (100, 128, "sgd")
    assert (tcp_cfg.epochs, tcp_cfg.batch_size, tcp_cfg.optimizer) == (3, 32, "adamw")
    assert cls.options_for_dataset("coop:dtd:/data") == {"handcrafted_template": "a photo of a {}, a type of texture."}
    assert cls.options_for_dataset("coop:oxford_pets:/data") == {"handcrafted_template": "a photo of a {}, a type of pet."}
    assert cls.options_for_dataset("emoji-nature") == {}


@pytest.mark.parametrize("bad", [{"host": "maple"}, {"hsic_weight": -1.0}, {"hsic_features": "l2"},
                                 {"handcrafted_template": "no slot"}, {"host_options": "[1]"}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        get_method("dekg").config_cls(**bad)
