"""The FLOP count behind 'fraction of peak' sees attention: it equals the ViT formula."""
from __future__ import annotations

import pytest

from training.backbones import create_backbone
from training.bench.flops import image_gflop, vit_gflop


@pytest.mark.parametrize("name", ["test-tiny", "emoji-vit-s"])
def test_counted_image_flops_equal_the_vit_formula(name):
    bb = create_backbone(name)
    size = bb.preprocess.image_size
    counted = image_gflop(bb.model, size if isinstance(size, int) else size[0])
    assert counted == pytest.approx(vit_gflop(bb.model.visual), rel=1e-9)


def test_the_formula_gives_vit_b16s_known_count():
    import open_clip

    visual = open_clip.create_model("ViT-B-16").visual  # random weights: only the shapes matter
    assert vit_gflop(visual) == pytest.approx(35.127, abs=1e-3)
