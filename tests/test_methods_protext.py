"""ProText: trained on (class prompt, description) pairs alone; descriptions from data through train_job."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import colour_descriptions
from training.methods import create_method
from training.runs import RunError

CLASSES = ["red", "green", "blue"]


def _make(backbone, **options):
    torch.manual_seed(0)
    m = create_method("protext", backbone, options or None, CLASSES)
    m.use_descriptions({**colour_descriptions(), "red": []} if options.pop("drop_red", False) else colour_descriptions())
    return m


def test_one_pair_per_sentence_with_the_class_prompt(tiny_backbone):
    m = _make(tiny_backbone)
    inputs, targets = m.training_texts().tensors
    assert len(inputs) == 2 * len(CLASSES) == len(targets)  # colour_descriptions: two sentences per class
    prompts = m.tokenize(CLASSES)[0]
    assert torch.equal(inputs[0], prompts[0]) and torch.equal(inputs[2], prompts[1])
    want = tiny_backbone.tokenizer([colour_descriptions()["green"][0]])[0, : targets.shape[1]]
    assert torch.equal(targets[2], want)
    assert m.prompt_templates() == ["a photo of a {}."]


def test_classes_without_descriptions_are_left_out(tiny_backbone):
    torch.manual_seed(0)
    m = create_method("protext", tiny_backbone, None, CLASSES)
    m.use_descriptions({"green": ["g."], "blue": ["b.", "bb."], "violet": ["not a training class."]})
    inputs, _ = m.training_texts().tensors
    assert len(inputs) == 3 and set(m.descriptions) == {"green", "blue"}
    m.use_descriptions({})
    with pytest.raises(ValueError, match="none were given"):
        m.training_texts()


def test_loss_is_weighted_mse_to_the_frozen_description_embedding(tiny_backbone):
    m = _make(tiny_backbone)
    inputs, targets = m.training_texts().tensors
    loss, logits = m.compute_loss(inputs, targets, m.tokenize(CLASSES))
    with torch.no_grad():
        full = F.pad(targets, (0, tiny_backbone.context_length - targets.shape[1]))  # untrimmed, as open_clip takes it
        target = F.normalize(tiny_backbone.model.encode_text(full), dim=-1)
        pred = F.normalize(m.encode_text(inputs), dim=-1)
    assert logits is None
    torch.testing.assert_close(loss.detach(), 1000.0 * F.mse_loss(pred, target), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert m.ctx.grad is not None and all(p.grad is not None for p in m.deep_text)
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    with torch.no_grad():  # the image tower is frozen CLIP
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(m.encode_image(x), tiny_backbone.model.visual(x))


def test_context_init_follows_the_reference_rule(tiny_backbone):
    torch.manual_seed(0)
    four = create_method("protext", tiny_backbone, {"n_ctx": 4}, CLASSES)
    phrase = tiny_backbone.model.token_embedding(tiny_backbone.tokenizer(["a photo of a"])[0, 1:5])
    assert torch.allclose(four.ctx, phrase)
    eight = create_method("protext", tiny_backbone, {"n_ctx": 8}, CLASSES)  # longer than the phrase: random, X slots
    assert eight.prompt_templates() == ["X X X X X X X X {}."] and eight.ctx.std() < 0.05


def test_fp16_flag_rounds_the_deep_prompts_like_the_reference(tiny_backbone):
    m = _make(tiny_backbone, fp16_deep_prompts=True)
    with torch.no_grad():
        m.deep_text[0].add_(1e-4 * torch.randn_like(m.deep_text[0]))  # values fp16 cannot hold exactly
    _, deep = m.text_prompts()
    assert torch.equal(deep[0], m.deep_text[0].half().float()) and not torch.equal(deep[0], m.deep_text[0])
    _, plain = _make(tiny_backbone).text_prompts()
    assert plain[0] is not None and plain[0].dtype == torch.float32


def test_train_job_records_the_descriptions_and_learns(colour_root, tmp_path):
    from training.jobs import train_job

    desc = colour_root / "descriptions.json"
    run = train_job("protext", "test-tiny", f"folder:{colour_root}", 2, 1, tmp_path / "run", descriptions=desc,
                    train_options={"epochs": 6, "batch_size": 4, "warmup_epochs": 1, "lr": 0.01}, progress=False)
    info = json.loads((run.path / "run.json").read_text())
    assert info["descriptions"]["source"] == str(desc.resolve()) and len(info["descriptions"]["sha256"]) == 64
    log = [json.loads(line) for line in (run.path / "train_log.jsonl").read_text().splitlines()]
    assert all(r["acc"] is None for r in log) and log[-1]["loss"] < log[0]["loss"]
    # a changed description file is a different run
    desc2 = tmp_path / "other.json"
    desc2.write_text(json.dumps({k: v[:1] for k, v in colour_descriptions().items()}))
    with pytest.raises(RunError, match="different run"):
        train_job("protext", "test-tiny", f"folder:{colour_root}", 2, 1, tmp_path / "run", descriptions=desc2,
                  train_options={"epochs": 6, "batch_size": 4, "warmup_epochs": 1, "lr": 0.01}, progress=False)


def test_descriptions_are_required_and_only_where_used(colour_root, tmp_path):
    from training.jobs import train_job

    with pytest.raises(RunError, match="pass --descriptions FILE"):
        train_job("protext", "test-tiny", f"folder:{colour_root}", 2, 1, tmp_path / "a", progress=False)
    with pytest.raises(RunError, match="does not use class descriptions"):
        train_job("coop", "test-tiny", f"folder:{colour_root}", 2, 1, tmp_path / "b",
                  descriptions=colour_root / "descriptions.json", progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "an object"]')
    with pytest.raises(RunError, match="--descriptions"):
        train_job("protext", "test-tiny", f"folder:{colour_root}", 2, 1, tmp_path / "c", descriptions=bad, progress=False)
    assert not (tmp_path / "a" / "run.json").exists()  # nothing written for a refused job


def test_benchmark_runs_default_to_the_shipped_descriptions():
    from training.jobs import job_info

    info = job_info("protext", "test-tiny", "emoji-nature", 16, 1, None, None)
    assert info.descriptions["kind"] == "benchmark" and info.descriptions["source"] == "emoji-nature"
