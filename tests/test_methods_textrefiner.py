"""TextRefiner: the last block's tokens and attention, the concept cache, the refined text, best-val selection."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from training.methods import create_method
from training.prompts.vision import image_tokens

CLASSES = ["red", "green", "blue"]


def _tr(backbone, **options):
    torch.manual_seed(0)
    return create_method("textrefiner", copy.deepcopy(backbone), options or None, CLASSES)


def test_image_tokens_keep_clips_feature_and_give_the_last_blocks_attention(tiny_backbone):
    visual = tiny_backbone.model.visual
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens, attention = image_tokens(visual, x)
        torch.testing.assert_close(tokens[:, 0], visual(x))  # the pooled feature is unchanged
        # nn.MultiheadAttention's own weights (head-averaged) on the last block's input
        from training.prompts.deep import vision_input_tokens

        h = visual.ln_pre(vision_input_tokens(visual, x))
        for block in visual.transformer.resblocks[:-1]:
            h = block(h)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(h)
        _, weights = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
        torch.testing.assert_close(attention, weights[:, 0, 1:])
        torch.testing.assert_close(tokens[:, 1:], visual.ln_post(last(h))[:, 1:] @ visual.proj)
    assert tokens.shape == (3, 17, tiny_backbone.embed_dim) and attention.shape == (3, 16)


def _reference_write(memory, tokens, momentum):
    """The reference's Memory.write as a loop over slots (trainers/textrefiner.py)."""
    x = F.normalize(tokens, dim=-1)
    sim = x @ memory.t()
    pq, pm = sim.softmax(dim=0), sim.softmax(dim=1)
    assign = pm.argmax(dim=1)
    out = memory.clone()
    for i in range(memory.shape[0]):
        idx = (assign == i).nonzero().flatten()
        if len(idx):
            w = pq[idx, i] / pq[:, i].max()
            out[i] = momentum * memory[i] + (1 - momentum) * (w.unsqueeze(1) * x[idx]).sum(0)
    return F.normalize(out, dim=-1)


def test_cache_write_and_read_follow_the_reference(tiny_backbone):
    m = _tr(tiny_backbone, memory_size=6)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(40, tiny_backbone.embed_dim, generator=g)
    want = _reference_write(m.memory.clone(), tokens, 0.8)
    m.write_memory(tokens)
    torch.testing.assert_close(m.memory, want)
    assert not torch.allclose(want, F.normalize(torch.rand(6, tiny_backbone.embed_dim), dim=-1))
    text = F.normalize(torch.randn(3, tiny_backbone.embed_dim, generator=g), dim=-1)
    read = (text @ m.memory.t()).softmax(-1) @ m.memory
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.refine(text), text + 0.2 * m.extractor(torch.cat([text, read], dim=-1)))


def test_training_step_loss_and_the_cache_written_after_the_read(tiny_backbone):
    m = _tr(tiny_backbone).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    tokens = m.tokenize(CLASSES)
    memory = m.memory.clone()
    torch.manual_seed(5)
    probe = copy.deepcopy(m)  # the same module before the step, to recompute the loss by hand
    loss, logits = m.compute_loss(images, labels, tokens)
    assert not torch.equal(m.memory, memory)  # written
    with torch.no_grad():
        tok, attention = image_tokens(probe.clip.visual, images)
        text = probe.host.class_embeddings(tokens)
        refined = probe.refine(text)  # with the cache before the write
        scale = probe.logit_scale()
        want_logits = scale * F.normalize(tok[:, 0], dim=-1) @ F.normalize(refined, dim=-1).t()
        x = probe.local_mlp(tok.reshape(-1, tok.shape[-1])).reshape(tok.shape)
        top = attention.topk(5, dim=-1).indices + 1
        local = torch.cat([x[:, :1], x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1])), x.mean(1, keepdim=True)], 1)
        local_logits = scale * local.reshape(-1, x.shape[-1]) @ text.t()
        want = (F.cross_entropy(want_logits, labels) + F.cross_entropy(local_logits, labels.repeat_interleave(7)) / 50
                + 20 * (F.normalize(refined, dim=-1) - text).abs().mean())
    torch.testing.assert_close(logits, want_logits)
    torch.testing.assert_close(loss, want)
    loss.backward()
    for name in ("host.ctx", "extractor.weight", "local_mlp.0.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    assert "memory" in m.learned_state() and m.memory.grad is None
    with pytest.raises(ValueError, match="cached features"):
        m.compute_loss(torch.randn(4, tiny_backbone.embed_dim), labels, tokens, are_features=True)


def test_test_time_is_clips_image_graph_and_the_refined_text(tiny_backbone):
    m = _tr(tiny_backbone).eval()
    raw = _tr(tiny_backbone, normalize_refined=False).eval()
    raw.load_learned_state(m.learned_state())
    tokens, images = m.tokenize(CLASSES), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.image_outputs(images)["image_embeddings"], F.normalize(m.clip.visual(images), dim=-1))
        refined = m.refine(m.host.class_embeddings(tokens))
        torch.testing.assert_close(m.text_outputs(tokens)["class_embeddings"], F.normalize(refined, dim=-1))
        # the reference scores with the unnormalised refined text: each class its own temperature
        out = raw.text_outputs(tokens)["class_embeddings"]
        torch.testing.assert_close(out, refined)
        assert not torch.allclose(out.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(raw(images, tokens), raw.logit_scale() * F.normalize(raw.clip.visual(images), dim=-1) @ refined.t())


def test_best_val_selection_through_the_cli(colour_root, tmp_path, capsys):
    from training.cli import main

    root = tmp_path / "with-val"
    shutil.copytree(colour_root, root)
    for cls in (root / "train").iterdir():  # a validation split: the test images again
        shutil.copytree(root / "test" / cls.name, root / "val" / cls.name)
    run = tmp_path / "run"
    argv = ["train", "--method", "textrefiner", "--backbone", "test-tiny", "--dataset", f"folder:{root}", "--shots", "2",
            "--epochs", "2", "--batch-size", "4", "--select", "best_val", "--out", str(run), "--no-progress"]
    assert main(argv) == 0
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all(0 <= r["val_acc"] <= 100 for r in log)
    from training.runs import load_tensors

    _, meta = load_tensors(run / "learned.safetensors")
    best = max(range(2), key=lambda i: (log[i]["val_acc"], -i)) + 1
    assert meta["epoch"] == str(best)
    assert json.loads((run / "run.json").read_text())["train"]["select"] == "best_val"
    no_val = tmp_path / "no-val"
    capsys.readouterr()
    assert main([*argv[:6], f"folder:{colour_root}", *argv[7:-3], "--out", str(no_val), "--no-progress"]) != 0
    assert "no validation split for --select best_val" in capsys.readouterr().err
    assert not (no_val / "run.json").exists()  # refused before anything is written
