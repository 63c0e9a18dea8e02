"""Shared fixtures: the tiny backbone, a small separable image-folder dataset, and every method
trained and exported once per session (through the CLI, as a user would)."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# The unit tests run tiny models: one intra-op thread avoids thread overhead that dominates tiny ops
# on 2-core machines (measured: a small linear layer 9.8 ms with 2 busy threads vs 0.24 ms with 1).
torch.set_num_threads(1)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "cyan": (30, 210, 220),
    "magenta": (210, 30, 210),
}


def colour_descriptions() -> dict[str, list[str]]:
    """CuPL-format descriptions of the colour classes, generated from the dataset's own RGB values."""
    return {name: [f"{name}, red {r}, green {g}, blue {b}.", f"{name}, the colour {r} {g} {b}."]
            for name, (r, g, b) in COLOURS.items()}


def colour_attributes() -> dict[str, dict[str, list[str]]]:
    """Attribute trees of the colour classes (TAP's format), generated from the dataset's own RGB values."""
    return {name: {"channels": [f"{name}, red {r}, green {g}, blue {b}."], "value": [f"{name}, the colour {r} {g} {b}."]}
            for name, (r, g, b) in COLOURS.items()}


def descriptions_for(names, kind: str = "sentences") -> dict:
    """Descriptions of any class names for tests, generated from the names (the colours' from their RGB
    values): sentences, or attribute trees for ``kind="attributes"`` (a method's ``description_kind``)."""
    if kind == "attributes":
        colours = colour_attributes()
        return {n: colours.get(n, {"channels": [f"{n}."], "value": [f"a {n}, {len(n.split())} word(s) long."]})
                for n in names}
    colours = colour_descriptions()
    return {n: colours.get(n, [f"{n}.", f"a {n}, {len(n.split())} word(s) long."]) for n in names}


def kind_of(method_or_manifest) -> str:
    """The description kind of a method (its ``description_kind``) or an artifact (trees with a layout)."""
    if hasattr(method_or_manifest, "description_kind"):
        return method_or_manifest.description_kind
    return "attributes" if method_or_manifest.description_layout is not None else "sentences"


def constructible_options(name: str, options: dict | None = None) -> dict:
    """Options that make method ``name`` constructible on test classes: what it derives from the
    training descriptions (TAP's attribute layout, from :func:`colour_attributes`), then ``options``."""
    from training.methods import get_method

    spec = get_method(name)
    derived = spec.method_cls.options_for_descriptions(spec.config_cls.from_dict(dict(options or {})),
                                                       descriptions_for(COLOURS, spec.method_cls.description_kind))
    return {**derived, **(options or {})}


def build_bento(artifact: Path, home: Path, timeout: float = 300) -> tuple[str, dict[str, str]]:
    """``artifact`` into a fresh BentoML store at ``home`` as ``promptbake-default``, then ``bentoml
    build`` of the repository's bentofile: ``(bento tag, the environment naming that store)``. In
    subprocesses: BentoML fixes its store path on first use in a process."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    code = ("from training.export import save_to_bentoml; from exports.manifest import load_artifact; "
            f"print(save_to_bentoml({str(artifact)!r}, 'promptbake-default', load_artifact({str(artifact)!r})))")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=repo, timeout=120, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:"), env


def make_colour_dataset(root: Path, n_train: int = 8, n_test: int = 4, size: int = 32, seed: int = 0) -> Path:
    """ROOT/{train,test}/<colour>/*.png: noisy solid-colour squares, one class per colour, and
    ROOT/descriptions.json (:func:`colour_descriptions`).

    Separable by colour, so a working prompt method must fit the base classes on it.
    """
    import json

    root.mkdir(parents=True, exist_ok=True)
    (root / "descriptions.json").write_text(json.dumps(colour_descriptions()))
    (root / "attributes.json").write_text(json.dumps(colour_attributes()))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for name, rgb in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i:03d}.png")
    return root


class KilledRun(RuntimeError):
    """Raised by :class:`KillAt`: a training process killed mid-epoch."""


class KillAt(torch.utils.data.Dataset):
    """A training set that dies at its n-th item read (raising ``error``), like a process killed mid-epoch."""

    def __init__(self, inner, n: int, error: type[BaseException] = KilledRun):
        self.inner, self.n, self.error, self.reads = inner, n, error, 0
        self.samples = inner.samples

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.n:
            raise self.error("killed")
        return self.inner[i]


@pytest.fixture(scope="session")
def colour_root(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="session")
def tiny_backbone():
    from training.backbones import create_backbone

    return create_backbone("test-tiny")


@pytest.fixture(scope="session")
def colour_spec(colour_root) -> str:
    return f"folder:{colour_root}"


def _stages_of(name: str, options: dict) -> tuple:
    """The training stages of method ``name`` under ``options`` (built on test-tiny)."""
    from training.backbones import create_backbone
    from training.methods import create_method, get_method

    method_options = {k: v for k, v in options.items() if k in {f for f in get_method(name).config_cls.__dataclass_fields__}}
    return create_method(name, create_backbone("test-tiny"), constructible_options(name, method_options), ["a", "b"]).stages()


def _fewest_epochs(stages: tuple) -> int:
    """The fewest epochs that give every stage at least one (one per stage, unless shares are uneven: TAP)."""
    from training.protocol import stage_plan

    for epochs in range(len(stages), 20 * len(stages)):
        try:
            stage_plan(epochs, stages)
            return epochs
        except ValueError:
            continue
    raise ValueError(f"no epoch count fits the stages {[s.name for s in stages]}")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, colour_spec):
    """``get(name) -> (run dir, artifact dir or the CLI's error line)``.

    Each method is trained once per session with ``promptbake train`` (test-tiny, 2 shots, one
    epoch) and exported with ``promptbake export`` (fp32, parity checked), lazily on first use.
    """
    from training.cli import main

    cache: dict[str, tuple[Path, Path | str]] = {}

    def get(label: str) -> tuple[Path, Path | str]:
        """``label``: a method name, or a benchmark row ``NAME[key=value;...]`` (a plug-in's other host)."""
        if label not in cache:
            from training.grid import _dir_name, parse_method_spec
            from training.methods import get_method

            name, options = parse_method_spec(label)
            root = tmp_path_factory.mktemp(f"export-{_dir_name(label)}")
            run, art = root / "run", root / "artifact"
            out, err = io.StringIO(), io.StringIO()
            extra = []
            for key, value in options.items():  # as a user would type them
                flag = key.replace("_", "-")
                extra += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
            cls = get_method(name).method_cls
            if cls.needs_train_descriptions or cls.capabilities_for(get_method(name).config_cls()).needs_class_descriptions:
                file = "attributes.json" if cls.description_kind == "attributes" else "descriptions.json"
                extra += ["--descriptions", str(Path(colour_spec.removeprefix("folder:")) / file)]
            if cls.needs_init_run:  # DPC: stage 2 of a finished run of its default host
                extra += ["--init-run", str(get(get_method(name).config_cls().host)[0])]
            epochs = _fewest_epochs(_stages_of(name, options))  # one epoch per stage of a multi-stage recipe (2SFS)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["train", "--method", name, "--backbone", "test-tiny", "--dataset", colour_spec,
                           "--shots", "2", "--seed", "1", "--out", str(run), "--epochs", str(epochs), "--batch-size", "4",
                           "--no-progress", *extra])
                assert rc == 0, f"promptbake train --method {name} failed: {err.getvalue()}"
                rc = main(["export", "--run", str(run), "--out", str(art)])
            cache[label] = (run, art if rc == 0 else err.getvalue())
        return cache[label]

    return get


@pytest.fixture(scope="module")
def restore_pillow_settings():
    """The service hardens Pillow process-wide (pixel limit, bomb warning as error); undo it after a module."""
    import warnings

    from PIL import ImageFile

    saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    yield
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved[0], saved[1]
    warnings.filters[:] = saved[2]
    warnings._filters_mutated()  # noqa: SLF001 - invalidate the warnings cache after editing the list


def _unregister_bentoml_metrics() -> None:
    from bentoml._internal.configuration.containers import BentoMLContainer

    registry = BentoMLContainer.metrics_client.get().registry
    for collector in list(registry._collector_to_names):  # noqa: SLF001 - no public way to list collectors
        if any(n.startswith("bentoml_") for n in registry._collector_to_names[collector]):  # noqa: SLF001
            registry.unregister(collector)


@pytest.fixture
def fresh_http_metrics():
    """BentoML registers its HTTP metrics once per process; a test that starts an app uses this fixture.

    Unregister BentoML's ``bentoml_*`` collectors before and after each app (the service's own metrics
    are process-wide singletons and survive), so this app can register them whatever ran before it (a
    module-scoped app elsewhere leaves its collectors behind) and the next app after it.
    """
    _unregister_bentoml_metrics()
    yield
    _unregister_bentoml_metrics()
