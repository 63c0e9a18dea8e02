"""2SFS: LayerNorm stage, base-class head stage, selective inference for base and new names."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from training.data import SampleDataset, build_train_transform, load_dataset, sample_few_shot, split_base_novel
from training.jobs import make_train_config
from training.loop import TrainConfig, train
from training.methods import create_method
from training.methods.twosfs import CLASS_HEAD, tuned_layer_norms
from training.protocol import CLASS_EMBEDDINGS
from training.runs import LOG_FILE, RunDir

CLASSES = ["red", "green", "blue", "red apple"]


def _make(backbone, classes=CLASSES, **options):
    """On a private copy of the backbone: 2SFS tunes the backbone's own LayerNorms."""
    return create_method("twosfs", copy.deepcopy(backbone), options or None, classes)


def _layer_norm_names(clip):
    return {n for n, m in clip.named_modules() if isinstance(m, torch.nn.LayerNorm)}


def test_the_reference_selection_tunes_the_block_layer_norms_only(tiny_backbone):
    m = _make(tiny_backbone)
    learned = set(m.learned_state())
    all_ln = _layer_norm_names(m.clip)
    blocks = {n for n in all_ln if ".resblocks." in f".{n}"}
    assert blocks and all_ln - blocks == {"visual.ln_pre", "visual.ln_post", "ln_final"}
    assert learned == {f"clip.{n}.{p}" for n in blocks for p in ("weight", "bias")} | {"head"}
    # ln_pre / ln_post / ln_final: what the reference's helper switches off again after enabling them
    m.begin_stage(m.stages()[0])
    images, tokens = torch.randn(2, 3, 32, 32), m.tokenize(CLASSES)
    m.compute_loss(images, torch.tensor([0, 1]), tokens)[0].backward()
    for name in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        assert m.clip.get_submodule(name).weight.grad is None
    assert all(m.clip.get_submodule(n).weight.grad is not None for n in blocks)
    assert m.head.grad is None  # stage 1 trains the LayerNorms only


def test_ln_set_all_also_tunes_the_tower_ends(tiny_backbone):
    m = _make(tiny_backbone, ln_set="all")
    learned = set(m.learned_state())
    assert {"clip.visual.ln_pre.weight", "clip.visual.ln_post.bias", "clip.ln_final.weight"} <= learned
    assert len(tuned_layer_norms(m.clip, "all")) == len(_layer_norm_names(m.clip))
    with pytest.raises(ValueError, match="ln_set"):
        _make(tiny_backbone, ln_set="attention")


def test_stage_two_starts_the_head_from_the_tuned_text_tower_once(tiny_backbone):
    m = _make(tiny_backbone)
    ln, head = m.stages()
    assert (ln.name, ln.share, head.name) == ("ln", 0.6, "head") and not ln.warmup and not head.warmup
    m.begin_stage(ln)
    with torch.no_grad():  # stage 1 moved the text tower
        m.clip.transformer.resblocks[0].ln_1.weight.mul_(1.5)
    tokens, images, labels = m.tokenize(CLASSES), torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 3])
    m.begin_stage(head)
    loss, logits = m.compute_loss(images, labels, tokens)
    with torch.no_grad():
        tuned = F.normalize(m.encode_text(tokens[0]), dim=-1)
    torch.testing.assert_close(m.head.detach(), tuned)
    assert bool(m.head_started) and m.training_state()["head_started"].item()
    loss.backward()
    assert m.head.grad is not None
    assert all(p.grad is None for n, p in m.named_parameters() if n != "head")  # the towers are frozen
    with torch.no_grad():
        m.head.add_(1.0)
    moved = m.head.detach().clone()
    m.compute_loss(images, labels, tokens)
    assert torch.equal(m.head.detach(), moved)  # not re-initialised at the next step


def test_selective_inference_base_rows_for_base_names_the_text_tower_for_new_ones(tiny_backbone):
    m = _make(tiny_backbone)
    with torch.no_grad():
        m.head.copy_(torch.randn_like(m.head))
    names = ["blue", "crimson", "RED", "red  apple", "red apples"]  # case and spaces as the tokenizer folds them
    with torch.no_grad():
        out = m.text_outputs(m.tokenize(names))
    rows = F.normalize(m.head.detach(), dim=-1)
    torch.testing.assert_close(out[CLASS_HEAD][0], rows[2])
    torch.testing.assert_close(out[CLASS_HEAD][2], rows[0])
    torch.testing.assert_close(out[CLASS_HEAD][3], rows[3])
    for i in (1, 4):  # new names (one a longer name starting with a base name): the tuned text tower
        torch.testing.assert_close(out[CLASS_HEAD][i], out[CLASS_EMBEDDINGS][i])
    # trimmed tokens: a list of short names matches base prompts on its own length
    short = m.tokenize(["red"])
    assert short.shape[-1] < m.base_tokens.shape[-1]
    assert m.base_match(short[0]).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    sig = m.graph_signature()
    assert sig.switch and [(h.text, h.base_weight, h.novel_weight) for h in sig.heads] == [
        (CLASS_EMBEDDINGS, 0.0, 1.0), (CLASS_HEAD, 1.0, 0.0)]


def test_the_reference_budget_is_counted_in_steps(tiny_backbone):
    cls = type(_make(tiny_backbone))
    cfg = cls.config_cls()
    # 300 steps per shot of 32 images: 4,800 steps at 16 shots; 50 base classes -> 800 images -> 192 epochs
    assert cls.reference_epochs(cfg, 800, 16, 32) == 192
    assert make_train_config("twosfs", {}, cfg, shots=16, n_classes=50).epochs == 192
    assert make_train_config("twosfs", {"epochs": 7}, cfg, shots=16, n_classes=50).epochs == 7  # the caller wins
    assert make_train_config("coop", {}, None, shots=16, n_classes=50).epochs == 200  # others keep theirs


def test_a_two_stage_run_trains_then_resumes_with_its_head(tiny_backbone, colour_root, tmp_path):
    base, _ = split_base_novel(load_dataset(f"folder:{colour_root}"))
    torch.manual_seed(0)
    m = _make(tiny_backbone, classes=base.classnames)
    ds = SampleDataset(sample_few_shot(base.train, 2, 1), build_train_transform(tiny_backbone.preprocess))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=2e-3, optimizer="adamw", warmup_epochs=0)
    learned = train(m, ds, m.tokenize(base.classnames), cfg, RunDir(tmp_path), seed=1, progress=False)
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["stage"] for r in log] == ["ln", "ln", "head"]
    zero = _make(tiny_backbone, classes=base.classnames)
    assert not torch.allclose(learned["head"], zero.head.detach())  # trained after its stage-2 initialisation
    again = _make(tiny_backbone, classes=base.classnames)
    again.load_learned_state(learned)
    for k, v in again.learned_state().items():
        assert torch.equal(v, learned[k]), k


def _reference_selection(clip, start: int = 0) -> set[str]:
    """The reference's LayerNorm selection (``fs/utils/model_utils.py`` @ 64ac143, ``trainable_norm_params`` over
    ``named_modules_with_index``), re-expressed from its description on an open_clip CLIP: modules are visited parents
    first; a name containing ln_pre / ln_post / ln_final comes first with index 0 / 12 / 12, then every name comes
    (again) with its block number inside ``resblocks.`` and -1 elsewhere; a LayerNorm with index >= start is switched
    on, anything else is switched off with everything below it."""
    def visits():
        for name, module in clip.named_modules():
            for tag, index in (("ln_pre", 0), ("ln_post", 12), ("ln_final", 12)):
                if tag in name:
                    yield name, module, index
            if "resblocks." in name:
                yield name, module, int(name.split("resblocks.")[1].split(".")[0])
            else:
                yield name, module, -1

    for _, module, index in visits():
        if isinstance(module, torch.nn.LayerNorm) and index >= start:
            module.requires_grad_(True)
        else:
            module.requires_grad_(False)
    return {n for n, p in clip.named_parameters() if p.requires_grad}


def test_the_default_set_is_what_the_reference_selection_leaves_trainable(tiny_backbone):
    clip = copy.deepcopy(tiny_backbone.model)
    trainable = _reference_selection(clip)
    assert trainable and not any(t.startswith(("visual.ln_pre", "visual.ln_post", "ln_final")) for t in trainable)
    ours = {f"{n}.{p}" for n, _ in tuned_layer_norms(clip, "blocks") for p in ("weight", "bias")}
    assert trainable == ours
