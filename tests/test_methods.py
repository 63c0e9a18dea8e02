"""Contract tests run for every registered method, plus method-specific behaviour."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import constructible_options, descriptions_for
from exports.prompts import prompt_rows
from training.data.transforms import build_train_transform
from training.methods import Capabilities, create_method, get_method, list_methods, register_method
from training.methods.coop import CoOp
from training.prompts.text import eot_positions
from training.runs import atomic_save_tensors, load_tensors

METHODS = [spec.name for spec in list_methods()]
CLASSES = ["red apple", "dog", "tent"]


def _make(name, backbone, **options):
    """A method on a private copy of the session's backbone: weight-tuning methods (SkipT) train the
    backbone's own tensors, and a train step here must not change the backbone other tests share."""
    import copy

    torch.manual_seed(0)
    return create_method(name, copy.deepcopy(backbone), constructible_options(name, options) or None, CLASSES)


def training_batch(method):
    """(inputs, labels, tokens) of one training batch, as the loop feeds the method."""
    tokens = method.tokenize(CLASSES, descriptions_for(CLASSES, method.description_kind))
    if method.training_data == "texts":
        from conftest import colour_descriptions

        method.use_descriptions({c: d for c, d in zip(CLASSES, colour_descriptions().values())})
        inputs, targets = method.training_texts()[:4]
        return inputs, targets, tokens
    if method.needs_train_descriptions:
        method.use_descriptions(descriptions_for(CLASSES, method.description_kind))
    # random pictures through the method's training transform (TAC stacks views), as the loop's data set does
    pre = method.backbone.preprocess
    transform = method.train_transform(build_train_transform(pre), pre)
    rng = np.random.default_rng(0)
    images = torch.stack([transform(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))) for _ in range(4)])
    labels = torch.tensor([0, 1, 2, 0])
    method.on_train_start(TensorSamples(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])))
    return images, labels, tokens


class TensorSamples(torch.utils.data.Dataset):
    """A training set of given tensors with the ``samples[i].label`` view SampleDataset offers."""

    def __init__(self, images, labels):
        from types import SimpleNamespace

        self.images, self.samples = images, [SimpleNamespace(label=int(y)) for y in labels]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.images[i], self.samples[i].label


@pytest.mark.parametrize("name", METHODS)
def test_train_step_changes_only_learned_tensors(name, tiny_backbone):
    method = _make(name, tiny_backbone)
    frozen_before = {k: v.clone() for k, v in method.clip.state_dict().items()}
    images, labels, tokens = training_batch(method)
    loss, logits = method.compute_loss(images, labels, tokens)
    assert torch.isfinite(loss)
    if method.training_data == "texts":
        assert logits is None
    else:  # None: the method reports no accuracy (DPC's contrastive batches)
        assert logits is None or logits.shape == (4, len(CLASSES))
    params = [p for p in method.parameters() if p.requires_grad]
    assert bool(params) == method.capabilities.trainable
    if params:
        before = {k: v.clone() for k, v in method.learned_state().items()}
        opt = torch.optim.SGD(params, lr=0.1)
        loss.backward()
        opt.step()
        assert any(not torch.equal(before[k], v) for k, v in method.learned_state().items())
    tuned = set(method.learned_state())  # weight-tuning methods (SkipT) learn some backbone tensors
    for k, v in method.clip.state_dict().items():
        if f"clip.{k}" not in tuned:
            assert torch.equal(frozen_before[k], v), f"backbone tensor {k} changed"


@pytest.mark.parametrize("name", METHODS)
def test_config_round_trip(name):
    spec = get_method(name)
    cfg = spec.config_cls()
    assert spec.config_cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown option"):
        spec.config_cls.from_dict({**cfg.to_dict(), "no_such_option": 1})
    assert isinstance(spec.method_cls.capabilities_for(cfg), Capabilities)


@pytest.mark.parametrize("name", METHODS)
def test_learned_state_save_load(name, tiny_backbone, tmp_path):
    a = _make(name, tiny_backbone)
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    atomic_save_tensors(tmp_path / "learned.safetensors", a.learned_state())
    torch.manual_seed(123)
    b = create_method(name, copy.deepcopy(tiny_backbone), a.config, CLASSES)  # SkipT loads backbone tensors
    b.load_learned_state(load_tensors(tmp_path / "learned.safetensors")[0])
    tokens = a.tokenize(CLASSES, descriptions_for(CLASSES, a.description_kind))
    assert torch.equal(a.class_embeddings(tokens), b.class_embeddings(tokens))
    if a.learned_state():
        with pytest.raises(ValueError, match="does not fit"):
            b.load_learned_state({})


def test_registry_refuses_duplicates_and_suggests():
    with pytest.raises(ValueError, match="already registered"):
        register_method("coop", "again")(CoOp)
    with pytest.raises(ValueError, match="lowercase"):
        register_method("CoOp", "bad")
    with pytest.raises(KeyError, match="Did you mean coop"):
        get_method("coopp")


def _reference_layout(method: CoOp, tokens: torch.Tensor, names: list[str]) -> torch.Tensor:
    """CoOp's PromptLearner.forward (KaiyangZhou/CoOp trainers/coop.py), per class."""
    emb = method.clip.token_embedding(tokens)
    n, half = method.n_ctx, method.n_ctx // 2
    pos = method.config.class_token_position
    rows = []
    for i, name in enumerate(names):
        nl = len(method.backbone.tokenizer.encode(name))
        prefix, suffix = emb[i : i + 1, :1], emb[i : i + 1, 1 + n :]
        ctx = method.ctx if method.ctx.dim() == 3 else method.ctx.unsqueeze(0).expand(len(names), -1, -1)
        ctx = ctx[i : i + 1]
        if pos == "end":
            rows.append(torch.cat([prefix, ctx, suffix], 1))
        elif pos == "front":
            rows.append(torch.cat([prefix, suffix[:, :nl], ctx, suffix[:, nl:]], 1))
        else:
            rows.append(torch.cat([prefix, ctx[:, :half], suffix[:, :nl], ctx[:, half:], suffix[:, nl:]], 1))
    return torch.cat(rows)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("n_ctx", [4, 5])
def test_coop_prompt_layout_matches_reference(position, n_ctx, tiny_backbone):
    names = ["red apple", "dog", "a much longer class name with many words", "x"]
    m = _make("coop", tiny_backbone, ctx_init="", n_ctx=n_ctx, class_token_position=position)
    tokens = m.tokenize(names)[0]
    emb, eot = m.prompt_embeddings(tokens)
    assert torch.equal(emb, _reference_layout(m, tokens, names))
    assert torch.equal(eot, tokens.argmax(-1))


def test_coop_ctx_init_from_phrase(tiny_backbone):
    m = _make("coop", tiny_backbone, ctx_init="a photo of a")
    ids = tiny_backbone.tokenizer(["a photo of a"])[0]
    assert m.n_ctx == 4
    assert torch.equal(m.ctx, tiny_backbone.model.token_embedding(ids[1:5]))
    # the unchanged init reproduces the hand-written prompt exactly
    tokens = m.tokenize(["dog"])[0]
    written = tiny_backbone.tokenizer(["a photo of a dog."])
    assert torch.allclose(m.encode_text(tokens), tiny_backbone.model.encode_text(written), atol=1e-6)
    with pytest.raises(ValueError, match="4 tokens but n_ctx=8"):
        _make("coop", tiny_backbone, ctx_init="a photo of a", n_ctx=8)


def test_coop_class_specific_is_not_open_vocabulary(tiny_backbone):
    m = _make("coop", tiny_backbone, ctx_init="", n_ctx=4, class_specific=True)
    assert m.ctx.shape[:2] == (len(CLASSES), 4)
    assert not m.capabilities.open_vocabulary
    m.encode_text(m.tokenize(CLASSES)[0])
    with pytest.raises(ValueError, match="cannot embed"):
        m.encode_text(m.tokenize(["new", "names"])[0])


def test_zeroshot_matches_open_clip_and_ensembles(tiny_backbone):
    zs = _make("zeroshot", tiny_backbone)
    tokens = zs.tokenize(CLASSES)
    assert tokens.shape[0] == 1
    ref = torch.nn.functional.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    assert torch.allclose(zs.class_embeddings(tokens), ref, atol=1e-6)
    ens = _make("zeroshot", tiny_backbone, ensemble=True)
    assert len(ens.prompt_templates()) == 7
    emb = ens.class_embeddings(ens.tokenize(CLASSES))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        get_method("zeroshot").config_cls(templates=("no slot",))


def test_eot_positions_matches_argmax(tiny_backbone):
    tokens = tiny_backbone.tokenizer(["", "a", "a b c d e f", "word " * 100])
    assert torch.equal(eot_positions(tokens, tiny_backbone.eot_token_id), tokens.argmax(-1))


def test_configs_are_frozen():
    cfg = get_method("coop").config_cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_ctx = 3  # type: ignore[misc]



@pytest.mark.parametrize("name", METHODS)
def test_trimmed_tokens_give_the_same_embeddings(name, tiny_backbone):
    """tokenize() drops padding after the longest prompt; the causal text tower must not notice."""
    method = _make(name, tiny_backbone).eval()  # test-time features (LwEIB draws its scales in training)
    described = descriptions_for(CLASSES, method.description_kind) if method.capabilities.needs_class_descriptions else None
    trimmed = method.tokenize(CLASSES, described)
    full = torch.stack([tiny_backbone.tokenizer(row) for row in prompt_rows(
        method.prompt_templates(), CLASSES, described, method.description_template(), method.description_layout())])
    assert trimmed.shape[-1] < full.shape[-1] == tiny_backbone.context_length
    longest = int((full == tiny_backbone.eot_token_id).float().argmax(-1).max())
    assert trimmed.shape[-1] == longest + 1 + method.lookahead()  # LwEIB looks ahead: it keeps that much
    assert torch.equal(trimmed, full[..., : trimmed.shape[-1]])
    if method.capabilities.text_depends_on_image:
        images = torch.randn(2, 3, 32, 32)  # the logits through the method's own image outputs
        with torch.no_grad():
            a, b = method(images, trimmed), method(images, full)
    else:
        a, b = method.class_embeddings(trimmed), method.class_embeddings(full)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def _imported_modules(path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_methods_import_only_the_protocol_and_building_blocks():
    """A method module never imports another method module; the building blocks import none at all."""
    import importlib
    from pathlib import Path

    modules = {importlib.import_module(spec.method_cls.__module__) for spec in list_methods()}
    method_modules = {m.__name__ for m in modules}
    assert len(method_modules) == len(METHODS)  # one module per method
    for module in modules:
        others = method_modules - {module.__name__}
        imported = _imported_modules(Path(module.__file__))
        assert not imported & others, f"{module.__name__} imports {sorted(imported & others)}"
    blocks = Path(importlib.import_module("training.prompts").__file__).parent
    for path in sorted(blocks.glob("*.py")):
        bad = {m for m in _imported_modules(path) if m.startswith("training.methods")}
        assert not bad, f"building block {path.name} imports {sorted(bad)}"


def test_reference_templates_on_the_standard_datasets():
    zs = get_method("zeroshot").method_cls
    assert zs.options_for_dataset("coop:OxfordPets:/data") == {
        "templates": ("a photo of a {}, a type of pet.",), "ensemble_extra": ("a photo of a {}, a type of pet.",)}
    assert zs.options_for_dataset("coop:imagenet:/data")["ensemble_extra"] == ()  # no 8th template on ImageNet
    assert zs.options_for_dataset("emoji-nature") == {} and zs.options_for_dataset("folder:/x") == {}
    cfg = get_method("zeroshot").config_cls(ensemble=True, ensemble_extra=("{} texture.",))
    from training.backbones import create_backbone

    m = create_method("zeroshot", create_backbone("test-tiny"), cfg, CLASSES)
    assert len(m.prompt_templates()) == 8 and m.prompt_templates()[-1] == "{} texture."
    for name, field in (("kgcoop", "handcrafted_template"), ("tcp", "handcrafted_template"), ("mmrl", "template")):
        assert get_method(name).method_cls.options_for_dataset("coop:dtd:/d") == {field: "{} texture."}
    assert get_method("coop").method_cls.options_for_dataset("coop:dtd:/d") == {}
