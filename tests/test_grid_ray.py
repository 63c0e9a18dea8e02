"""``promptbake benchmark --engine ray``: a grid on a local Ray instance, with a worker killed in
the middle of a cell (Ray retries the task; it resumes from the cell's checkpoint), giving the same
table and the same tensors as the local engine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.grid import run_grid
from training.runs import LEARNED_FILE, load_tensors

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 300  # test-tiny, 6 images: ~10 s, long enough to kill the worker in the middle


def _cell_processes() -> list[int]:
    """pids of Ray workers running a grid cell (Ray titles a worker after the task it runs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::_ray_cell"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_ray_grid_retries_a_killed_cell_and_matches_the_local_engine(colour_spec, tmp_path):
    options = {"epochs": EPOCHS}
    local = run_grid(["coop"], [colour_spec], [1], tmp_path / "local", "test-tiny", shots=2, train_options=options,
                     progress=False)

    out = tmp_path / "ray"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_DEDUP_LOGS": "0"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "benchmark", "--engine", "ray", "--cpus-per-cell", "1",
         "--methods", "coop", "--datasets", colour_spec, "--seeds", "1", "--backbone", "test-tiny", "--shots", "2",
         "--epochs", str(EPOCHS), "--out", str(out), "--no-progress"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None and time.monotonic() < deadline and driver.poll() is None:
            checkpoints = list(out.glob("runs/coop/*/seed1/checkpoint.safetensors"))
            pids = _cell_processes()
            if checkpoints and pids:
                _, meta = load_tensors(checkpoints[0])
                if 3 <= int(meta["epoch"]) < EPOCHS - 50:
                    os.kill(pids[0], signal.SIGKILL)  # the worker dies in the middle of the cell
                    killed_at = int(meta["epoch"])
            time.sleep(0.02)
        log, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert killed_at is not None, "the cell finished (or never started) before it could be killed: the test proves nothing"
    assert driver.returncode == 0, log[-4000:]
    assert "resuming" in log and f"from epoch {EPOCHS}" not in log, log[-4000:]  # the retry resumed, mid-cell

    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["base_acc"], r["novel_acc"], r["hm"]) for r in rows] == \
        [(r["method"], r["base_acc"], r["novel_acc"], r["hm"]) for r in local]
    ray_run = next(out.glob("runs/coop/*/seed1"))
    local_run = next((tmp_path / "local").glob("runs/coop/*/seed1"))
    got, _ = load_tensors(ray_run / LEARNED_FILE)
    want, _ = load_tensors(local_run / LEARNED_FILE)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # resumed to identical tensors
    epochs = [json.loads(line)["epoch"] for line in (ray_run / "train_log.jsonl").read_text().splitlines()]
    assert max(epochs) == EPOCHS and len(epochs) == len(set(epochs))
    assert not list(out.glob("runs/*/*/*/.grid-lock"))  # every claim released


def test_ray_engine_options_are_checked(colour_spec, tmp_path):
    with pytest.raises(ValueError, match="options of the ray engine"):
        run_grid(["zeroshot"], [colour_spec], [1], tmp_path, "test-tiny", address="auto")
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        run_grid(["zeroshot"], [colour_spec], [1], tmp_path, "test-tiny", engine="dask")
    with pytest.raises(RuntimeError, match="no node offers 64 CPU"):
        run_grid(["coop"], [colour_spec], [1], tmp_path, "test-tiny", shots=1, train_options={"epochs": 1},
                 engine="ray", cpus_per_cell=64, progress=False)
