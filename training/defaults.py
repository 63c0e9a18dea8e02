"""The default served model: zero-shot CLIP on the embedded ``emoji-vit-s`` backbone (its latest version).

``promptbake serve`` without ``--artifact`` serves this artifact. It is built on first use (a
zero-shot "run" needs no training; the export checks parity on benchmark test images) and kept
under ``$PROMPTBAKE_HOME/artifacts`` (default ``~/.cache/promptbake/artifacts``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Shipped versions of the embedded backbone's weights, oldest first (``training/weights/emoji-vit-s-vN``);
# the bare name ``emoji-vit-s`` means the last. Kept here, torch-free, so that `promptbake serve` can name
# the default artifact without importing torch.
EMOJI_VIT_S_VERSIONS = ("v1", "v2")
DEFAULT_BACKBONE = "emoji-vit-s"
DEFAULT_BACKBONE_VERSION = f"{DEFAULT_BACKBONE}-{EMOJI_VIT_S_VERSIONS[-1]}"
# named by the version: a new version is exported anew instead of serving a cached older one
DEFAULT_ARTIFACT_NAME = f"{DEFAULT_BACKBONE_VERSION}-zeroshot"
PARITY_DATASET = "emoji-nature"


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
