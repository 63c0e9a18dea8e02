"""The Bento's container image, built and run as users will (issue 21): ``bentoml containerize``
of the generated Dockerfile, the artifact inside as a BentoML model, one container on 127.0.0.1.

Run by ``.ci/container-test`` (part of ``.ci/run``), which installs podman, runc and debootstrap
and builds the base image; the default ``pytest`` run leaves this directory out (``addopts``), and a
run of this file without those tools fails rather than skips.

One substitution, made only because no container registry is reachable from the CI machines: the
Dockerfile's ``FROM python:3.11-slim`` is replaced (podman's ``--from``) by a local Debian bookworm
image with Debian's Python 3.11 (``.ci/python311-base.Containerfile``), which passes this machine's
package index and CA bundle to pip and uv inside the build. Everything else is BentoML's own
Dockerfile, unchanged: the same packages (``onnxruntime-gpu`` with its CUDA wheels), user and entrypoint.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from conftest import build_bento

REPO = Path(__file__).resolve().parents[2]
NAMES = ["red", "green", "blue", "yellow", "cyan", "magenta"]
BASE = os.environ.get("PROMPTBAKE_CONTAINER_BASE", "localhost/promptbake-ci/python:3.11-bookworm")
IMAGE = "localhost/promptbake:container-test"
# only documented variables (docs/deploy.md, service/config.py): no GPU here, and room for the
# slow request of the SIGTERM test
RUN_ENV = {"PROMPTBAKE_DEVICE": "cpu", "PROMPTBAKE_MAX_CLASS_NAMES": "4000"}

pytestmark = pytest.mark.usefixtures("restore_pillow_settings")


def _podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args[:3])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(**figures) -> None:
    path = os.environ.get("PROMPTBAKE_CONTAINER_REPORT")
    if path:
        old = json.loads(Path(path).read_text() or "{}") if Path(path).exists() else {}
        Path(path).write_text(json.dumps({**old, **figures}))


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail("podman and runc are missing: run .ci/container-test, which installs them and the base image")
    if "CONTAINERS_CONF" not in os.environ:  # what .ci/container-test sets: the host's rlimits, not podman's
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        os.environ["CONTAINERS_CONF"] = str(conf)
    if _podman("image", "exists", BASE, check=False).returncode != 0:
        pytest.fail(f"no base image {BASE}: run .ci/container-test, which builds it")


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    _, art = exported("coop")  # trained (test-tiny) and exported once per session (tests/conftest.py)
    assert isinstance(art, Path), art
    return art


@pytest.fixture(scope="module")
def image(podman_env, artifact, tmp_path_factory):
    """The artifact in a fresh BentoML store, ``bentoml build``, ``bentoml containerize``."""
    tag, env = build_bento(artifact, tmp_path_factory.mktemp("bentoml"))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bentoml", "containerize", tag, "--backend", "podman", "-t", IMAGE,
         "--opt", f"from={BASE}", "--opt", "network=host", "--opt", "runtime=runc"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )
    build_s = time.monotonic() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    size = int(_podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    _report(build_s=round(build_s, 1), image_bytes=size, image_gb=round(size / 1e9, 2))
    yield IMAGE
    _podman("rmi", "-f", IMAGE, check=False)


def test_the_image_holds_onnxruntime_gpu_no_torch_and_runs_as_bentoml(image):
    code = ("import importlib.metadata as m, importlib.util as u, json, os; print(json.dumps({"
            "'torch': u.find_spec('torch') is not None, 'open_clip': u.find_spec('open_clip') is not None,"
            "'training': u.find_spec('training') is not None, 'uid': os.getuid(),"
            "'dists': sorted(d.metadata['Name'].lower() for d in m.distributions())}))")
    got = json.loads(_podman("run", "--rm", image, "python", "-c", code).stdout.strip().splitlines()[-1])
    assert not got["torch"] and not got["open_clip"] and not got["training"], got
    assert "onnxruntime-gpu" in got["dists"] and "onnxruntime" not in got["dists"]
    assert got["uid"] == 1034
    assert _podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "bentoml"


def test_the_image_refuses_to_start_without_a_gpu_by_default(image):
    """No variable at all: PROMPTBAKE_DEVICE=cuda, no CPU fallback (the image's defaults), on a machine
    without a GPU: the container stops at once with one line that says why (not a slow CPU replica)."""
    name = f"promptbake-test-nogpu-{os.getpid()}"
    try:
        proc = _podman("run", "--rm", "--name", name, image, timeout=180, check=False)
    finally:
        _podman("rm", "-f", "-t", "0", name, check=False)  # gone already unless the run timed out
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "CUDAExecutionProvider" in out or "PROMPTBAKE_DEVICE" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def container(image):
    port = _free_port()
    name = f"promptbake-test-{port}"
    env_args = [a for k, v in RUN_ENV.items() for a in ("-e", f"{k}={v}")]
    _podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:3000", *env_args, image)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 180, None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
                    status = r.status
                    break
            except OSError:
                if _podman("container", "inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
                    break
                time.sleep(1)
        if status != 200:
            pytest.fail(f"/readyz never answered 200:\n{_podman('logs', name, check=False).stdout[-3000:]}")
        yield name, base
    finally:
        _podman("rm", "-f", "-t", "0", name, check=False)


def test_ready_and_classifies_as_promptbake_predict(container, artifact, colour_root, capsys):
    from training.cli import main

    name, base = container
    assert httpx.get(base + "/readyz", timeout=30).status_code == 200
    paths = sorted((colour_root / "test").rglob("*.png"))
    r = httpx.post(base + "/classify", files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
                   data={"class_names": json.dumps(NAMES), "top_k": "3"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-promptbake-provider"] == "CPUExecutionProvider"
    served = r.json()["predictions"]
    assert main(["predict", "--artifact", str(artifact), "--class-names", json.dumps(NAMES), "--top-k", "3",
                 *map(str, paths)]) == 0
    want = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["label"] for p in served] == [p["label"] for p in want]
    for got, ref in zip(served, want):
        assert [t["class_name"] for t in got["top"]] == [t["class_name"] for t in ref["top"]]
        assert max(abs(a["score"] - b["score"]) for a, b in zip(got["top"], ref["top"])) <= 1e-5
    # the server process itself (not only an exec'd shell) runs as the non-root user
    users = _podman("top", name, "user").stdout.split()[1:]
    assert users and set(users) == {"bentoml"}, users


def test_sigterm_finishes_the_request_in_flight_and_exits(container, colour_root):
    name, base = container
    image = sorted((colour_root / "test").rglob("*.png"))[0]
    names = [f"thing number {i}" for i in range(4000)]  # never seen: seconds of text graph
    with cf.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, base + "/classify", timeout=90,
                              files=[("images", ("a.png", image.read_bytes(), "image/png"))],
                              data={"class_names": json.dumps(names)})
        time.sleep(0.5)
        assert not pending.done(), "the request finished before SIGTERM; the test proves nothing"
        t0 = time.monotonic()
        _podman("kill", "--signal", "TERM", name)
        r = pending.result(timeout=90)
        exit_code = int(_podman("wait", name, timeout=90).stdout.strip())
        stop_s = time.monotonic() - t0
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top"]) == 5
    logs = _podman("logs", name, check=False)
    assert "promptbake: shut down" in logs.stdout + logs.stderr  # the service's shutdown hook ran
    assert exit_code == 0 and stop_s < 60, (exit_code, stop_s)
    _report(sigterm_stop_s=round(stop_s, 1))
