"""The documentation's Python example runs as written (on the embedded backbone, offline)."""
from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_python_api_example_runs(capsys):
    text = (DOCS / "python-api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/python-api.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert re.search(r"base \d+\.\d  novel \d+\.\d  HM \d+\.\d", out)
    assert re.search(r"truth '.+', predicted '.+' \(\d\.\d\d\)", out)


def test_the_python_api_page_names_functions_that_exist():
    import importlib

    text = (DOCS / "python-api.md").read_text()
    named = set(re.findall(r"`((?:training|exports)(?:\.\w+)+)\.(\w+)[(`]", text))
    assert len(named) >= 15
    for module, name in named:
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
