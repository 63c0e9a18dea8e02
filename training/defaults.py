"""The default served model: zero-shot CLIP on the embedded ``emoji-vit-s`` backbone (its latest version).

``promptbake serve`` without ``--artifact`` serves this artifact. It is built on first use (a
zero-shot "run" needs no training; the export checks parity on benchmark test images) and kept
under ``$PROMPTBAKE_HOME/artifacts`` (default ``~/.cache/promptbake/artifacts``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

# the names live torch-free and dependency-free in training.constants (re-exported here)
from training.constants import (
    DEFAULT_ARTIFACT_NAME,
    DEFAULT_BACKBONE,
    DEFAULT_BACKBONE_VERSION,
    EMOJI_VIT_S_VERSIONS,
    PARITY_DATASET,
)

__all__ = ["DEFAULT_ARTIFACT_NAME", "DEFAULT_BACKBONE", "DEFAULT_BACKBONE_VERSION", "EMOJI_VIT_S_VERSIONS",
           "PARITY_DATASET", "artifacts_home", "ensure_default_artifact"]

logger = logging.getLogger(__name__)


def artifacts_home() -> Path:
    home = os.environ.get("PROMPTBAKE_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "promptbake") / "artifacts"


def ensure_default_artifact() -> Path:
    """The default artifact directory, exported now if it is missing or fails verification."""
    from exports.manifest import ArtifactError, load_artifact

    art = artifacts_home() / DEFAULT_ARTIFACT_NAME
    try:
        load_artifact(art)
        return art
    except (ArtifactError, FileNotFoundError, OSError):
        pass
    from training.export import export_run
    from training.jobs import train_job

    logger.info("building the default artifact %s (zero-shot %s; first use only)", art, DEFAULT_BACKBONE_VERSION)
    run = train_job("zeroshot", DEFAULT_BACKBONE_VERSION, PARITY_DATASET, 16, 1, artifacts_home() / f".{DEFAULT_ARTIFACT_NAME}-run",
                    progress=False)
    export_run(run.path, art, overwrite=True)
    return art
