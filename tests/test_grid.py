"""The benchmark grid: every cell trained and evaluated once, results resumable."""
from __future__ import annotations

import json

from training.grid import run_grid


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
    assert json.loads(metrics.read_text())["n_test"] == {"base": 6, "novel": 6}  # 2 per class x 3 classes
    log = [json.loads(line) for line in (metrics.parent / "train_log.jsonl").read_text().splitlines()]
    assert rows[2]["train_seconds"] == round(sum(r["seconds"] for r in log), 1)  # epochs' time, not wall time
    stamp = metrics.stat().st_mtime_ns
    again = run_grid(["zeroshot", "coop"], [ds], [1, 2], tmp_path, "test-tiny", shots=2, train_options=opts,
                     test_per_class=2, progress=False)
    assert again == rows and metrics.stat().st_mtime_ns == stamp
    table = (tmp_path / "results.md").read_text()
    assert "**average** | coop" in table and "± " in table


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
    import os

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
