"""Deep-prompt methods (VPT, IVLP, MaPLe, PromptSRC): the layer-by-layer forward, coupling, losses, GPA."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import KillAt

from training.backbones import Backbone, build_clip
from training.data import (
    SampleDataset,
    build_eval_transform,
    build_train_transform,
    load_dataset,
    sample_few_shot,
    split_base_novel,
)
from training.loop import TrainConfig, train
from training.methods import create_method, get_method
from training.prompts.deep import encode_image_deep, encode_text_deep, run_blocks
from training.methods.promptsrc import TEACHER_TEMPLATES
from training.prompts.text import eot_positions
from training.runs import LOG_FILE, RunDir, atomic_save_tensors, load_tensors

DEEP = ["vpt", "ivlp", "maple", "promptsrc"]
CLASSES = ["red apple", "dog", "tent"]


@pytest.fixture(scope="module")
def deeper_backbone(tiny_backbone) -> Backbone:
    """test-tiny with 3 layers per tower, so depth-2 prompts leave a layer that sees them as plain tokens."""
    model = build_clip(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32),
        text=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=3),
        seed=1,
    ).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone("test-tiny-3", model, tiny_backbone.tokenizer, tiny_backbone.preprocess)


def _make(name, backbone, classes=CLASSES, **options):
    torch.manual_seed(0)
    return create_method(name, backbone, options or None, classes)


def _perturb(method, scale=0.5):
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


# -- the layer-by-layer forward is open_clip's forward ---------------------------------------------

def test_towers_without_prompts_reproduce_open_clip(deeper_backbone):
    clip = deeper_backbone.model
    tokens = deeper_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES] + ["", "x " * 80])
    emb = clip.token_embedding(tokens)
    eot = eot_positions(tokens, deeper_backbone.eot_token_id)
    assert torch.equal(encode_text_deep(clip, emb, eot), clip.encode_text(tokens))
    images = torch.randn(5, 3, 32, 32)
    assert torch.allclose(encode_image_deep(clip.visual, images), clip.encode_image(images), atol=1e-6, rtol=0)
    x = torch.randn(2, 7, 64)
    assert torch.equal(run_blocks(clip.visual.transformer, x), clip.visual.transformer(x))

    # methods with their prompts removed: IVLP without visual prompts, and text depth 1 at the init phrase
    for n_ctx in (2, 4):
        m = _make("ivlp", deeper_backbone, n_ctx_text=n_ctx, prompt_depth_text=1, prompt_depth_vision=0)
        assert not m.capabilities.changes_image_graph
        assert torch.equal(m.encode_image(images), clip.encode_image(images))
        written = deeper_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])
        # tokenize() trims padding (exact in math; matmuls of another shape round differently)
        assert torch.allclose(m.encode_text(m.tokenize(CLASSES)[0]), clip.encode_text(written), atol=1e-5, rtol=0)


def _reference_text(clip, emb, tokens, ctx, deep):
    """The reference's TextEncoder + ResidualAttentionBlock_IVLP, sequence-first, by prefix/ctx/suffix cats."""
    n = ctx.shape[0]
    x = torch.cat([emb[:, :1], ctx.expand(emb.shape[0], -1, -1), emb[:, 1 + n :]], dim=1)
    x = (x + clip.positional_embedding).permute(1, 0, 2)  # LND
    for i, block in enumerate(clip.transformer.resblocks):
        if 0 < i <= len(deep):
            x = torch.cat([x[:1], deep[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2), x[1 + n :]], dim=0)
        x = block(x.permute(1, 0, 2), attn_mask=clip.attn_mask).permute(1, 0, 2)
    x = clip.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ clip.text_projection


def _reference_image(visual, images, ctx, deep):
    """The reference's VisionTransformer with ResidualAttentionBlock_IVLP, sequence-first."""
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = x + visual.positional_embedding
    x = torch.cat([x, ctx.expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    n = ctx.shape[0]
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i <= len(deep):
            x = torch.cat([x[: x.shape[0] - n], deep[i - 1].expand(x.shape[1], -1, -1).permute(1, 0, 2)], dim=0)
        x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
    return visual.ln_post(x.permute(1, 0, 2)[:, 0, :]) @ visual.proj


@pytest.mark.parametrize("name", ["ivlp", "promptsrc"])
def test_deep_prompts_follow_the_reference_layout(name, deeper_backbone):
    m = _make(name, deeper_backbone, prompt_depth_text=2, prompt_depth_vision=2)
    _perturb(m)
    assert len(m.deep_text) == 1 and len(m.deep_vision) == 1  # layer 1 replaced, layer 2 keeps them as tokens
    tokens = m.tokenize(CLASSES)[0]
    clip = deeper_backbone.model
    full = torch.nn.functional.pad(tokens, (0, clip.context_length - tokens.shape[-1]))  # the reference runs all 77
    ref = _reference_text(clip, clip.token_embedding(full), full, m.ctx, list(m.deep_text))
    assert torch.allclose(m.encode_text(tokens), ref, atol=1e-5, rtol=0)
    images = torch.randn(3, 3, 32, 32)
    ref = _reference_image(clip.visual, images, m.vision_ctx, list(m.deep_vision))
    assert torch.allclose(m.encode_image(images), ref, atol=1e-5, rtol=0)


def test_every_prompt_changes_the_output(deeper_backbone):
    m = _make("ivlp", deeper_backbone, prompt_depth_text=2, prompt_depth_vision=2)
    tokens, images = m.tokenize(CLASSES)[0], torch.randn(2, 3, 32, 32)
    text0, image0 = m.encode_text(tokens), m.encode_image(images)
    for param, tower in ((m.ctx, "text"), (m.deep_text[0], "text"), (m.vision_ctx, "image"), (m.deep_vision[0], "image")):
        original = param.detach().clone()
        with torch.no_grad():
            param.add_(torch.randn_like(param))  # not a constant: LayerNorm would cancel a uniform shift
        text, image = m.encode_text(tokens), m.encode_image(images)
        changed, same = (text, image) if tower == "text" else (image, text)
        assert not torch.allclose(changed, text0 if tower == "text" else image0, atol=1e-4)
        assert torch.equal(same, image0 if tower == "text" else text0)  # independent towers
        with torch.no_grad():
            param.copy_(original)


def test_vpt_text_is_the_fixed_hand_written_prompt(tiny_backbone):
    m = _make("vpt", tiny_backbone)
    clip = tiny_backbone.model
    assert {n for n, _ in m.named_parameters() if _.requires_grad} == {"vision_ctx", "deep_vision.0"}
    ref = F.normalize(clip.encode_text(tiny_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    assert torch.allclose(m.class_embeddings(m.tokenize(CLASSES)), ref, atol=1e-6, rtol=0)
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(m.encode_image(images), clip.encode_image(images), atol=1e-4)
    assert m.capabilities.changes_image_graph
    assert get_method("vpt").method_cls.train_defaults == {"epochs": 5, "batch_size": 4, "lr": 0.0025}


# -- MaPLe's coupling ------------------------------------------------------------------------------

def test_maple_vision_prompts_are_projections_of_language_prompts(deeper_backbone):
    m = _make("maple", deeper_backbone, prompt_depth=3)
    assert m.ctx.shape == (2, 64) and len(m.deep_text) == 2 and len(m.deep_proj) == 2
    assert not any("vision" in n for n, _ in m.named_parameters())  # no visual prompts of their own
    # the reference clones one Linear for the deep couplings
    assert torch.equal(m.deep_proj[0].weight, m.deep_proj[1].weight)
    _perturb(m)
    shallow, deep = m.vision_prompts()
    assert torch.allclose(shallow, m.ctx @ m.proj.weight.t() + m.proj.bias)
    for j in range(2):
        assert torch.allclose(deep[j], m.deep_text[j] @ m.deep_proj[j].weight.t() + m.deep_proj[j].bias)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.encode_image(images), encode_image_deep(deeper_backbone.model.visual, images, shallow, deep))
    # "a photo" is learned, "of a" stays in the prompt (n_ctx 2 of the 4-token init phrase)
    assert m.prompt_templates() == ["a photo of a {}."]

    # an image-only loss reaches the language prompts through the couplings
    m.encode_image(images).square().sum().backward()
    for name, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # a text-only loss reaches the language prompts but not the couplings
    m.zero_grad()
    m.encode_text(m.tokenize(CLASSES)[0]).square().sum().backward()
    assert m.ctx.grad.abs().sum() > 0 and m.deep_text[1].grad.abs().sum() > 0
    assert m.proj.weight.grad is None or m.proj.weight.grad.abs().sum() == 0
    assert get_method("maple").method_cls.train_defaults == {"epochs": 5, "batch_size": 4, "lr": 0.0035}
    cfg = get_method("maple").config_cls()
    assert (cfg.n_ctx, cfg.prompt_depth, cfg.ctx_init) == (2, 9, "a photo of a")


def test_ctx_init_shorter_than_n_ctx_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="fewer than n_ctx"):
        _make("ivlp", tiny_backbone, n_ctx_text=6)
    m = _make("ivlp", tiny_backbone, n_ctx_text=6, ctx_init="")
    assert m.prompt_templates() == ["X X X X X X {}."]
    with pytest.raises(ValueError, match="prompt_depth_text"):
        get_method("ivlp").config_cls(prompt_depth_text=0)


# -- PromptSRC: the reference's loss terms and Gaussian prompt aggregation ---------------------------

def test_promptsrc_loss_terms_match_the_reference(tiny_backbone):
    templates = TEACHER_TEMPLATES[:5]
    m = _make("promptsrc", tiny_backbone, teacher_templates=templates)
    _perturb(m, 0.2)
    clip, tok = tiny_backbone.model, tiny_backbone.tokenizer
    tokens = m.tokenize(CLASSES)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    terms, logits = m.loss_terms(images, labels, tokens)

    # the reference: teacher = mean over templates of unnormalised frozen features, then normalised
    with torch.no_grad():
        fixed = torch.stack([clip.encode_text(tok([t.replace("{}", c) for c in CLASSES])) for t in templates], 1).mean(1)
        fixed = fixed / fixed.norm(dim=-1, keepdim=True)
        zs_img = clip.encode_image(images)
        zs_img = zs_img / zs_img.norm(dim=-1, keepdim=True)
    scale = clip.logit_scale.exp()
    img = m.encode_image(images)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = m.encode_text(tokens[0])
    txt = txt / txt.norm(dim=-1, keepdim=True)
    ref_logits = scale * img @ txt.t()
    zs_logits = scale * zs_img @ fixed.t()
    p_zs, log_p = zs_logits.softmax(1), ref_logits.log_softmax(1)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(terms["ce"], F.cross_entropy(ref_logits, labels), atol=1e-6)
    assert torch.allclose(terms["scl_text"], 25 * (txt - fixed).abs().mean(), atol=1e-6)
    assert torch.allclose(terms["scl_image"], 10 * (img - zs_img).abs().mean(), atol=1e-6)
    kl = (p_zs * (p_zs.log() - log_p)).sum() / ref_logits.numel()  # KL(zero-shot || prompted), per element
    assert torch.allclose(terms["scl_logits"], kl, atol=1e-6) and kl > 0
    loss, _ = m.compute_loss(images, labels, tokens)
    assert torch.allclose(loss, sum(terms.values()))
    # the frozen branch is not in the gradient
    loss.backward()
    assert all(p.grad is None for p in clip.parameters())
    with pytest.raises(ValueError, match="training classes"):
        m.compute_loss(images, labels, m.tokenize(CLASSES + ["kite"]))


def _gauss_average(snapshots, mean, std):
    g = [math.exp(-((e - mean) ** 2) / (2 * std**2)) / (std * math.sqrt(2 * math.pi)) for e in range(1, len(snapshots) + 1)]
    return {k: sum(gi / sum(g) * s[k].double() for gi, s in zip(g, snapshots)).float() for k in snapshots[0]}


def test_promptsrc_gaussian_aggregation_and_exact_resume(tiny_backbone, tmp_path):
    n_epochs, opts = 5, dict(gpa_mean=3.0, gpa_std=1.5, teacher_templates=TEACHER_TEMPLATES[:2])
    m = _make("promptsrc", tiny_backbone, **opts)
    snapshots, states = [], []
    for epoch in range(1, n_epochs + 1):
        _perturb(m)  # "an epoch of training"
        snapshots.append({k: v.clone() for k, v in m.learned_state().items()})
        states.append({k: v.clone() for k, v in m.learned_state().items()})
        m.on_epoch_end(epoch, n_epochs)
        if epoch == 2:
            atomic_save_tensors(tmp_path / "ckpt.safetensors", m.training_state())
    expected = _gauss_average(snapshots, 3.0, 1.5)
    final = m.final_learned_state()
    for k in expected:
        assert torch.allclose(final[k], expected[k], atol=1e-6, rtol=1e-6), k
        assert not torch.allclose(final[k], snapshots[-1][k])
    assert torch.equal(m.learned_state()["ctx"], final["ctx"])  # the aggregate is the method's state now

    # resume from the epoch-2 state in a fresh instance: the same aggregate, bit for bit
    r = _make("promptsrc", tiny_backbone, **opts)
    r.load_training_state(load_tensors(tmp_path / "ckpt.safetensors")[0])
    for epoch in range(3, n_epochs + 1):
        r.load_learned_state(states[epoch - 1])
        r.on_epoch_end(epoch, n_epochs)
    resumed = r.final_learned_state()
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    with pytest.raises(ValueError, match="does not fit"):
        r.load_training_state({"gpa/nope": torch.zeros(1)})


# -- training on the colour set --------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_split(colour_root):
    base, _ = split_base_novel(load_dataset(f"folder:{colour_root}"))
    return base


@pytest.fixture(scope="module")
def colour_batch(base_split, tiny_backbone):
    ds = SampleDataset(base_split.train, build_eval_transform(tiny_backbone.preprocess))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([s.label for s in base_split.train])


def _fit(method, classnames, images, labels, steps, lr=0.02):
    tokens = method.tokenize(classnames)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = method.compute_loss(images, labels, tokens)
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits = method(images, tokens)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize("name", ["vpt", "ivlp", "maple"])
def test_prompts_fit_the_colour_set(name, tiny_backbone, base_split, colour_batch):
    # a random frozen backbone: only the learned prompts can align the colours with their names
    images, labels = colour_batch
    m = _make(name, tiny_backbone, list(base_split.classnames))
    frozen = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    loss0, _ = _fit(m, base_split.classnames, images, labels, steps=0)
    loss, acc = _fit(m, base_split.classnames, images, labels, steps=25)
    chance = math.log(len(base_split.classnames))
    if name == "vpt":  # fixed, nearly collinear text embeddings: only the image side moves
        assert loss < 0.9 * chance and loss < 0.75 * loss0 and acc > 0.5, (loss0, loss, acc)
    else:
        assert loss < 0.5 * chance and acc == 1.0, (loss0, loss, acc)
    assert all(torch.equal(v, tiny_backbone.model.state_dict()[k]) for k, v in frozen.items())
    assert not any(p.requires_grad for p in tiny_backbone.model.parameters())


def test_promptsrc_stays_closer_to_frozen_clip_than_without_regulation(tiny_backbone, base_split, colour_batch):
    images, labels = colour_batch
    drift = {}
    for weights in ((25.0, 10.0), (0.0, 0.0)):
        m = _make("promptsrc", tiny_backbone, list(base_split.classnames), text_loss_weight=weights[0],
                  image_loss_weight=weights[1], teacher_templates=TEACHER_TEMPLATES[:4])
        _fit(m, base_split.classnames, images, labels, steps=15)
        with torch.no_grad():
            prompted = F.normalize(m.encode_image(images), dim=-1)
            drift[weights] = (prompted - F.normalize(tiny_backbone.model.encode_image(images), dim=-1)).abs().mean()
    assert drift[(25.0, 10.0)] < 0.5 * drift[(0.0, 0.0)], drift


@pytest.mark.parametrize("name", DEEP)
def test_loop_lowers_the_loss(name, tiny_backbone, base_split, tmp_path):
    options = {"gpa_mean": 2.0, "gpa_std": 1.0, "teacher_templates": TEACHER_TEMPLATES[:4]} if name == "promptsrc" else {}
    m = _make(name, tiny_backbone, list(base_split.classnames), **options)
    ds = SampleDataset(sample_few_shot(base_split.train, 8, 1), build_train_transform(tiny_backbone.preprocess))
    snapshots = []
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, optimizer="adamw", warmup_epochs=0)
    learned = train(m, ds, m.tokenize(base_split.classnames), cfg, RunDir(tmp_path), seed=1, progress=False,
                    on_epoch_end=lambda e: snapshots.append({k: v.clone() for k, v in m.learned_state().items()}))
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert log[-1]["loss"] < 0.9 * log[0]["loss"], log
    if name == "promptsrc":  # the run keeps the Gaussian aggregate of its epochs
        expected = _gauss_average(snapshots, 2.0, 1.0)
        assert all(torch.allclose(learned[k], expected[k], atol=1e-6) for k in expected)
        assert not torch.allclose(learned["ctx"], snapshots[-1]["ctx"])


def test_promptsrc_resumed_run_reaches_the_same_aggregate(tiny_backbone, base_split, tmp_path):
    options = {"gpa_mean": 2.0, "gpa_std": 1.0, "teacher_templates": TEACHER_TEMPLATES[:2]}
    ds = SampleDataset(sample_few_shot(base_split.train, 4, 1), build_train_transform(tiny_backbone.preprocess))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, optimizer="adamw", warmup_epochs=0)
    runs = {}
    for name in ("full", "killed"):
        m = _make("promptsrc", tiny_backbone, list(base_split.classnames), **options)
        data = ds if name == "full" else KillAt(ds, len(ds) + 2, KeyboardInterrupt)  # dies early in epoch 2
        try:
            runs[name] = train(m, data, m.tokenize(base_split.classnames), cfg, RunDir(tmp_path / name), seed=1, progress=False)
        except KeyboardInterrupt:
            torch.manual_seed(99)  # another init: the checkpoint (learned tensors + aggregate) must win
            m = create_method("promptsrc", tiny_backbone, options, list(base_split.classnames))
            runs[name] = train(m, ds, m.tokenize(base_split.classnames), cfg, RunDir(tmp_path / name), seed=1, progress=False)
    assert runs["full"].keys() == runs["killed"].keys()
    assert all(torch.equal(runs["full"][k], runs["killed"][k]) for k in runs["full"])
