"""Base-to-novel evaluation, as the CoCoOp protocol defines it.

Base accuracy: base test images classified among the base names only. Novel accuracy: novel test
images among the novel names only. HM = 2·B·N / (B + N). Accuracies are in percent.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from exports import scoring
from training.data import Sample, SampleDataset, build_eval_transform
from training.protocol import PromptMethod

logger = logging.getLogger(__name__)


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


@torch.no_grad()
def predict_samples(
    method: PromptMethod,
    samples: Sequence[Sample],
    classnames: Sequence[str],
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "eval",
    mode: str = "auto",
    descriptions: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Predicted label (index into ``classnames``) for every sample.

    Logits come from the method's declared outputs through :func:`exports.scoring.head_logits`, the
    function the runtime and the service score with; ``mode`` (``auto``: the names the method was
    trained on are base) picks the heads of methods with a base/novel switch, as the papers do at
    test time (base names on the base test set, novel names on the novel one). ``descriptions``:
    for methods that embed classes from them.
    """
    device = torch.device(device)
    method.to(device).eval()
    tokens = method.tokenize(classnames, descriptions).to(device)
    conditioned = method.capabilities.text_depends_on_image
    heads = method.graph_signature().heads
    is_base = scoring.base_mask(classnames, method.train_classnames, mode)
    scale = float(method.logit_scale())
    scored = method.graph_signature().scored  # image-independent class outputs, then a score function (TAP, CPR)
    text = None if conditioned else {k: v.float().cpu().numpy() for k, v in method.text_outputs(tokens).items()}
    class_outputs = method.text_outputs(tokens) if scored else None
    loader = DataLoader(SampleDataset(samples, build_eval_transform(method.backbone.preprocess)),
                        batch_size=batch_size, shuffle=False, num_workers=workers)
    preds = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = x.to(device)
        if scored:
            logits = method.score_outputs(method.image_outputs(x), class_outputs).float().cpu().numpy()
        elif conditioned:
            logits = method.logits_from_outputs(method.image_outputs(x), tokens).float().cpu().numpy()
        else:
            image = {k: v.float().cpu().numpy() for k, v in method.image_outputs(x).items()}
            logits = scoring.head_logits(image, text, heads, is_base, scale)
        preds.append(torch.from_numpy(logits.argmax(-1)))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy_report(preds: torch.Tensor, samples: Sequence[Sample], classnames: Sequence[str]) -> dict:
    """Overall accuracy and per-class accuracy (percent) of predictions against sample labels."""
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    correct = preds == labels
    per_class = {}
    for i, name in enumerate(classnames):
        mask = labels == i
        per_class[name] = 100.0 * float(correct[mask].float().mean()) if mask.any() else math.nan
    return {"acc": 100.0 * float(correct.float().mean()) if len(samples) else math.nan, "n": len(samples), "per_class": per_class}
