"""Cosine k-means, as the ``kmeans-pytorch`` package computes it (TAC clusters class embeddings with it).

The package (0.3, what TAC's requirements install) starts from ``k`` distinct data points drawn at
random, assigns each point to the centre of highest cosine similarity, moves each centre to the
plain (not re-normalised) mean of its points and stops when the squared sum of the centre shifts
falls below ``tol``. Two deliberate differences: a centre that loses all its points stays where it
was (the package's becomes NaN), and ``max_iter`` bounds the loop (the package has no bound).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_kmeans(x: torch.Tensor, k: int, *, tol: float = 1e-4, max_iter: int = 1000,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, D] -> (centres [k, D] as the loop leaves them (not normalised), assignment [N]); k <= N."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"k-means needs points [N, D] with N >= 1, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    x = x.float()
    n = x.shape[0]
    if k > n:
        raise ValueError(f"{k} clusters of {n} points: k must be <= the number of points")
    unit = F.normalize(x, dim=-1)
    centres = x[torch.randperm(n, generator=generator)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(max_iter):
        assign = (unit @ F.normalize(centres, dim=-1).t()).argmax(dim=1)
        previous = centres.clone()
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centres[c] = members.mean(dim=0)
        shift = (centres - previous).norm(dim=1).sum() ** 2
        if shift < tol:
            break
    return centres, assign
