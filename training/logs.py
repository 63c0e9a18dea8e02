"""Logging for promptbake's commands: its own loggers at INFO (DEBUG with ``-v``), everyone else's at WARNING.

open_clip, onnxruntime's Python helpers, BentoML and the ONNX exporter log routine steps at INFO
("Using default SimpleTokenizer.", one line per loaded model); under a root logger at INFO they
flooded every command's output. Standard library only.
"""
from __future__ import annotations

import logging

#: the top-level packages whose loggers are promptbake's
OWN_PACKAGES = ("training", "exports", "service")
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(verbose: bool = False, fmt: str = DEFAULT_FORMAT) -> None:
    """Root (third-party) at WARNING, or INFO with ``verbose``; promptbake's packages at INFO, or DEBUG."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format=fmt)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OWN_PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
