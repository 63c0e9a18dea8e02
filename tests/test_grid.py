"""The benchmark grid: every cell trained and evaluated once, results resumable."""
from __future__ import annotations

import json
import os

from training.grid import _epoch_seconds, run_grid
from training.jobs import trained_on
from training.loop import resolve_device
from training.runs import RunDir


def test_grid_runs_every_cell_once_and_resumes(colour_root, tmp_path):
    ds = f"folder:{colour_root}"
    opts = {"epochs": 1, "batch_size": 4}
    rows = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path, "test-tiny", shots=2, train_options=opts,
                    test_per_class=2, progress=False)
    assert [(r["method"], r["seed"]) for r in rows] == [("zeroshot", 1), ("zeroshot", 2), ("coop", 1), ("coop", 2)]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == rows
    for r in rows:
        assert 0 <= r["base_acc"] <= 100 and 0 <= r["novel_acc"] <= 100 and r["train_seconds"] >= 0
    metrics = tmp_path / "runs" / "coop" / ds.replace("/", "_").replace(":", "_") / "seed1" / "metrics.json"
    recorded = json.loads(metrics.read_text())
    assert recorded["n_test"] == {"base": 6, "novel": 6}  # 2 per class x 3 classes
    # what "auto" resolved to, which run.json (the options as asked) cannot say
    device = resolve_device("auto")  # the grid trains and evaluates on "auto"
    assert recorded["trained_on"] == [f"{device} {'amp' if device.type == 'cuda' else 'fp32'}"]
    assert recorded["eval_device"] == str(device)
    assert json.loads((metrics.parent / "run.json").read_text())["train"]["device"] == "auto"
    zeroshot = json.loads((tmp_path / "runs" / "zeroshot" / metrics.parent.parent.name / "seed1" / "metrics.json").read_text())
    assert zeroshot["trained_on"] == []  # nothing trained
    log = [json.loads(line) for line in (metrics.parent / "train_log.jsonl").read_text().splitlines()]
    assert rows[2]["train_seconds"] == round(sum(r["seconds"] for r in log), 1)  # epochs' time, not wall time
    stamp = metrics.stat().st_mtime_ns
    again = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path, "test-tiny", shots=2, train_options=opts,
                     test_per_class=2, progress=False)
    assert again == rows and metrics.stat().st_mtime_ns == stamp
    table = (tmp_path / "results.md").read_text()
    assert "**average** | coop" in table and "± " in table


def test_trained_on_lists_each_device_a_resumed_run_moved_across(tmp_path):
    (tmp_path / "train_log.jsonl").write_text(
        '{"epoch": 1, "device": "cuda:0", "precision": "amp"}\n'
        '{"epoch": 2, "device": "cuda:0", "precision": "amp"}\n'
        '[3]\n'  # not an epoch record
        '{"epoch": 3, "device": "cpu", "precision": "fp32"}\n'
        '{"epoch": 4, "dev')  # torn by a kill
    assert trained_on(RunDir(tmp_path)) == ["cuda:0 amp", "cpu fp32"]
    assert trained_on(RunDir(tmp_path / "absent")) == []
    (tmp_path / "train_log.jsonl").write_text('{"epoch": 1, "seconds": 2.5}\n')  # logged before devices were
    assert trained_on(RunDir(tmp_path)) is None  # unknown, not "nothing trained"


def test_training_time_sums_the_logged_epochs_and_skips_a_torn_line(tmp_path):
    assert _epoch_seconds(tmp_path) is None  # no log: the grid uses the set-up time (zero-shot)
    (tmp_path / "train_log.jsonl").write_text('{"epoch": 1, "seconds": 2.5}\n{"epoch": 2, "seconds": 1.25}\n{"epo')
    assert _epoch_seconds(tmp_path) == 3.8


def test_grid_trains_visual_methods_without_the_feature_cache(colour_root, tmp_path):
    rows = run_grid(["vpt"], [f"folder:{colour_root}"], [1], tmp_path, "test-tiny", shots=1,
                    train_options={"epochs": 1, "batch_size": 2, "feature_cache_views": 2}, progress=False)
    assert len(rows) == 1
    info = json.loads(next((tmp_path / "runs" / "vpt").rglob("run.json")).read_text())
    assert info["train"]["feature_cache_views"] == 0


def test_scaled_schedules_keep_the_warm_up_and_shift_epoch_counted_options(colour_root, tmp_path):
    import pytest

    from training.grid import MIN_SCALED_EPOCHS, scaled_epochs

    assert scaled_epochs("coop", 0.1) == 20 and scaled_epochs("kgcoop", 0.1) == 10  # reference 200, 100
    assert scaled_epochs("maple", 0.1) == MIN_SCALED_EPOCHS == 3  # 5 x 0.1 -> the floor
    assert scaled_epochs("zeroshot", 0.1) == 0
    with pytest.raises(ValueError, match="epochs_scale"):
        run_grid(["coop"], [f"folder:{colour_root}"], [1], tmp_path, "test-tiny", epochs_scale=1.5)

    rows = run_grid(["promptsrc"], [f"folder:{colour_root}"], [1], tmp_path, "test-tiny", shots=1,
                    train_options={"batch_size": 2}, epochs_scale=0.1, progress=False)
    assert len(rows) == 1
    info = json.loads(next((tmp_path / "runs" / "promptsrc").rglob("run.json")).read_text())
    assert info["train"]["epochs"] == 3
    # the aggregation window moves with the schedule: 75% of the way through, at least half an epoch wide
    assert info["method_config"]["gpa_mean"] == pytest.approx(15 * 3 / 20)
    assert info["method_config"]["gpa_std"] == 0.5


def test_results_table_compares_directions_with_the_published_averages():
    from training.grid import results_table

    def row(method, dataset, base, novel):
        return {"method": method, "dataset": dataset, "seed": 1, "base_acc": base, "novel_acc": novel,
                "hm": 2 * base * novel / (base + novel), "train_seconds": 10.0}

    methods = ["zeroshot", "coop", "kgcoop", "vpt"]
    rows = [row("zeroshot", d, 50, 50) for d in "ab"] + [row("coop", d, 60, 40) for d in "ab"]
    rows += [row("kgcoop", "a", 58, 48), row("kgcoop", "b", 58, 48), row("vpt", "a", 50.2, 51), row("vpt", "b", 50.2, 51)]
    table = results_table(rows, methods, ["a", "b"])
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ") and "**" not in line}
    # CoOp against zero-shot: base up, novel down, as published (+13.35, -11.00)
    assert "| coop | +10.00 (+) | -10.00 (-) |  |  | +13.35 (+) | -11.00 (-) |  |  | 2/2 |" in table
    # KgCoOp: ours base -2 / novel +8 against CoOp, published -1.96 / +10.38: all four directions agree
    assert lines["kgcoop"].endswith("| 4/4 |") and "-2.00 (-) | +8.00 (+)" in lines["kgcoop"]
    # no published average for VPT; a 0.2-point change counts as no change
    assert lines["vpt"].startswith("| vpt | +0.20 (=) | +1.00 (+) |") and lines["vpt"].endswith("n/a | n/a |")
    assert "| **average** | kgcoop | | 58.00 | 48.00 |" in table
    # without both baselines there is nothing to compare against
    assert "same direction" not in results_table([r for r in rows if r["method"] != "zeroshot"], methods[1:], ["a", "b"])


def test_grid_refuses_to_mix_backbones_in_one_table(colour_root, tmp_path):
    import pytest

    from training.runs import RunError

    ds = f"folder:{colour_root}"
    run_grid(["zeroshot"], [ds], [1], tmp_path, "test-tiny", shots=2, test_per_class=2, progress=False)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(RunError, match="trained on test-tiny, this benchmark asks for emoji-vit-s-v.*--backbone test-tiny"):
        run_grid(["zeroshot"], [ds], [1], tmp_path, "emoji-vit-s", shots=2, test_per_class=2, progress=False)
    assert (tmp_path / "results.json").read_text() == before


def test_grid_refuses_finished_cells_of_other_options_and_reads_older_run_files(colour_root, tmp_path):
    import pytest

    from training.runs import RunError

    ds = f"folder:{colour_root}"
    opts = {"epochs": 1, "batch_size": 4}
    rows = run_grid(["coop"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options=opts, test_per_class=2,
                    progress=False)
    with pytest.raises(RunError, match=r"train\.epochs 1 \(asked 2\)"):
        run_grid(["coop"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options={**opts, "epochs": 2},
                 test_per_class=2, progress=False)
    # a run.json written before an option existed holds no value for it: it means the option's default
    info_file = next(tmp_path.rglob("run.json"))
    info = json.loads(info_file.read_text())
    del info["train"]["min_crop_scale"]
    info_file.write_text(json.dumps(info))
    assert run_grid(["coop"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options=opts, test_per_class=2,
                    progress=False) == rows


def test_grid_trains_cells_in_worker_processes_and_leaves_locked_cells_to_their_owner(colour_root, tmp_path):
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    ds = f"folder:{colour_root}"
    kw = dict(shots=2, train_options={"epochs": 1, "batch_size": 4}, test_per_class=2, progress=False)
    serial = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path / "serial", "test-tiny", **kw)
    cell = ("runs", "coop", ds.replace("/", "_").replace(":", "_"))
    locked = tmp_path.joinpath("par", *cell, "seed2")
    locked.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live "other process"
    try:
        (locked / ".grid-lock").write_text(str(holder.pid))
        rows = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path / "par", "test-tiny", parallel=2, **kw)
        assert [(r["method"], r["seed"]) for r in rows] == [("zeroshot", 1), ("zeroshot", 2), ("coop", 1)]
        assert not (locked / "run.json").exists()  # left to its owner
    finally:
        holder.kill()
        holder.wait()
    # the owner is gone: its lock is stale, the cell is trained and the table is complete
    rows = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path / "par", "test-tiny", parallel=2, **kw)
    assert [(r["method"], r["seed"]) for r in rows] == [(r["method"], r["seed"]) for r in serial]
    assert json.loads((tmp_path / "par" / "results.json").read_text()) == rows
    assert not list((tmp_path / "par").rglob(".grid-lock"))
    # a worker process trains the same prompt as the serial loop
    for seed in (1, 2):
        a = load_file(str(tmp_path.joinpath("serial", *cell, f"seed{seed}", "learned.safetensors")))
        b = load_file(str(tmp_path.joinpath("par", *cell, f"seed{seed}", "learned.safetensors")))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_collect_only_reports_finished_cells_and_trains_nothing(colour_root, tmp_path, caplog):
    ds = f"folder:{colour_root}"
    kw = dict(shots=2, train_options={"epochs": 1, "batch_size": 4}, test_per_class=2, progress=False)
    done = run_grid(["zeroshot"], [ds], [1], tmp_path, "test-tiny", **kw)
    (tmp_path / "results.json").unlink()
    cell = tmp_path / "runs" / "coop" / ds.replace("/", "_").replace(":", "_")
    (cell / "seed1").mkdir(parents=True)
    (cell / "seed1" / ".grid-lock").write_text(str(os.getppid()))  # claimed by another live process
    caplog.set_level("WARNING", logger="training.grid")
    rows = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path, "test-tiny", collect_only=True, **kw)
    assert rows == done
    assert not (tmp_path / "results.json").exists()  # writes nothing
    assert not (cell / "seed2").exists() and not (cell / "seed1" / "run.json").exists()  # trains nothing
    assert (cell / "seed1" / ".grid-lock").exists()  # and leaves the other process's claim alone
    assert "1 of 4 cells finished; 1 claimed by a running benchmark, 2 not started" in caplog.text


def test_grid_starts_dpc_cells_from_their_host_cells(colour_root, tmp_path):
    import pytest

    ds = f"folder:{colour_root}"
    opts = {"epochs": 1, "batch_size": 2}
    with pytest.raises(ValueError, match="add coop to the methods"):
        run_grid(["dpc"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options=opts, progress=False)
    # dpc listed first: its cell still trains after the coop cell it starts from
    rows = run_grid(["dpc", "coop"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options=opts,
                    test_per_class=2, progress=False)
    assert [r["method"] for r in rows] == ["dpc", "coop"]
    cells = tmp_path / "runs"
    info = json.loads(next((cells / "dpc").rglob("run.json")).read_text())
    assert info["init_run"]["path"] == str(next((cells / "coop").rglob("run.json")).parent.resolve())
    again = run_grid(["dpc", "coop"], [ds], [1], tmp_path, "test-tiny", shots=2, train_options=opts,
                     test_per_class=2, progress=False)  # the finished cells check out against their run.json
    assert again == rows
    # a results folder moved elsewhere (a clone) still checks out: the host run is known by its tensors' sha256
    import shutil

    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.copytree(tmp_path / "runs", moved / "runs")
    assert run_grid(["dpc", "coop"], [ds], [1], moved, "test-tiny", shots=2, train_options=opts,
                    test_per_class=2, progress=False) == rows
    # a DPC cell whose host cell another running benchmark is training is left out, not failed
    other = tmp_path.parent / f"{tmp_path.name}-other"
    host = other / "runs" / "coop" / ds.replace("/", "_").replace(":", "_") / "seed1"
    host.mkdir(parents=True)
    (host / ".grid-lock").write_text(str(os.getppid()))
    assert run_grid(["dpc", "coop"], [ds], [1], other, "test-tiny", shots=2, train_options=opts,
                    test_per_class=2, progress=False) == []
    assert not list((other / "runs").rglob("run.json"))


def test_method_rows_with_options_split_parse_and_train_as_their_own_rows(colour_root, tmp_path):
    import pytest

    from training.grid import parse_method_spec, published_b2n, scaled_epochs, split_methods

    assert split_methods("coop, atprompt[host=maple;attributes=a,b],dekg[host=tcp]") == [
        "coop", "atprompt[host=maple;attributes=a,b]", "dekg[host=tcp]"]
    assert parse_method_spec("atprompt[host=cocoop;attributes=color,shape;n_att=3]") == (
        "atprompt", {"host": "cocoop", "attributes": "color,shape", "n_att": 3})
    assert parse_method_spec("coop") == ("coop", {})
    for bad in ("atprompt[host=vpt]", "atprompt[hots=coop]", "atprompt[host]", "atprompt[host=coop", "coop]"):
        with pytest.raises((ValueError, KeyError)):
            split_methods(bad) and parse_method_spec(bad)
    assert published_b2n("atprompt[host=maple]") == (82.98, 75.76, 79.21)
    assert published_b2n("atprompt") == (82.68, 68.04, 74.65)
    assert scaled_epochs("atprompt", 0.5, {"host": "cocoop"}) == 5 and scaled_epochs("atprompt", 0.5) == 50
    ds = f"folder:{colour_root}"
    for bad in ("coop[epochs=-1]", "coop[select=best_test]"):  # training options are checked too
        with pytest.raises(ValueError):
            parse_method_spec(bad)
    labels = ["coop", "atprompt[host=cocoop;attributes=color]", "dekg[host=tcp;hsic_weight=2;epochs=2]"]
    rows = run_grid(labels, [ds], [1], tmp_path, "test-tiny", shots=2, train_options={"epochs": 1, "batch_size": 4},
                    test_per_class=2, progress=False)
    assert [r["method"] for r in rows] == labels
    info = json.loads(next((tmp_path / "runs" / "atprompt-host=cocoop-attributes=color").rglob("run.json")).read_text())
    assert info["method"] == "atprompt" and info["method_config"]["host"] == "cocoop"
    assert info["method_config"]["attributes"] == ["color"]
    info = json.loads(next((tmp_path / "runs" / "dekg-host=tcp-hsic_weight=2-epochs=2").rglob("run.json")).read_text())
    assert info["method_config"]["hsic_weight"] == 2 and info["train"]["optimizer"] == "adamw"
    assert info["train"]["epochs"] == 2  # the row's own schedule over the grid's
    assert "| atprompt[host=cocoop;attributes=color] |" in (tmp_path / "results.md").read_text()


def test_every_published_average_is_consistent_and_cites_its_source():
    """A typo in a method's published 11-dataset average would silently flip a direction in the
    benchmark tables: each HM must be the harmonic mean of its base and novel (papers round each
    figure, so within 0.02) and each figure must say where it comes from."""
    import training.methods  # noqa: F401  (registers the methods)
    from training.protocol import list_methods

    checked = []
    for spec in list_methods():
        published = spec.method_cls.published_b2n
        if published is None:
            continue
        base, novel, hm = published
        assert 0 < novel <= 100 and 0 < base <= 100, spec.name
        assert abs(2 * base * novel / (base + novel) - hm) <= 0.02, (spec.name, published)
        assert spec.method_cls.published_source.strip(), f"{spec.name}: published_b2n without published_source"
        checked.append(spec.name)
    assert {"zeroshot", "coop", "mmrl"} <= set(checked)  # the two references every direction is measured from


def test_cell_locks_are_taken_by_one_process_and_only_stale_ones_are_cleared(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from training.grid import _CellLock

    run, mutex = tmp_path / "runs" / "coop" / "d" / "seed1", tmp_path / _CellLock.MUTEX
    # four processes race for one cell at the same instant: exactly one takes it
    start = time.time() + 4
    code = ("import sys, time; from pathlib import Path; from training.grid import _CellLock; "
            f"time.sleep(max(0, {start} - time.time())); "
            f"lock = _CellLock.take(Path({str(run)!r}), Path({str(mutex)!r})); "
            "print('took' if lock else 'refused', flush=True); time.sleep(3 if lock else 0)")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "took"]
    # its holder is gone: the lock is stale, and taken; the lock file names this process and host
    lock = _CellLock.take(run, mutex)
    assert lock is not None and (run / _CellLock.NAME).read_text() == f"{os.getpid()} {socket.gethostname()}"
    lock.release()
    assert not (run / _CellLock.NAME).exists()
    # a lock that cannot be told stale from here is left alone: another host's, an empty or a garbled one
    for text in (f"{os.getpid() + 10**6} another-host.example", "", "not a pid"):
        (run / _CellLock.NAME).write_text(text)
        assert _CellLock.claimed(run) and _CellLock.take(run, mutex) is None
        assert (run / _CellLock.NAME).read_text() == text


def test_a_local_worker_ends_with_the_benchmark_process_that_started_it(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    if not sys.platform.startswith("linux"):
        import pytest

        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "worker.pid"
    # a stand-in benchmark process: starts one worker through the local engine's initializer, then waits
    parent = ("import multiprocessing as mp, os, sys, time\n"
              "def work(path):\n"
              "    from training.grid import _local_worker_init\n"
              "    _local_worker_init(1, 30, int(os.environ['PARENT']))\n"
              "    open(path, 'w').write(str(os.getpid()))\n"
              "    time.sleep(120)\n"
              "if __name__ == '__main__':\n"
              "    os.environ['PARENT'] = str(os.getpid())\n"
              f"    mp.get_context('spawn').Process(target=work, args=({str(pid_file)!r},)).start()\n"
              "    time.sleep(120)\n")
    script = tmp_path / "parent.py"
    script.write_text(parent)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=os.getcwd())
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.time() < deadline, "the worker did not start"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)  # the benchmark process dies without cleaning up
        proc.wait()
        deadline = time.time() + 20
        while _alive(worker):
            assert time.time() < deadline, "the worker outlived the benchmark process"
            time.sleep(0.2)
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_each_row_has_its_own_cells(colour_root, tmp_path):
    import pytest

    ds = f"folder:{colour_root}"
    for methods in (["zeroshot", "zeroshot"], ["atprompt[attributes=a b]", "atprompt[attributes=a-b]"]):
        with pytest.raises(ValueError, match="would share the cells of runs/"):
            run_grid(methods, [ds], [1], tmp_path, "test-tiny", shots=2, progress=False)
    assert not (tmp_path / "runs").exists()


def test_finished_cells_are_refused_when_their_test_set_or_base_classes_changed(colour_root, tmp_path):
    import shutil

    import pytest

    from training.runs import RunError

    root = tmp_path / "data"
    shutil.copytree(colour_root, root)
    ds, out = f"folder:{root}", tmp_path / "out"
    rows = run_grid(["zeroshot"], [ds], [1], out, "test-tiny", shots=2, test_per_class=2, progress=False)
    with pytest.raises(RunError, match="evaluated on 2 test images per class, this benchmark asks for every test image"):
        run_grid(["zeroshot"], [ds], [1], out, "test-tiny", shots=2, progress=False)
    with pytest.raises(RunError, match="2 test images per class.*asks for 3 test images per class"):
        run_grid(["zeroshot"], [ds], [1], out, "test-tiny", shots=2, test_per_class=3, collect_only=True,
                 progress=False)
    assert run_grid(["zeroshot"], [ds], [1], out, "test-tiny", shots=2, test_per_class=2, progress=False) == rows
    base = json.loads(next(out.rglob("run.json")).read_text())["base_classnames"]
    for split in ("train", "test"):  # the dataset's first base class is renamed: the finished cell is stale
        (root / split / base[0]).rename(root / split / "aaa-renamed")
    with pytest.raises(RunError, match="differs in base_classnames"):
        run_grid(["zeroshot"], [ds], [1], out, "test-tiny", shots=2, test_per_class=2, progress=False)
