"""ATPrompt's differentiable attribute search: which attribute words to anchor a dataset's prompts on.

Follows ``trainers/attributecompute.py`` of zhengli97/ATPrompt at 86980a1 (run by
``train_select_attribute.py`` and ``scripts/attribute_compute/main.sh``; ``docs/Attribute_Search.md``):

- Candidates: a few attribute words (the reference asks GPT-4o for 5 per dataset). Every combination
  of them of a size in ``sizes`` (in candidate order) gets its own ATPrompt prompt on CoOp: its own
  class context (4 tokens) and one block (4 tokens) per attribute, random init.
- Forward: the logits are the softmax(alpha)-weighted sum of the combinations' CoOp logits.
- Alternating first-order updates, every step: the prompts by SGD (lr 0.002, momentum 0.9, weight
  decay 5e-4, 1 warm-up epoch at 1e-5, cosine) on a few-shot *train* batch of the base classes; then
  alpha by Adam (lr 0.02, betas (0.5, 0.999), no decay) on a batch of the few-shot *val* split.
- 40 epochs, batch 32, 16 shots, seed 1 (``main.sh``); the proposal is the combination with the
  largest weight after the last epoch (the docs: "the highest confidence in the last epoch").

Candidates on the emoji benchmark: the CLDR keywords of the base classes' shipped attribute trees
(:mod:`training.benchmark.descriptions`), the ``top`` words that the most base classes share (ties
by word), so the search proposes attributes from curated data rather than a language model.

Deliberate deviations (each a quirk of the reference):
- Sizes: the reference keeps only combinations of 3 or more (``if r > 2``) although its comments and
  docs search sizes 1-4 and recommend 1-3; the default here is 1-3 (``sizes=(3, 4, 5)`` is the code).
- The val batch: the reference rebuilds ``next(iter(val_loader))`` every step, a sequential loader,
  so alpha only ever sees the first 100 val images; here val batches cycle through the whole
  shuffled val split.
- alpha starts at zero (uniform weights); the reference draws ``torch.rand`` (not seeded separately).
- Precision fp32 (the search script's own setting) and no AMP.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.backbones import create_backbone
from training.config import TrainConfig
from training.data import SampleDataset, load_dataset, sample_few_shot, split_base_novel
from training.data.transforms import build_eval_transform, build_train_transform
from training.loop import learning_rate, resolve_device
from training.methods import PromptMethod, create_method  # (importing the package registers the methods)

logger = logging.getLogger(__name__)

#: the reference's search settings (``main.sh``, ``attributecompute.py``)
SEARCH_DEFAULTS = {"epochs": 40, "batch_size": 32, "lr": 0.002, "alpha_lr": 0.02, "n_ctx": 4, "n_att": 4}


def keyword_candidates(trees: dict[str, dict[str, list[str]]], top: int) -> list[str]:
    """The ``top`` keywords shared by the most classes of attribute trees (``{"class": {"keywords":
    ["{class}, {keyword}.", ...]}}``, the emoji benchmark's), most shared first, ties by word; words
    of one class only are no attribute and are left out."""
    counts: Counter[str] = Counter()
    for name, tree in trees.items():
        words = set()
        for sentence in tree.get("keywords", []):
            word = sentence.removeprefix(f"{name}, ").removesuffix(".").strip().lower()
            if word and word != name.lower():
                words.add(word)
        counts.update(words)
    ranked = sorted((w for w, n in counts.items() if n >= 2), key=lambda w: (-counts[w], w))
    return ranked[:top]


def combinations(candidates: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    """Every combination of ``candidates`` (kept in candidate order) of each size in ``sizes``."""
    return [c for r in sizes for c in itertools.combinations(candidates, r)]


@dataclass
class SearchResult:
    combinations: list[tuple[str, ...]]
    weights: list[float]  # softmax(alpha) after the last epoch, same order
    history: list[list[float]]  # the weights after every epoch

    @property
    def proposal(self) -> tuple[str, ...]:
        return self.combinations[max(range(len(self.weights)), key=self.weights.__getitem__)]

    def to_dict(self) -> dict:
        order = sorted(range(len(self.weights)), key=lambda i: -self.weights[i])
        return {"proposal": list(self.proposal),
                "ranking": [{"attributes": list(self.combinations[i]), "weight": self.weights[i]} for i in order],
                "history": self.history}


class AttributeMixture(nn.Module):
    """One ATPrompt (CoOp host) per combination, mixed by softmax(alpha) at the logits."""

    def __init__(self, prompts: Sequence[PromptMethod]):
        super().__init__()
        self.prompts = nn.ModuleList(prompts)
        self.alpha = nn.Parameter(torch.zeros(len(prompts)))

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.prompts for p in m.parameters() if p.requires_grad]

    def logits(self, image_features: torch.Tensor, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        weights = self.alpha.softmax(dim=0)
        return sum(w * m.logits_from_features(image_features, t) for w, m, t in zip(weights, self.prompts, tokens))


def search_attributes(
    backbone: str,
    dataset: str,
    candidates: Sequence[str],
    *,
    sizes: Sequence[int] = (1, 2, 3),
    shots: int = 16,
    seed: int = 1,
    epochs: int = SEARCH_DEFAULTS["epochs"],
    batch_size: int = SEARCH_DEFAULTS["batch_size"],
    device: str = "auto",
) -> SearchResult:
    """Run the search on the ``shots``-shot base classes of ``dataset`` (see the module doc)."""
    combos = combinations(list(dict.fromkeys(candidates)), sorted(set(sizes)))
    if len(combos) < 2:
        raise ValueError(f"{len(combos)} attribute combination(s) from {list(candidates)} and sizes {list(sizes)}: "
                         "a search needs at least 2")
    base, _ = split_base_novel(load_dataset(dataset))
    dev = resolve_device(device)
    torch.manual_seed(seed)
    bb = create_backbone(backbone)
    host = json.dumps({"n_ctx": SEARCH_DEFAULTS["n_ctx"]})
    prompts = [create_method("atprompt", bb, {"host": "coop", "host_options": host, "attributes": c,
                                              "n_att": SEARCH_DEFAULTS["n_att"]}, base.classnames) for c in combos]
    model = AttributeMixture(prompts).to(dev)
    tokens = [m.tokenize(base.classnames).to(dev) for m in prompts]
    train_set = SampleDataset(sample_few_shot(base.train, shots, seed), build_train_transform(bb.preprocess))
    val_samples = sample_few_shot(base.val, min(shots, 4), seed) if base.val else sample_few_shot(base.train, min(shots, 4), seed + 1)
    val_set = SampleDataset(val_samples, build_eval_transform(bb.preprocess))
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=min(100, len(val_set)), shuffle=True, generator=generator)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=SEARCH_DEFAULTS["lr"])
    prompt_opt = torch.optim.SGD(model.prompt_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    alpha_opt = torch.optim.Adam([model.alpha], lr=SEARCH_DEFAULTS["alpha_lr"], betas=(0.5, 0.999), weight_decay=0.0)
    encode = prompts[0].clip.encode_image  # the CoOp host leaves the image tower frozen: one pass per batch

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return encode(x.to(dev))

    val_iter = iter(val_loader)
    history = []
    logger.info("attribute search on %s: %d combinations of %s, %d epochs", dataset, len(combos), list(candidates), epochs)
    for epoch in range(epochs):
        for group in prompt_opt.param_groups:
            group["lr"] = learning_rate(cfg, epoch)
        model.train()
        for x, y in train_loader:
            loss = F.cross_entropy(model.logits(features(x), tokens), y.to(dev))
            prompt_opt.zero_grad(set_to_none=True)
            model.alpha.grad = None
            loss.backward()
            prompt_opt.step()
            try:
                vx, vy = next(val_iter)
            except StopIteration:
                val_iter = iter(val_loader)
                vx, vy = next(val_iter)
            alpha_loss = F.cross_entropy(model.logits(features(vx), tokens), vy.to(dev))
            alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward(inputs=[model.alpha])
            alpha_opt.step()
        weights = model.alpha.detach().softmax(dim=0).cpu().tolist()
        history.append(weights)
        best = max(range(len(weights)), key=weights.__getitem__)
        logger.info("epoch %d/%d: loss %.3f, leading %s (%.3f)", epoch + 1, epochs, float(loss.detach()), list(combos[best]), weights[best])
        if not all(math.isfinite(w) for w in weights):
            raise RuntimeError("the attribute weights became non-finite; lower the learning rate")
    return SearchResult(combos, history[-1] if history else [1.0 / len(combos)] * len(combos), history)


def write_result(result: SearchResult, path: str | Path) -> None:
    """The result as JSON, written to a temporary file and renamed (never half-written)."""
    from training.runs import atomic_write_json

    atomic_write_json(Path(path), result.to_dict())
