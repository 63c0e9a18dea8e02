"""Backbones as users have them: open_clip's hf-hub: (from the local Hugging Face cache) and local-dir: specs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from training.backbones import BackboneError, create_backbone

TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _write_model(folder, tiny):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CFG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}}))
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def _same_model(bb, tiny):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model.encode_image(x), tiny.model.encode_image(x))
        tokens = bb.tokenizer(["a photo of a red apple."])
        torch.testing.assert_close(bb.model.encode_text(tokens), tiny.model.encode_text(tokens))


def test_local_dir_backbone_loads_config_weights_and_preprocessing(tiny_backbone, tmp_path):
    _write_model(tmp_path / "tiny", tiny_backbone)
    bb = create_backbone(f"local-dir:{tmp_path / 'tiny'}")
    _same_model(bb, tiny_backbone)
    assert tuple(bb.preprocess.mean) == (0.5, 0.5, 0.5) and bb.spec == f"local-dir:{tmp_path / 'tiny'}"
    with pytest.raises(BackboneError, match="no open_clip_config.json"):
        create_backbone(f"local-dir:{tmp_path / 'missing'}")


def test_hf_hub_backbone_reads_the_local_cache_offline(tiny_backbone, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--promptbake--tiny-clip"
    _write_model(repo / "snapshots" / "0123abcd", tiny_backbone)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _same_model(create_backbone("hf-hub:promptbake/tiny-clip"), tiny_backbone)
    with pytest.raises(BackboneError, match="local Hugging Face cache"):
        create_backbone("hf-hub:promptbake/not-cached")
