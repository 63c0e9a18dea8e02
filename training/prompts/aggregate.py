"""Weighted averages of a method's learned tensors over the ends of its epochs.

PromptSRC keeps a Gaussian-weighted sum of its prompts (GPA), TAC a uniform one; both finish with
the average instead of the last epoch's tensors. The running sum is training state: a resumed run
reaches the same average as an uninterrupted one (the TAC reference's does not).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch


class SnapshotAverage:
    """A running sum of ``weight * tensors`` added at epoch ends.

    Args:
        prefix: the key prefix of its tensors in the training state (``"gpa"`` -> ``gpa/<name>``).
        names: the learned tensors it averages (None: all it is given); others are left alone
            (TAC's cluster centres are fixed, and an average of equal fp32 copies is not exactly them).
    """

    def __init__(self, prefix: str, names: Iterable[str] | None = None) -> None:
        self.prefix = prefix
        self.names = None if names is None else frozenset(names)
        self.sum: dict[str, torch.Tensor] = {}

    def _keep(self, name: str) -> bool:
        return self.names is None or name in self.names

    def add(self, learned: Mapping[str, torch.Tensor], weight: float) -> None:
        for name, value in learned.items():
            if self._keep(name):
                weighted = value.detach() * weight
                self.sum[name] = weighted.clone() if name not in self.sum else self.sum[name] + weighted

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}/{k}": v for k, v in self.sum.items()}

    def load(self, state: Mapping[str, torch.Tensor], learned: Mapping[str, torch.Tensor], owner: str) -> None:
        """Restore the sum from :meth:`state`'s tensors; ``learned`` (the method's learned state) gives
        the names, devices and dtypes it must fit."""
        summed = {k.removeprefix(f"{self.prefix}/"): v for k, v in state.items()}
        expected = {k for k in learned if self._keep(k)}
        if any(not k.startswith(f"{self.prefix}/") for k in state) or (summed and set(summed) != expected):
            raise ValueError(f"{owner} training state does not fit: got {sorted(state)}")
        self.sum = {k: v.to(learned[k].device, learned[k].dtype).clone() for k, v in summed.items()}

    def average(self, learned: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``learned`` with the averaged tensors in place of their current values (unchanged when
        nothing was added)."""
        return {k: self.sum.get(k, v) for k, v in learned.items()}

    def apply(self, method: Any) -> dict[str, torch.Tensor]:
        """A finished run's ``final_learned_state``: the average loaded into ``method`` (as the
        references do) when anything was added, then its learned state."""
        if self.sum:
            method.load_learned_state(self.average(method.learned_state()))
        return method.learned_state()
