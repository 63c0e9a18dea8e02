"""Figures: a run's curves and a benchmark's base / novel / HM, written whole as PNGs."""
from __future__ import annotations

import json

import pytest

from training.cli import main
from training.plots import plot_benchmark, plot_run
from training.runs import LOG_FILE, RunError

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 1000


def test_a_trained_run_plots_its_curves(exported, tmp_path, capsys):
    run, _ = exported("coop")
    out = tmp_path / "c.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert _is_png(out) and str(out) in capsys.readouterr().out


def test_stages_validation_and_a_torn_last_line(tmp_path):
    log = [{"epoch": e, "loss": 2.0 / e, "acc": 10.0 * e, "lr": 0.1, "seconds": 1.0, "stage": "ln" if e < 3 else "head",
            **({"val_acc": 5.0 * e} if e % 2 else {})} for e in range(1, 5)]
    (tmp_path / LOG_FILE).write_text("\n".join(json.dumps(r) for r in log) + '\n{"epoch": 5, "lo')
    assert _is_png(plot_run(tmp_path))
    assert (tmp_path / "curves.png").is_file()


def test_a_directory_without_a_log_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(RunError, match="no train_log.jsonl"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no train_log.jsonl" in err and "Traceback" not in err


def _rows(methods, datasets, seeds=(1, 2)):
    return [{"method": m, "dataset": d, "seed": s, "base_acc": 50.0 + i + s, "novel_acc": 40.0 - i, "hm": 45.0}
            for i, m in enumerate(methods) for d in datasets for s in seeds]


def test_benchmark_figures_with_and_without_zero_shot(tmp_path):
    datasets = ["emoji-nature", "emoji-people"]
    written = plot_benchmark(_rows(["zeroshot", "coop", "kgcoop"], datasets), ["zeroshot", "coop", "kgcoop"], datasets,
                             tmp_path / "a")
    assert [p.name for p in written] == ["b2n.png", "vs_zeroshot.png"] and all(_is_png(p) for p in written)
    # a method missing a dataset is drawn where it finished, and left out of the averages and the scatter
    rows = _rows(["zeroshot", "coop"], datasets) + _rows(["kgcoop"], datasets[:1])
    assert len(plot_benchmark(rows, ["zeroshot", "coop", "kgcoop"], datasets, tmp_path / "b")) == 2
    assert [p.name for p in plot_benchmark(_rows(["coop"], datasets), ["coop"], datasets, tmp_path / "c")] == ["b2n.png"]
    with pytest.raises(RunError, match="no finished"):
        plot_benchmark([], ["coop"], datasets, tmp_path / "d")


@pytest.mark.parametrize("n", [3, 12, 25])
def test_every_method_has_its_own_colour(n):
    """Matplotlib's default cycle repeats after ten: a grid of twelve methods drew CoOp and MaPLe alike."""
    from training.plots import _pyplot, method_colours

    colours = method_colours(_pyplot(), [f"m{i}" for i in range(n)])
    assert len(colours) == n and len({tuple(c) for c in colours.values()}) == n
