"""The CLI contract: one parser for every command, methods, datasets, train, eval, and one-line errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import training.cli as cli
from training.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"methods", "datasets", "backbones", "train", "eval", "quickstart", "benchmark", "pretrain", "bench", "atprompt-search",
            "export", "verify", "predict", "serve", "plot"}


def _choices(help_text: str) -> set[str]:
    """The subcommands a help text lists, from the first ``{a,b,...}`` in its usage."""
    m = re.search(r"\{([a-z,-]+)\}", help_text)
    assert m, help_text
    return set(m.group(1).split(","))


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert _choices(out) == COMMANDS
    for name in COMMANDS:  # each with its one-line description
        assert re.search(rf"^    {name} +\S", out, re.M), name
    assert main(["bench", "--help"]) == 0
    assert _choices(capsys.readouterr().out) == {"train", "classify", "serve", "train-cost"}


def test_parser_and_torch_free_commands_import_no_torch(tmp_path):
    # a fresh process (this one imported torch long ago); the handlers run up to their missing-artifact error
    code = """
import contextlib, io, sys
from training.cli import build_parser, main
build_parser()
art = sys.argv[1]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    rcs = [main(argv) for argv in (["--help"], ["verify", "--help"], ["predict", "--help"], ["serve", "--help"],
                                   ["bench", "serve", "--help"], ["verify", art], ["serve", "--artifact", art],
                                   ["predict", "--artifact", art, "--class-names", '["a"]', "x.png"],
                                   ["bench", "classify", "--artifact", art])]
print(rcs, sorted(m for m in ("torch", "open_clip") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-artifact")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0, 0, 0, 0, 0, 2, 2, 2, 2] []"


def test_serve_without_artifact_uses_the_default_one(monkeypatch, tmp_path, capsys):
    import training.defaults

    monkeypatch.delenv("PROMPTBAKE_ARTIFACT", raising=False)
    monkeypatch.setattr(training.defaults, "ensure_default_artifact", lambda: tmp_path / "default-artifact")
    assert main(["serve"]) == 2  # checked before BentoML is exec'd
    assert f"{tmp_path / 'default-artifact'}: no such artifact directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "invalid choice: 'nosuch'"),
        ([], "required: command"),
        (["bench"], "required: bench"),
        (["verify"], "required: ART_DIR"),
        (["methods", "--bogus"], "unrecognized arguments: --bogus"),
        (["bench", "serve", "--artifact", "a", "--bogus"], "see `promptbake bench serve --help`"),
        (["eval", "--r", "x"], "required: --run"),  # no abbreviations
        (["train", "--method", "nosuch", "--help"], "unknown method 'nosuch'"),
    ],
)
def test_usage_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptbake: error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["methods"], False),
        (["-v", "methods"], True),
        (["methods", "-v"], True),
        (["--verbose", "serve", "--artifact", "a"], True),
        (["serve", "--artifact", "a", "-v"], True),
        (["bench", "-v", "serve", "--artifact", "a"], True),
        (["bench", "serve", "--artifact", "a", "--verbose"], True),
        (["verify", "a"], False),
    ],
)
def test_verbose_before_or_after_the_command(argv, verbose):
    args, extra = build_parser().parse_known_args(argv)
    assert (args.verbose, extra) == (verbose, [])


def test_pretrain_gets_every_argument_after_it(monkeypatch, capsys):
    import training.benchmark.pretrain as pretrain

    with pytest.raises(SystemExit) as e:  # its own parser, its own --help
        main(["pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--out OUT" in out and "--steps" in out and "--stop-after" in out
    seen = []
    monkeypatch.setattr(pretrain, "main", seen.append)
    assert main(["-v", "pretrain", "--out", "x", "--steps", "3", "-v", "--help"]) == 0
    assert seen == [["--out", "x", "--steps", "3", "-v", "--help"]]


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_datasets", interrupted)
    assert main(["datasets"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_methods_lists_registry_with_capabilities(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"zeroshot", "coop"} <= set(rows)
    assert rows["zeroshot"]["capabilities"]["trainable"] is False
    assert rows["coop"]["capabilities"]["open_vocabulary"] is True
    assert main(["methods"]) == 0
    assert "coop" in capsys.readouterr().out


def test_datasets_lists_spec_forms(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "folder:" in out and "oxford_pets" in out


def test_train_then_eval_writes_metrics(colour_root, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "coop", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
            "--shots", "4", "--seed", "1", "--epochs", "2", "--batch-size", "4", "--n-ctx", "4", "--ctx-init", "",
            "--out", str(run), "--no-progress"]
    assert main(args) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["method_config"]["n_ctx"] == 4 and info["train"]["epochs"] == 2
    assert info["base_classnames"] == ["blue", "cyan", "green"]
    assert main(["eval", "--run", str(run), "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["per_class"]["base"]) == {"blue", "cyan", "green"}
    assert set(m["per_class"]["novel"]) == {"magenta", "red", "yellow"}
    b, n = m["base_acc"], m["novel_acc"]
    assert m["hm"] == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n))
    assert m["base_acc"] == pytest.approx(sum(m["per_class"]["base"].values()) / 3)  # equal class sizes
    assert "| coop |" in capsys.readouterr().out
    # the same command again finds the run complete and changes nothing
    before = (run / "learned.safetensors").read_bytes()
    assert main(args) == 0
    assert (run / "learned.safetensors").read_bytes() == before
    # a different job into the same directory is refused without --overwrite
    other = [a if a != "1" else "2" for a in args]
    assert main(other) == 2
    assert "different run" in capsys.readouterr().err


def test_zeroshot_eval_and_seed_summary(colour_root, tmp_path, capsys):
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"zs{seed}"
        assert main(["train", "--method", "zeroshot", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                     "--seed", str(seed), "--out", str(run), "--no-progress"]) == 0
        runs.append(str(run))
    assert main(["eval", "--run", *runs, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mean ± std" in out and "2 seeds" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "no-such-backbone"], "unknown backbone"),
        (["--backbone", "ViT-B-16:/nonexistent/weights.safetensors"], "weights file not found"),
        (["--backbone", "ViT-B/32"], "Did you mean ViT-B-32:openai"),
        (["--dataset", "folder:/nonexistent"], "/nonexistent"),
        (["--method", "coopp"], "Did you mean coop"),
        (["--n-ctx", "0"], "n_ctx must be >= 1"),
        (["--epochs", "-1"], "epochs must be >= 0"),
        (["--n-ctx", "abc"], "argument --n-ctx: invalid int value: 'abc'"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, colour_root, tmp_path, capsys):
    base = {"--method": "coop", "--backbone": "test-tiny", "--dataset": f"folder:{colour_root}", "--out": str(tmp_path / "r")}
    extra = []
    it = iter(argv)
    for flag in it:
        value = next(it)
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    args = ["train", *[x for kv in base.items() for x in kv], *extra, "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "learned.safetensors").exists()


@pytest.mark.parametrize("seeds", ["1,x", "1,1", "-1", ","])
def test_benchmark_rejects_bad_seeds_before_any_work(seeds, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["benchmark", "--methods", "zeroshot", "--datasets", "emoji-nature", "--seeds", seeds, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--seeds takes distinct comma-separated whole numbers >= 0" in err and err.count("\n") == 1
    assert not out.exists()


def test_unknown_method_option_fails(colour_root, tmp_path, capsys):
    assert main(["train", "--method", "zeroshot", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--out", str(tmp_path / "r"), "--n-ctx", "4"]) == 2
    assert "unknown option(s) for method zeroshot: --n-ctx 4" in capsys.readouterr().err


def test_method_options_are_never_abbreviations_of_training_options(colour_root, tmp_path):
    # kgcoop's --weight must reach the method, not be read as --weight-decay
    run = tmp_path / "kg"
    assert main(["train", "--method", "kgcoop", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--shots", "1", "--epochs", "0", "--weight", "3.5", "--out", str(run), "--no-progress"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["method_config"]["weight"] == 3.5
    assert info["train"]["weight_decay"] == 5e-4


def test_eval_of_unfinished_run_says_so(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "not a promptbake run" in capsys.readouterr().err


def test_method_help_lists_method_options(capsys):
    assert main(["train", "--method", "coop", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--n-ctx" in out and "--class-token-position" in out and "--batch-size" not in out
    assert main(["train", "--help"]) == 0  # without a method: the train and training options
    out = capsys.readouterr().out
    assert "--batch-size" in out and "--class-token-position" not in out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "promptbake")
    out = subprocess.run([exe, "methods"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "coop" in out.stdout


def test_the_catalog_is_the_registry_and_listing_imports_no_torch():
    from training.catalog import build_catalog, dumps, load_catalog

    assert dumps(load_catalog()) == dumps(build_catalog()), (
        "training/catalog.json differs from the method and backbone registries: run `python -m training.catalog`")
    code = ("import sys; from training.cli import main; main(['methods']); main(['backbones']); main(['datasets']); "
            "sys.exit(3 if 'torch' in sys.modules or 'open_clip' in sys.modules else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"a listing imported torch or open_clip: {out.stderr[-500:]}"
    assert "tac" in out.stdout and "emoji-vit-s" in out.stdout


def test_bench_train_cost_measures_each_method_in_its_own_process(colour_root, capsys):
    from training.cli import main

    assert main(["bench", "train-cost", "--methods", "coop,skipt", "--backbone", "test-tiny", "--dataset",
                 f"folder:{colour_root}", "--shots", "2", "--epochs", "1", "--batch-size", "2", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert [r["method"] for r in rows] == ["coop", "skipt"] and "| skipt |" in out
    for r in rows:
        assert r["epochs"] == 1 and r["epoch_seconds"] > 0 and r["peak_rss_mb"] > 50 and r["trainable"] > 0
    assert rows[1]["trainable"] > rows[0]["trainable"]  # SkipT tunes backbone weights, CoOp 4 context vectors
    assert main(["bench", "train-cost", "--methods", "coop", "--epochs", "0"]) == 2


def test_bench_train_compares_the_reference_style_loop_with_promptbakes(colour_root, capsys):
    from training.cli import main

    assert main(["bench", "train", "--method", "coop", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--shots", "2", "--epochs", "2", "--cache-views", "2", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out[out.index("["):])
    assert [r["loop"] for r in rows] == ["reference-style", "promptbake", "promptbake + feature cache (2 views)"]
    # each child trained with its loop's switches (as its run.json recorded them)
    assert rows[0]["train_config"] == {"full_context": True, "images_in_memory": False, "feature_cache_views": 0}
    assert rows[1]["train_config"] == {"full_context": False, "images_in_memory": True, "feature_cache_views": 0}
    assert rows[2]["train_config"]["feature_cache_views"] == 2
    assert rows[2]["cache_seconds"] > 0 and rows[0]["cache_seconds"] == rows[1]["cache_seconds"] == 0
    for r in rows:
        assert r["epochs"] == 2 and r["epoch_seconds"] > 0 and 0 <= r["hm"] <= 100
        assert r["train_seconds"] >= r["epoch_seconds"] + r["cache_seconds"]
    assert "| reference-style |" in out and "1.00x" in out
    assert main(["bench", "train", "--method", "vpt", "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--cache-views", "2"]) == 2
    assert "vpt changes the image graph or trains on texts: no image features to cache" in capsys.readouterr().err


def test_version_and_log_levels(capsys):
    import logging

    from training.logs import configure_logging

    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("promptbake ")
    saved = {n: logging.getLogger(n).level for n in ("", "training", "exports", "service")}
    try:
        configure_logging(False)
        assert logging.getLogger("open_clip").getEffectiveLevel() == logging.WARNING  # third-party chatter off
        assert logging.getLogger("training.loop").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("service.service").getEffectiveLevel() == logging.INFO
        configure_logging(True)
        assert logging.getLogger("open_clip").getEffectiveLevel() == logging.INFO
        assert logging.getLogger("exports.runtime").getEffectiveLevel() == logging.DEBUG
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def test_loading_a_weights_file_drops_only_open_clips_random_init_warning(caplog):
    import logging

    from training.backbones import _no_random_init_warning

    with caplog.at_level(logging.WARNING), _no_random_init_warning():
        logging.warning("No pretrained weights loaded for model 'ViT-B-32'. Model initialized randomly.")
        logging.warning("something else")
    logging.warning("after: Model initialized randomly.")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["something else", "after: Model initialized randomly."]


@pytest.mark.parametrize("method, shown", [("coop", "epochs=200, batch_size=32, lr=0.002"),
                                           ("twosfs", "epochs follow from the data")])
def test_a_methods_help_shows_the_training_options_it_takes(method, shown, capsys):
    assert main(["train", "--method", method, "--help"]) == 0
    assert shown in capsys.readouterr().out


def test_config_files_and_run_json_give_options_that_the_line_overrides(colour_spec, tmp_path, capsys):
    import yaml

    # a YAML file with train and method options; --seed and --epochs on the line win
    cfg = tmp_path / "coop.yaml"
    cfg.write_text(yaml.safe_dump({"method": "coop", "backbone": "test-tiny", "dataset": colour_spec, "shots": 2,
                                   "seed": 7, "epochs": 5, "batch_size": 4, "n_ctx": 3, "ctx_init": "",
                                   "class_specific": False, "adam_betas": [0.8, 0.9]}))
    first = tmp_path / "first"
    assert main(["train", "--config", str(cfg), "--seed", "1", "--epochs", "1", "--out", str(first), "--no-progress"]) == 0
    info = json.loads((first / "run.json").read_text())
    assert (info["seed"], info["shots"], info["train"]["epochs"], info["train"]["adam_betas"]) == (1, 2, 1, [0.8, 0.9])
    assert info["method_config"]["n_ctx"] == 3 and info["method_config"]["ctx_init"] == ""
    # a run's run.json is a config: the same job with another seed
    second = tmp_path / "second"
    assert main(["train", f"--config={first / 'run.json'}", "--seed", "2", "--out", str(second), "--no-progress"]) == 0
    again = json.loads((second / "run.json").read_text())
    assert again["seed"] == 2 and {k: again[k] for k in ("method_config", "train", "shots", "dataset")} == \
        {k: info[k] for k in ("method_config", "train", "shots", "dataset")}
    capsys.readouterr()
    for argv, message in ((["train", "--config", str(tmp_path / "none.json")], "--config"),
                          (["eval", "--config", str(cfg), "--run", "x"], "option of train and benchmark")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["train", "--config", str(bad)]) == 2 and "mapping" in capsys.readouterr().err


def test_benchmark_config_lists_become_the_comma_separated_options(tmp_path):
    from training.cli import build_parser, expand_config

    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps({"methods": ["zeroshot", "coop"], "datasets": ["emoji-nature"], "seeds": [1, 2],
                               "out": "runs/x", "parallel": 2, "collect": False, "plot": True}))
    argv = expand_config(build_parser(), ["-v", "benchmark", "--config", str(cfg), "--seeds", "3"])
    assert argv == ["-v", "benchmark", "--methods", "zeroshot,coop", "--datasets", "emoji-nature", "--seeds", "1,2",
                    "--out", "runs/x", "--parallel", "2", "--plot", "--seeds", "3"]
    args, _ = build_parser().parse_known_args(argv)
    assert (args.seeds, args.methods, args.collect, args.plot) == ("3", "zeroshot,coop", False, True)
