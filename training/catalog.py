"""What ``promptbake methods`` and ``promptbake backbones`` list, as a committed JSON file read without torch.

The registries live in modules that import torch and open_clip (several seconds before a listing could
print). ``catalog.json`` next to this file holds the same rows; a test fails when it differs from the
live registries, and ``python -m training.catalog`` rewrites it. Loading it imports the standard
library only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("catalog.json")


def build_catalog() -> dict[str, Any]:
    """The rows from the live registries (imports every method and torch)."""
    from training.backbones import list_backbones
    from training.methods import list_methods

    methods = [{"name": spec.name, "description": spec.description,
                "capabilities": spec.method_cls.capabilities_for(spec.config_cls()).to_dict()} for spec in list_methods()]
    return {"methods": methods, "backbones": [{"name": n, "description": d} for n, d in list_backbones()]}


def load_catalog() -> dict[str, Any]:
    return json.loads(CATALOG_FILE.read_text())


def dumps(catalog: dict[str, Any]) -> str:
    return json.dumps(catalog, indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    from training.runs import atomic_write_bytes

    atomic_write_bytes(CATALOG_FILE, dumps(build_catalog()).encode(), mode=0o644)  # package data
    print(f"wrote {CATALOG_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
