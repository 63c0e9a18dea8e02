"""CuPL: a class is the mean of its descriptions' embeddings; descriptions reach the runtime and the cache."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.methods import create_method


def test_class_embedding_is_the_mean_over_its_descriptions_only(tiny_backbone):
    m = create_method("cupl", tiny_backbone, None, ["red"])
    desc = {"red": ["a red thing.", "the colour of blood."], "sky": ["blue above us."]}
    tokens = m.tokenize(["red", "sky"], desc)
    assert tokens.shape[:2] == (2, 2)  # two rows: sky's second row is padding
    with torch.no_grad():
        out = m.class_embeddings(tokens)
        each = F.normalize(tiny_backbone.model.encode_text(tiny_backbone.tokenizer(desc["red"] + desc["sky"])), dim=-1)
    torch.testing.assert_close(out[0], F.normalize(each[:2].mean(0), dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], each[2], atol=1e-5, rtol=1e-5)  # the padding row is left out
    both = create_method("cupl", tiny_backbone, {"templates": ["a photo of a {}."]}, ["red"])  # "CuPL + e"
    assert both.tokenize(["red", "sky"], desc).shape[0] == 3


def test_runtime_caches_a_class_with_its_descriptions(exported):
    from conftest import descriptions_for
    from exports.runtime import Predictor

    _, art = exported("cupl")
    p = Predictor(art)
    a = p.embed_texts(["lime"], {"lime": ["a green citrus fruit."]})
    b = p.embed_texts(["lime"], {"lime": ["a shade of green."]})
    assert not np.allclose(a, b)  # other descriptions, other embedding, though the name is the same
    assert np.allclose(p.embed_texts(["lime"], {"lime": ["a green citrus fruit."]}), a)
    shipped = p.embed_texts(["red"])  # the artifact ships the run's descriptions of its classes
    assert np.allclose(shipped, p.embed_texts(["red"], descriptions_for(["red"])), atol=1e-6)
