"""Names and versions the rest of promptbake agrees on; standard library only, imports nothing of promptbake.

Kept apart from the code that acts on them (``training.defaults`` builds the default artifact), so that
the backbone registry, the CLI's parser and the service's launcher can read them without import circles
or torch.
"""
from __future__ import annotations

# Shipped versions of the embedded backbone's weights, oldest first (``training/weights/emoji-vit-s-vN``);
# the bare name ``emoji-vit-s`` means the last.
EMOJI_VIT_S_VERSIONS = ("v1", "v2")
DEFAULT_BACKBONE = "emoji-vit-s"
DEFAULT_BACKBONE_VERSION = f"{DEFAULT_BACKBONE}-{EMOJI_VIT_S_VERSIONS[-1]}"
# named by the version: a new version is exported anew instead of serving a cached older one
DEFAULT_ARTIFACT_NAME = f"{DEFAULT_BACKBONE_VERSION}-zeroshot"
PARITY_DATASET = "emoji-nature"
