"""Torch-free CLIP BPE tokenizer, token-for-token equal to open_clip's ``SimpleTokenizer``.

open_clip's tokenizer returns torch tensors and lives in a package that imports torch, so the
service cannot use it. This module reproduces its default behaviour for the OpenAI CLIP text towers
('lower' cleaning, truncation with EOT in the last slot) and returns numpy arrays instead.
``tests/test_tokenizer_preprocess.py`` checks equality against open_clip 3.3.0.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex

logger = logging.getLogger(__name__)

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77

_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_END_OF_WORD = "</w>"
# CLIP uses the first 49152 - 256 - 2 merges of the file (the file holds ~262k); with the 256 byte
# symbols, their 256 end-of-word forms and the 2 special tokens the vocabulary has 49408 entries.
_NUM_MERGES = 49152 - 256 - 2
_BPE_CACHE_SIZE = 1 << 16

# Special tokens come first so a literal "<start_of_text>" in the input maps to its id, as in
# open_clip; then English contractions, letter runs, single digits and runs of other symbols.
_PATTERN = regex.compile(
    rf"{regex.escape(_SOT)}|{regex.escape(_EOT)}"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


@functools.cache
def _byte_alphabet() -> tuple[list[int], dict[int, str]]:
    """Byte-level BPE alphabet (GPT-2 / CLIP).

    Returns:
        The 256 byte values in vocabulary order, and a map from each byte to a printable character.
        Printable Latin-1 bytes stand for themselves; the other 68 bytes (whitespace, control
        characters) become ``chr(256 + k)`` in ascending byte order, so BPE never sees them raw.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    printable_set = set(printable)
    others = [b for b in range(256) if b not in printable_set]
    to_char = {b: chr(b) for b in printable}
    to_char.update({b: chr(256 + k) for k, b in enumerate(others)})
    return printable + others, to_char


def _clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, double HTML unescape, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class Tokenizer:
    """CLIP byte-level BPE tokenizer producing ``[N, context_length]`` int64 arrays.

    Args:
        bpe_path: The gzipped merges file (``bpe_simple_vocab_16e6.txt.gz``).
        context_length: Tokens per row, SOT and EOT included.
    """

    def __init__(self, bpe_path: str | os.PathLike[str], context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        self._context_length = int(context_length)

        byte_order, self._byte_to_char = _byte_alphabet()
        merges = self._read_merges(Path(bpe_path))
        symbols = [self._byte_to_char[b] for b in byte_order]
        vocab = [*symbols, *(s + _END_OF_WORD for s in symbols), *("".join(m) for m in merges), _SOT, _EOT]
        self._encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self._ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self._special = {_SOT: self._encoder[_SOT], _EOT: self._encoder[_EOT]}
        # Per-instance bounded cache: a word's BPE ids never change for a given merges file.
        self._word_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._bpe_ids)

    @staticmethod
    def _read_merges(path: Path) -> list[tuple[str, str]]:
        # Line 0 is a version header; only the first _NUM_MERGES merges after it are read.
        with gzip.open(path, "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in itertools.islice(f, 1, 1 + _NUM_MERGES)]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path} is not a CLIP BPE merges file ({len(merges)} merges read)")
        return merges  # type: ignore[return-value]

    @classmethod
    def from_open_clip_vocab(cls, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
        """Build from the merges file shipped inside the installed open_clip package.

        open_clip is located with ``importlib.util.find_spec`` and never imported, so this stays
        torch-free.

        Raises:
            ModuleNotFoundError: open_clip is not installed.
            FileNotFoundError: open_clip is installed but has no vocabulary file.
        """
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"open_clip is not installed, so its {VOCAB_FILENAME} cannot be found; "
                "install open_clip_torch or pass the vocabulary path to Tokenizer(bpe_path)."
            )
        locations = list(spec.submodule_search_locations)
        for location in locations:
            candidate = Path(location) / VOCAB_FILENAME
            if candidate.is_file():
                logger.debug("using CLIP vocabulary %s", candidate)
                return cls(candidate, context_length)
        raise FileNotFoundError(f"{VOCAB_FILENAME} not found in the open_clip package at {locations}")

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def sot_token_id(self) -> int:
        return self._special[_SOT]

    @property
    def eot_token_id(self) -> int:
        return self._special[_EOT]

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Merge one byte-encoded word, lowest-ranked adjacent pair first, until no pair merges."""
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, _NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._encoder[p] for p in parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT and without truncation."""
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            special = self._special.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._word_ids("".join(self._byte_to_char[b] for b in piece.encode("utf-8"))))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize one string or a sequence of strings.

        Returns:
            int64 array ``[N, context_length]``: SOT, tokens, EOT, then zeros. A row that does not
            fit is cut to ``context_length`` with EOT in the last slot.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self._context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self._context_length:
                ids = ids[: self._context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out
