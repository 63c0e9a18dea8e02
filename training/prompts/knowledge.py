"""The knowledge-guided family's anchors: frozen-CLIP embeddings of hand-crafted prompts, and distances to them.

KgCoOp (htyao89/KgCoOp at c43ccc3) keeps learned class embeddings close to those of a hand-written
prompt through the frozen CLIP; ProGrad uses the same embeddings as its zero-shot teacher; TCP
feeds them to its class-aware token generator and regularises towards them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from training.protocol import PromptMethod
from training.prompts.text import encode_text_embeddings, eot_positions

HANDCRAFTED_TEMPLATE = "a photo of a {}."


def check_template(template: str, field: str) -> None:
    if template.count("{}") != 1:
        raise ValueError(f"{field} {template!r} must contain exactly one '{{}}'")


def frozen_text_features(method: PromptMethod, tokens: torch.Tensor) -> torch.Tensor:
    """[C, L] tokens of hand-written prompts -> [C, D] normalised frozen-CLIP embeddings (no grad, fp32)."""
    with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
        emb = method.clip.token_embedding(tokens)
        feats = encode_text_embeddings(method.clip, emb, eot_positions(tokens, method.backbone.eot_token_id))
        return F.normalize(feats.float(), dim=-1)


def cached_frozen_text_features(method: PromptMethod, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`frozen_text_features` of ``tokens`` [C, L], remembered on ``method`` while the same tokens
    come back (training repeats one class list every step: TCP's and BIP's hand-crafted anchors). A
    plain attribute, never saved; any other tokens (or device) recompute it."""
    cache = getattr(method, "_frozen_text_cache", None)
    if cache is None or cache[0].shape != tokens.shape or cache[0].device != tokens.device \
            or not torch.equal(cache[0], tokens):
        cache = (tokens.clone(), frozen_text_features(method, tokens))
        method._frozen_text_cache = cache
    return cache[1]


def handcrafted_train_features(method: PromptMethod, template: str, tokens: torch.Tensor) -> torch.Tensor:
    """Frozen-CLIP embeddings [C, D] of ``template`` filled with the method's training class names.

    Like the reference, these are computed once (per device) for the training classes and cached on
    the method; they are not learned state. ``tokens`` [C, L] are the learned-prompt tokens the
    labels index, and must be those of the training classes in order: a loss against other classes'
    hand-crafted embeddings would be silently wrong, so a mismatch is an error.
    """
    cache = getattr(method, "_handcrafted_cache", None)
    if cache is None or cache[0].device != tokens.device or cache[2] != template:
        names = method.train_classnames
        expected = method.tokenize(names)[0].to(tokens.device)
        hand = method.backbone.tokenizer([template.format(c) for c in names]).to(tokens.device)
        cache = (expected, frozen_text_features(method, hand), template)
        method._handcrafted_cache = cache  # a plain attribute: never saved, recomputed on a new device
    expected, feats, _ = cache
    if tokens.shape != expected.shape or not torch.equal(tokens, expected):
        raise ValueError(
            f"{method.name}: the training loss compares with hand-crafted embeddings of the {len(method.train_classnames)} "
            "training classes the method was built with; the tokens given are not those classes' prompts"
        )
    return feats


_ENSEMBLE_CHUNK = 1024  # prompts per frozen text-encoder call


def template_ensemble_features(method: PromptMethod, templates: Sequence[str], names: Sequence[str],
                               device: torch.device) -> torch.Tensor:
    """[C, D]: the frozen CLIP's embeddings of every template filled with every name, averaged over the
    templates *before* normalising (PromptSRC's teacher, SurPL's text target), normalised (no grad, fp32)."""
    tokens = method.backbone.tokenizer([t.replace("{}", c) for t in templates for c in names])
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        feats = torch.cat([method.clip.encode_text(chunk.to(device)) for chunk in tokens.split(_ENSEMBLE_CHUNK)])
    feats = feats.float().view(len(templates), len(names), -1)  # [T, C, D]
    return F.normalize(feats.mean(dim=0), dim=-1)


def class_text_means(method: PromptMethod, texts: Sequence[Sequence[str]], device: torch.device,
                     normalize_each: bool) -> torch.Tensor:
    """[C, D]: per class, the frozen CLIP's text features of its sentences ``texts[c]`` averaged, then
    normalised (no grad, fp32); ``normalize_each`` normalises every sentence's feature before the mean
    (CPR's CuPL prototypes) or not (TAC's description teacher, the mean of raw features)."""
    if any(not t for t in texts):
        raise ValueError("every class needs at least one sentence")
    owner = torch.tensor([c for c, sentences in enumerate(texts) for _ in sentences], device=device)
    tokens = method.backbone.tokenizer([s for sentences in texts for s in sentences])
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        feats = torch.cat([method.clip.encode_text(chunk.to(device)) for chunk in tokens.split(_ENSEMBLE_CHUNK)]).float()
    if normalize_each:
        feats = F.normalize(feats, dim=-1)
    sums = torch.zeros(len(texts), feats.shape[1], device=device).index_add_(0, owner, feats)
    return F.normalize(sums / torch.bincount(owner, minlength=len(texts)).unsqueeze(1), dim=-1)


def knowledge_distance(learned: torch.Tensor, handcrafted: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over classes of the distance between normalised [C, D] embeddings.

    ``"cosine"``: 1 - mean cos (the reference code); ``"squared_l2"``: mean ||a - b||^2 (the paper).
    """
    learned, handcrafted = learned.float(), handcrafted.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(learned, handcrafted, dim=-1, eps=1e-7).mean()
    return (learned - handcrafted).pow(2).sum(dim=-1).mean()
