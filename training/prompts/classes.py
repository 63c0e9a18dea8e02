"""Which classes a training step scores when there are many (LwEIB's class negative sampling, TAP's
80-class text steps): the batch's own classes and others drawn at random."""
from __future__ import annotations

import torch


def step_classes(labels: torch.Tensor, n_classes: int, n_others: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes [C'], labels remapped into them)``: the batch's classes in order, then ``n_others``
    (at most all the rest) drawn uniformly without replacement from the others with the global
    generator (the loop seeds it per epoch)."""
    pos, remapped = torch.unique(labels, sorted=True, return_inverse=True)
    others = torch.ones(n_classes, dtype=torch.bool, device=labels.device)
    others[pos] = False
    rest = others.nonzero().squeeze(1)
    neg = rest[torch.randperm(len(rest), device=labels.device)[: max(0, min(len(rest), n_others))]]
    return torch.cat([pos, neg]), remapped
