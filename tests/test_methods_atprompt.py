"""ATPrompt: attribute blocks and words before the host's context, on CoOp, CoCoOp and MaPLe."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from training.jobs import make_train_config
from training.methods import create_method, get_method
from training.prompts.deep import encode_text_deep
from training.prompts.text import encode_text_embeddings, eot_positions

CLASSES = ["red apple", "dog", "tent"]


def _atp(backbone, **options):
    torch.manual_seed(0)
    m = create_method("atprompt", copy.deepcopy(backbone), options, CLASSES)
    with torch.no_grad():  # every learned tensor away from its initial value
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _reference_layout(m, names, bias=None):
    """The prompt embeddings [C, L, W] laid out by the reference's index arithmetic
    (``coop_atp.py``: prefix [:1], attribute word k at 1 + sum_{j<k}(n_j + 1) + n_k, suffix after the
    class context) on the tokens of "X*n a_1 X*n a_2 X*n_ctx {name}."."""
    n, n_ctx = m.n_att, m.host.ctx.shape[0]
    x = " ".join(["X"] * n)
    text = " ".join(f"{x} {a}" for a in m.config.attributes) + " " + " ".join(["X"] * n_ctx)
    tokens = m.backbone.tokenizer([f"{text} {c}." for c in names])
    emb = m.clip.token_embedding(tokens)
    ctx = m.host.ctx if bias is None else m.host.ctx + bias
    parts, pos = [emb[:, :1]], 1
    for k, block in enumerate(m.blocks):
        parts += [block.expand(len(names), -1, -1), emb[:, pos + n : pos + n + 1]]
        pos += n + 1
    parts += [ctx.expand(len(names), -1, -1), emb[:, pos + n_ctx :]]
    return torch.cat(parts, dim=1), eot_positions(tokens, m.backbone.eot_token_id)


def test_coop_prompt_is_blocks_words_context_name(tiny_backbone):
    m = _atp(tiny_backbone, host="coop", attributes=("color", "shape"))
    assert sorted(m.learned_state()) == ["blocks.0", "blocks.1", "host.ctx"]
    assert m.blocks[0].shape == (2, m.host.ctx.shape[1]) and m.host.ctx.shape[0] == 2  # n_att = n_ctx = 2
    with torch.no_grad():
        emb, eot = _reference_layout(m, CLASSES)
        want = F.normalize(encode_text_embeddings(m.clip, emb, eot), dim=-1)
        torch.testing.assert_close(m.text_outputs(m.tokenize(CLASSES))["class_embeddings"], want)


def test_reference_splice_reproduces_the_one_token_slicing_and_the_default_keeps_every_token(tiny_backbone):
    tok = tiny_backbone.tokenizer
    assert int(eot_positions(tok(["playfulness"]), tiny_backbone.eot_token_id)[0]) == 3  # two BPE tokens
    faithful = _atp(tiny_backbone, attributes=("playfulness", "energy"), reference_splice=True)
    with torch.no_grad():
        emb, eot = _reference_layout(faithful, CLASSES)  # [A A] play [A A] X [C C] X name .
        want = F.normalize(encode_text_embeddings(faithful.clip, emb, eot), dim=-1)
        torch.testing.assert_close(faithful.text_outputs(faithful.tokenize(CLASSES))["class_embeddings"], want)
    words = [tok.decode(getattr(faithful, f"attribute_ids_{k}").tolist()).strip() for k in range(2)]
    assert words == ["play", "x"]
    correct = _atp(tiny_backbone, attributes=("playfulness", "energy"))
    assert [tok.decode(getattr(correct, f"attribute_ids_{k}").tolist()).replace(" ", "") for k in range(2)] == ["playfulness", "energy"]
    assert correct.prefix_length == 2 + 2 + 2 + 1 and correct.trailing == 0
    # one-token words: both splices are the same prompt
    a, b = _atp(tiny_backbone, attributes=("color",)), _atp(tiny_backbone, attributes=("color",), reference_splice=True)
    assert a.prompt_templates() == b.prompt_templates()
    with torch.no_grad():
        torch.testing.assert_close(a.class_embeddings(a.tokenize(CLASSES)), b.class_embeddings(b.tokenize(CLASSES)))


def test_cocoop_shifts_only_the_class_context(tiny_backbone):
    m = _atp(tiny_backbone, host="cocoop", attributes=("color",))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = m.encode_image(images)
        bias = m.host.meta_net(F.normalize(feats, dim=-1))  # [B, W]
        got = m.logits_from_features(feats, m.tokenize(CLASSES))
        for b in range(2):
            emb, eot = _reference_layout(m, CLASSES, bias=bias[b])
            text = F.normalize(encode_text_embeddings(m.clip, emb, eot), dim=-1)
            want = m.logit_scale() * F.normalize(feats[b], dim=-1) @ text.t()
            torch.testing.assert_close(got[b], want)


def test_maple_projects_the_class_context_and_replaces_its_slots_after_the_attributes(tiny_backbone):
    m = _atp(tiny_backbone, host="maple", attributes=("color", "shape"))
    tokens = m.tokenize(CLASSES)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        emb, eot = _reference_layout(m, CLASSES)
        prefix = 1 + 2 * (m.n_att + 1)
        want = F.normalize(encode_text_deep(m.clip, emb, eot, list(m.host.deep_text), start=prefix), dim=-1)
        torch.testing.assert_close(m.text_outputs(tokens)["class_embeddings"], want)
        image = m.image_outputs(images)["image_embeddings"]
        for block in m.blocks:  # the visual prompts come from the class context alone
            block.add_(torch.randn_like(block))
        torch.testing.assert_close(m.image_outputs(images)["image_embeddings"], image)
        assert not torch.allclose(m.text_outputs(tokens)["class_embeddings"], want)


def test_train_step_reaches_blocks_and_host_tensors(tiny_backbone):
    for host in ("coop", "cocoop", "maple"):
        m = _atp(tiny_backbone, host=host).train()
        loss, logits = m.compute_loss(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]), m.tokenize(CLASSES))
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        assert set(grads) == {f"{n}" for n in m.learned_state()}
        assert all(g is not None for g in grads.values()), host  # (the tiny meta-net's 2 ReLU units may be dead)
        assert all(grads[n].abs().sum() > 0 for n in ("blocks.0", "blocks.1", "host.ctx")), host
        assert not torch.equal(m.blocks[0], m.blocks[1])


def test_schedules_attributes_and_host_defaults_follow_the_reference():
    spec = get_method("atprompt")
    for host, (epochs, batch, lr) in {"coop": (100, 32, 0.002), "cocoop": (10, 1, 0.002), "maple": (5, 4, 0.0035)}.items():
        cfg = make_train_config("atprompt", {}, spec.config_cls(host=host))
        assert (cfg.epochs, cfg.batch_size, cfg.lr) == (epochs, batch, lr)
        host_cfg = spec.method_cls.host_config_for(spec.config_cls(host=host))
        assert host_cfg.ctx_init == "" and host_cfg.n_ctx == (4 if host == "maple" else 2)
    assert spec.method_cls.options_for_dataset("coop:oxford_pets:/d") == {"attributes": ("playfulness", "energy")}
    assert spec.method_cls.options_for_dataset("coop:dtd:/d") == {"attributes": ("pattern", "color", "design")}
    assert spec.method_cls.options_for_dataset("emoji-nature") == {}
    assert spec.config_cls(attributes=("color,shape",)).attributes == ("color", "shape")
    given = spec.config_cls(host="coop", host_options=json.dumps({"n_ctx": 4}))
    assert spec.method_cls.host_config_for(given).n_ctx == 4


@pytest.mark.parametrize("bad", [{"attributes": ()}, {"attributes": ("a", "b", "c", "d")}, {"attributes": ("{}",)},
                                 {"host": "kgcoop"}, {"n_att": 0}, {"init_std": 0.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        get_method("atprompt").config_cls(**bad)


def test_hosts_without_a_shared_end_context_are_refused(tiny_backbone):
    with pytest.raises(ValueError, match="class_token_position"):
        create_method("atprompt", tiny_backbone, {"host_options": json.dumps({"class_token_position": "front"})}, CLASSES)
