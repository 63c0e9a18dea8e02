"""The text tower's shared-prefix path (training/prompts/text.py): the same features and gradients
as running every row in full, and refused wherever it would not be exact."""
from __future__ import annotations

import pytest
import torch

from training.methods import create_method
from training.prompts.text import MIN_SHARED_PREFIX, encode_text_embeddings, every_row_in_full, shared_prefix_length

NAMES = ["red", "green", "blue", "dark yellow", "cyan", "light magenta"]


@pytest.fixture()
def coop(tiny_backbone):
    torch.manual_seed(0)
    return create_method("coop", tiny_backbone, {"ctx_init": "", "n_ctx": 8}, NAMES)


def _mask(clip, length):
    return clip.attn_mask[:length, :length]


def test_shared_prefix_gives_the_full_towers_features_and_gradients(coop):
    tokens = coop.tokenize(NAMES)[0]
    emb, eot = coop.prompt_embeddings(tokens)
    assert shared_prefix_length(coop.clip, emb, eot, _mask(coop.clip, tokens.shape[1])) == 1 + 8  # start + context
    results = []
    for share in (False, True):
        coop.ctx.grad = None
        emb, eot = coop.prompt_embeddings(tokens)
        feats = encode_text_embeddings(coop.clip, emb, eot, share_prefix=share)
        (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward()
        results.append((feats.detach(), coop.ctx.grad.clone()))
    (f0, g0), (f1, g1) = results
    assert torch.allclose(f0, f1, atol=1e-5, rtol=1e-5), (f0 - f1).abs().max()
    assert (g0 - g1).abs().max() <= 1e-5 * g0.abs().max(), (g0 - g1).abs().max()  # float rounding only
    assert g0.abs().sum() > 0


def test_shared_prefix_is_refused_where_it_would_not_be_exact(coop):
    tokens = coop.tokenize(NAMES)[0]
    emb, eot = coop.prompt_embeddings(tokens)
    mask = _mask(coop.clip, tokens.shape[1])
    clip = coop.clip
    with torch.no_grad():
        assert shared_prefix_length(clip, emb[:1], eot[:1], mask) == 0  # one row: nothing to share
        different = emb.clone()
        different[1, MIN_SHARED_PREFIX - 1] += 1.0  # rows differ before the smallest useful prefix
        assert shared_prefix_length(clip, different, eot, mask) == 0
        assert shared_prefix_length(clip, emb, torch.full_like(eot, 6), mask) == 6  # capped before every end of text
        assert shared_prefix_length(clip, emb, eot, torch.zeros_like(mask)) == 0  # not causal
        assert shared_prefix_length(clip, emb, eot, None) == 0
    for module in (clip.transformer.resblocks[0].mlp, clip.transformer):  # an adapter's hook, on a block or the tower
        for register in (module.register_forward_hook, module.register_full_backward_hook):
            hook = register(lambda *a: None)
            try:
                assert shared_prefix_length(clip, emb, eot, mask) == 0
            finally:
                hook.remove()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # a global one
    try:
        assert shared_prefix_length(clip, emb, eot, mask) == 0
    finally:
        hook.remove()
    assert shared_prefix_length(clip, emb, eot, mask) > 0
    block = clip.transformer.resblocks[0]
    original = block.mlp
    block.mlp = torch.nn.Sequential(torch.nn.Conv1d(1, 1, 3))  # a module that could mix positions
    try:
        assert shared_prefix_length(clip, emb, eot, mask) == 0
    finally:
        block.mlp = original
    seen = []

    def traced(e):
        seen.append(shared_prefix_length(clip, e, eot, mask))
        return e.sum()

    torch.jit.trace(traced, (emb.detach(),), check_trace=False)
    assert seen == [0]  # a traced or exported graph never depends on the example's prefix


def test_every_row_in_full_turns_the_shared_prefix_off(coop, monkeypatch):
    import training.prompts.text as text

    calls = []
    real = text.transformer_shared_prefix
    monkeypatch.setattr(text, "transformer_shared_prefix", lambda *a: calls.append(1) or real(*a))
    tokens = coop.tokenize(NAMES)[0]
    with torch.no_grad():
        emb, eot = coop.prompt_embeddings(tokens)
        shared = encode_text_embeddings(coop.clip, emb, eot, share_prefix=True)
        assert calls == [1]
        with every_row_in_full():  # bench train's reference-style loop
            full = encode_text_embeddings(coop.clip, emb, eot, share_prefix=True)
        assert calls == [1]
        encode_text_embeddings(coop.clip, emb, eot)  # off unless the caller vouches for a shared prefix
        assert calls == [1]
        coop.encode_text(tokens)  # CoOp's one context: it does
        assert calls == [1, 1]
    assert torch.allclose(shared, full, atol=1e-5)


@pytest.mark.parametrize("method,options", [("maple", {"ctx_init": "", "n_ctx": 4}), ("ivlp", {"ctx_init": "", "n_ctx_text": 4})])
def test_deep_text_prompts_share_the_prefix_exactly(tiny_backbone, method, options):
    """Deep prompts replace positions inside the shared prefix before every block: they run once too."""
    import training.prompts.text as text

    torch.manual_seed(0)
    m = create_method(method, tiny_backbone, options, NAMES)
    tokens = m.tokenize(NAMES)[0]
    params = [p for p in m.parameters() if p.requires_grad]
    results, calls = [], []
    real = text.transformer_shared_prefix
    text.transformer_shared_prefix = lambda *a: calls.append(1) or real(*a)
    try:
        import training.prompts.deep as deep

        deep.transformer_shared_prefix = text.transformer_shared_prefix
        for full in (True, False):
            for p in params:
                p.grad = None
            with every_row_in_full() if full else torch.enable_grad():
                feats = m.encode_text(tokens)
                (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward()
            results.append((feats.detach(), [None if p.grad is None else p.grad.clone() for p in params]))
    finally:
        text.transformer_shared_prefix = deep.transformer_shared_prefix = real
    assert calls == [1]  # the shared path ran (once: not under every_row_in_full)
    (f0, g0), (f1, g1) = results
    assert torch.allclose(f0, f1, atol=1e-5, rtol=1e-5)
    deep_grads = 0
    for a, b in zip(g0, g1):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()  # float rounding only
            deep_grads += 1
    assert deep_grads >= 2


def test_class_specific_contexts_that_start_equal_do_not_share_their_prefix(tiny_backbone, monkeypatch):
    """CoOp's class-specific context starts as one phrase repeated per class: equal values, different
    parameters. The shared path would send every class's prefix gradient to class 0 (found in review)."""
    import training.prompts.text as text

    calls = []
    real = text.transformer_shared_prefix
    monkeypatch.setattr(text, "transformer_shared_prefix", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = create_method("coop", tiny_backbone, {"ctx_init": "a photo of a", "class_specific": True}, NAMES)
    assert m.ctx.dim() == 3 and torch.equal(m.ctx[0], m.ctx[1])
    feats = m.encode_text(m.tokenize(NAMES)[0])
    (feats * torch.linspace(-1, 1, feats.shape[-1])).sum().backward()
    assert calls == []
    assert (m.ctx.grad.flatten(1).norm(dim=1) > 0).all()  # every class's context learns


def test_cocoop_shares_one_images_prefix_exactly(tiny_backbone, monkeypatch):
    """CoCoOp at its reference batch of 1: the image-shifted context is one tensor broadcast to every
    class, so it runs once, with the full tower's features and gradients (context and meta-net); a
    batch of several images does not share (each image's prefix differs)."""
    import training.prompts.text as text

    calls = []
    real = text.transformer_shared_prefix
    monkeypatch.setattr(text, "transformer_shared_prefix", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = create_method("cocoop", tiny_backbone, {"ctx_init": "a photo of a"}, NAMES)
    tokens = m.tokenize(NAMES)
    images = torch.randn(2, 3, 32, 32)
    params = [p for p in m.parameters() if p.requires_grad]
    results = []
    for full in (True, False):
        for p in params:
            p.grad = None
        with every_row_in_full() if full else torch.enable_grad():
            logits = m.logits_from_features(m.encode_image(images[:1]), tokens)
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in params]))
    assert calls == [1]
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-4, rtol=1e-5), (l0 - l1).abs().max()
    assert len(g0) >= 2  # the context and the meta-net
    for a, b in zip(g0, g1):
        assert a.abs().max() > 0
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()  # float rounding only
    m.logits_from_features(m.encode_image(images), tokens)
    assert calls == [1]  # two images: every row in full
