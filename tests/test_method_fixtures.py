"""Every method still computes what it computed before the protocol-v2 port.

``tests/fixtures/method_outputs.safetensors`` was written by ``tests/fixtures/make_method_fixtures.py``
from the ten methods as they stood before their building blocks moved (commit 1eb3db0). Each method
is rebuilt, the stored learned tensors are loaded into it (so the names and shapes of checkpoints
stay loadable), and its eval logits, training loss, gradients and the exporter's encoders must give
the stored numbers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).with_name("fixtures")
_spec = importlib.util.spec_from_file_location("make_method_fixtures", FIXTURES / "make_method_fixtures.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)

STORED = load_file(str(FIXTURES / "method_outputs.safetensors"))
STORED_METHODS = sorted({k.split("/", 1)[0] for k in STORED})


def _stored(name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in STORED.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def emoji_backbone():
    from training.backbones import create_backbone

    return create_backbone(fixtures.BACKBONE)


def test_fixture_covers_the_ten_ported_methods():
    assert STORED_METHODS == ["cocoop", "coop", "ivlp", "kgcoop", "maple", "prograd", "promptsrc", "tcp", "vpt", "zeroshot"]


@pytest.mark.parametrize("name", STORED_METHODS)
def test_method_outputs_unchanged(name, emoji_backbone):
    from training.methods import create_method

    expected = _stored(name)
    method = create_method(name, emoji_backbone, None, fixtures.BASE)
    method.load_learned_state({k[len("state/"):]: v for k, v in expected.items() if k.startswith("state/")})
    actual = fixtures.outputs_of(method, emoji_backbone)
    assert sorted(actual) == sorted(expected)
    for key in sorted(expected):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}/{key}: {m}")
