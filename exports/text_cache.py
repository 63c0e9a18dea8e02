"""Class-name embeddings, cached per normalised name with a bound on entries.

The one text cache: :class:`exports.runtime.Predictor` keeps one, and the service uses the
Predictor's. Per name rather than per list: a client that adds one name to a 1,000-name list pays for one
name. Keys are normalised the way the tokenizer would see them anyway (Unicode NFC, whitespace
collapsed, lower-cased), and the *normalised* name is what gets embedded, so a cached vector is a
pure function of its key. Memory: ``max_names x embed_dim x 4`` bytes plus ~100 bytes of key per
entry (20,000 names x 512 dims = 41 MB).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from exports.scoring import normalize_name

__all__ = ["TextEmbeddingCache", "normalize_name"]


class TextEmbeddingCache:
    """LRU of ``normalised name -> [...] float32`` in front of ``embed(names) -> [C, ...]`` (one row per name).

    Thread-safe; two requests missing the same name at once both compute it (no waiting on each
    other), and the second write is a no-op.
    """

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], max_names: int):
        if max_names < 1:
            raise ValueError("max_names must be >= 1")
        self._embed = embed
        self.max_names = max_names
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, keys: Sequence[str], embed: Callable[[Sequence[str]], np.ndarray] | None = None,
            compute: bool = True) -> tuple[np.ndarray | None, int, int]:
        """``[C, ...]`` rows of already-normalised ``keys``; also (hits, misses) of this call.

        ``embed`` replaces the cache's own function for this call's misses (keys that stand for a
        name and its descriptions are embedded by the caller, who knows what a key means).
        ``compute=False`` embeds nothing: ``(None, 0, 0)`` unless every key is cached (counted as
        hits), for a caller that can answer a fully cached request without leaving its thread.
        """
        found: dict[str, np.ndarray] = {}
        with self._lock:
            if not compute and any(k not in self._entries for k in keys):
                return None, 0, 0
            for k in keys:
                v = self._entries.get(k)
                if v is not None:
                    self._entries.move_to_end(k)
                    found[k] = v
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            fresh = (embed or self._embed)(missing)  # [M, D], outside the lock: can take seconds
            with self._lock:
                for k, v in zip(missing, fresh):
                    v = np.array(v, dtype=np.float32)
                    v.setflags(write=False)
                    self._entries[k] = v
                    found[k] = v
                while len(self._entries) > self.max_names:
                    self._entries.popitem(last=False)
        hits, misses = len(keys) - len(missing), len(missing)
        with self._lock:
            self.hits += hits
            self.misses += misses
        return np.stack([found[k] for k in keys]), hits, misses
