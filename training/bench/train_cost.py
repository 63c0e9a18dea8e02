"""``promptbake bench train-cost``: epoch time and peak memory of several methods' training, side by side.

Each method trains in a fresh Python process (``promptbake train`` with the same backbone, dataset,
shots, seed, epochs and thread count), so its peak resident memory is its own: the operating
system's ``ru_maxrss`` of that child (``os.wait4``). Time per epoch is the loop's own per-epoch
timing from the run's ``train_log.jsonl`` (set-up, dataset loading and evaluation excluded); the
child's wall time is printed too. The methods run one after the other in one invocation, so the
ratios compare like with like on one machine. SkipT's claim (its README: 239 s and 404 MB against
CoOp's 1,186 s and 3,204 MB on a GPU) is the motivating comparison.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any, Mapping, Sequence

_CHILD = "import sys; from training.cli import main; raise SystemExit(main(sys.argv[1:]))"


def _run_child(argv: Sequence[str], threads: int) -> tuple[int, float, int, str]:
    """(exit status, wall seconds, peak RSS bytes, stderr tail) of ``promptbake argv`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode("utf-8", "replace")[-2000:]
    return proc.returncode, time.perf_counter() - t0, int(usage.ru_maxrss) * 1024, tail  # ru_maxrss is in KiB on Linux


def train_argv(method: str, backbone: str, dataset: str, shots: int, seed: int, epochs: int, out: Path,
               train_options: Mapping[str, Any] | None = None) -> list[str]:
    """``promptbake train`` arguments for a bench child; a boolean option becomes ``--name`` / ``--no-name``."""
    argv = ["train", "--method", method, "--backbone", backbone, "--dataset", dataset, "--shots", str(shots),
            "--seed", str(seed), "--epochs", str(epochs), "--out", str(out), "--no-progress"]
    for key, value in (train_options or {}).items():
        flag = key.replace("_", "-")
        argv += [f"--{flag}"] if value is True else [f"--no-{flag}"] if value is False else [f"--{flag}", str(value)]
    return argv


def bench_train_cost(methods: Sequence[str], backbone: str, dataset: str, *, epochs: int = 2, shots: int = 16,
                     seed: int = 1, threads: int = 1, train_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per method: median seconds per epoch, peak RSS, wall time; each in its own process.

    Methods that start from another run (DPC) are not measured here (their cost includes the host's).
    """
    from training.methods import get_method
    from training.runs import RunDir

    rows = []
    with tempfile.TemporaryDirectory(prefix="promptbake-train-cost-") as tmp:
        for name in methods:
            spec = get_method(name)
            if spec.method_cls.needs_init_run:
                raise ValueError(f"{name} starts from another run; measure its host and itself with promptbake train")
            run = Path(tmp) / name
            argv = train_argv(name, backbone, dataset, shots, seed, epochs, run, train_options)
            rc, wall, peak, err = _run_child(argv, threads)
            if rc != 0:
                raise RuntimeError(f"promptbake train --method {name} failed ({rc}): {err.strip().splitlines()[-1] if err.strip() else ''}")
            log = RunDir(run).log_records()
            epoch_seconds = median(r["seconds"] for r in log)
            reference_epochs = int(spec.method_cls.train_defaults.get("epochs", 0))
            rows.append({"method": name, "epochs": len(log), "epoch_seconds": epoch_seconds,
                         "reference_epochs": reference_epochs, "reference_run_seconds": epoch_seconds * reference_epochs,
                         "peak_rss_mb": peak / 2**20, "wall_seconds": wall, "threads": threads,
                         "trainable": sum(v.numel() for v in _learned(run).values())})
    return rows


def _learned(run: Path) -> dict:
    from training.runs import RunDir

    return RunDir(run).load_learned()


def format_train_cost_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown, ratios to the first row."""
    first = rows[0]
    lines = ["| method | learned tensors | s / epoch | vs first | reference epochs | reference run s (estimate) | vs first "
             "| peak RSS MB | vs first | process wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["reference_run_seconds"] / first["reference_run_seconds"] if first["reference_run_seconds"] else float("nan")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['epoch_seconds']:.1f} | "
                     f"{r['epoch_seconds'] / first['epoch_seconds']:.2f}x | {r['reference_epochs']} | "
                     f"{r['reference_run_seconds']:.0f} | {ref:.2f}x | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / first['peak_rss_mb']:.2f}x | {r['wall_seconds']:.1f} |")
    lines.append(f"\n{rows[0]['epochs']} epochs each, {rows[0]['threads']} torch thread(s), one fresh process per method "
                 "(peak RSS = that process's ru_maxrss); reference run = the median epoch time x the method's "
                 "reference epochs (an estimate from the measured epochs).")
    return "\n".join(lines)
