"""The ``promptbake`` command line.

One parser lists every command. Building it imports no torch: the ``train`` options come from
:class:`training.config.TrainConfig` (standard library only), and each command imports its heavy
modules inside its handler, so ``verify``, ``predict`` (:mod:`exports.commands`) and ``serve``
(:mod:`service.commands`) run without torch, like the service. Method options and training options are derived from the typed config dataclasses, so a
new method's options appear here without touching this file. Errors a user can cause (bad spec,
bad option, missing file) print one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from typing import Any, Literal, NoReturn, Sequence, get_args, get_origin, get_type_hints

from exports.commands import add_commands as add_exports_commands
from service.commands import add_command as add_serve_command
from training.config import TrainConfig
from training.logs import configure_logging

logger = logging.getLogger("promptbake")


# -- options from dataclasses ------------------------------------------------------------------

def _add_dataclass_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: Sequence[str] = ()) -> list[str]:
    """Add ``--field-name`` for every field of ``cls``; only options given on the line are set."""
    hints = get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        origin, args = get_origin(tp), get_args(tp)
        if origin in (typing.Union, types.UnionType):  # Optional[X]
            non_none = [a for a in args if a is not type(None)]
            tp, origin, args = non_none[0], get_origin(non_none[0]), get_args(non_none[0])
        default = f.default if f.default is not dataclasses.MISSING else None
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(args)
        elif origin is tuple:
            kwargs.update(nargs="+", type=args[0])
        else:
            kwargs["type"] = tp
        parser.add_argument(flag, help=f"default: {default!r}", **kwargs)
        names.append(f.name)
    return names


def _setup_logging(verbose: bool) -> None:
    configure_logging(verbose)


def _version() -> str:
    """The installed distribution's version; from a source tree that is not installed, "unknown"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("promptbake")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _error(message: str) -> int:
    print(f"promptbake: error: {message}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other promptbake error (argparse would print the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"promptbake: error: {message} (see `{self.prog} --help`)\n")


# -- commands ---------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from training.catalog import load_catalog  # the registry's rows without importing torch

    rows = load_catalog()["methods"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    flags = list(rows[0]["capabilities"]) if rows else []
    print("method      " + "  ".join(flags))
    for r in rows:
        cells = "  ".join(("yes" if r["capabilities"][f] else "-").center(len(f)) for f in flags)
        print(f"{r['name']:<11} {cells}   {r['description']}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from training.data import list_dataset_specs

    for spec, desc in list_dataset_specs():
        print(f"{spec:<34} {desc}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from training.catalog import load_catalog  # the registry's rows without importing torch

    for row in load_catalog()["backbones"]:
        print(f"{row['name']:<16} {row['description']}")
    print(f"{'MODEL:TAG':<16} an open_clip model with a pretrained tag, e.g. ViT-B-16:openai (needs internet)")
    print(f"{'MODEL:PATH':<16} an open_clip model with local weights (.safetensors, or .pt/.bin read with weights_only=True)")
    print(f"{'hf-hub:ORG/REPO':<16} an open_clip model from the Hugging Face Hub, read from the local cache (HF_HUB_OFFLINE=1)")
    print(f"{'local-dir:PATH':<16} a directory with open_clip_config.json and the model's weights")
    return 0


def _parse_method_options(method: str, argv: Sequence[str]) -> dict[str, Any]:
    from training.methods import get_method

    spec = get_method(method)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {method}", add_help=False, allow_abbrev=False,
                                exit_on_error=False)
    _add_dataclass_options(p, spec.config_cls)
    try:
        ns, rest = p.parse_known_args(argv)
    except argparse.ArgumentError as e:  # e.g. --n-ctx abc: one line, like the other errors
        raise ValueError(f"{e} (see promptbake train --method {method} --help)") from None
    if rest:
        raise ValueError(f"unknown option(s) for method {method}: {' '.join(rest)} (see promptbake train --method {method} --help)")
    return vars(ns)


def _print_method_help(name: str) -> None:
    from training.methods import get_method

    spec = get_method(name)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {name}", description=spec.description, allow_abbrev=False)
    _add_dataclass_options(p, spec.config_cls)
    print((spec.config_cls.__doc__ or "").strip())
    p.print_help()
    reference = spec.method_cls.train_defaults_for(spec.config_cls())
    shown = ", ".join(f"{k}={v}" for k, v in reference.items())
    print(f"\ntraining options it takes when not given (the reference's): {shown or 'the TrainConfig defaults'}"
          + ("; epochs follow from the data (reference_epochs)" if spec.method_cls.reference_epochs(
              spec.config_cls(), 16 * 100, 16, int(reference.get("batch_size", 32))) is not None else ""))


class _TrainHelp(argparse.Action):
    """``train --method NAME --help`` shows NAME's options; without ``--method`` before it, the train options."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 help: str = "show this help message (after --method NAME: that method's options) and exit"):
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        method = getattr(namespace, "method", None)
        if method is None:
            parser.print_help()
        else:
            _print_method_help(method)
        parser.exit()


def cmd_train(args: argparse.Namespace) -> int:
    from training.jobs import train_job

    method_options = _parse_method_options(args.method, args.extra)
    train_options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    run = train_job(
        args.method, args.backbone, args.dataset, args.shots, args.seed, args.out,
        method_options=method_options, train_options=train_options, overwrite=args.overwrite, progress=not args.no_progress,
        descriptions=args.descriptions, init_run=args.init_run,
    )
    print(f"trained run: {run.path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from training.jobs import check_seeds_of_one_job, eval_job, format_metrics_table

    if len(args.run) > 1:
        check_seeds_of_one_job(args.run)
    rows = [eval_job(r, batch_size=args.batch_size, device=args.device, workers=args.workers, progress=not args.no_progress) for r in args.run]
    print(format_metrics_table(rows))
    return 0


def cmd_atprompt_search(args: argparse.Namespace) -> int:
    from training.attribute_search import keyword_candidates, search_attributes, write_result

    if args.candidates:
        candidates = [w.strip() for w in args.candidates.split(",") if w.strip()]
        source = "--candidates"
    else:
        from training.benchmark.descriptions import benchmark_attributes
        from training.data import DatasetError, load_dataset, split_base_novel

        try:
            trees = benchmark_attributes(args.dataset)
        except DatasetError:
            raise ValueError(f"{args.dataset} ships no attribute trees: give --candidates WORD,WORD,...") from None
        base = split_base_novel(load_dataset(args.dataset))[0].classnames
        candidates = keyword_candidates({c: trees[c] for c in base}, args.top)
        source = f"the {len(candidates)} CLDR keywords most shared by {args.dataset}'s base classes"
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"candidates ({source}): {', '.join(candidates)}")
    result = search_attributes(args.backbone, args.dataset, candidates, sizes=sizes, shots=args.shots, seed=args.seed,
                               epochs=args.epochs, batch_size=args.batch_size, device=args.device)
    for row in result.to_dict()["ranking"][:5]:
        print(f"  {row['weight']:.3f}  {', '.join(row['attributes'])}")
    print(f"proposal: --attributes {','.join(result.proposal)}")
    if args.out:
        write_result(result, args.out)
    return 0


# -- export, verify, predict ------------------------------------------------------------------
# verify and predict run without torch (like the service): their handlers import only exports.*.

def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_run, save_to_bentoml

    manifest = export_run(args.run, args.out, precision=args.precision, overwrite=args.overwrite, min_top1=args.min_top1)
    p = manifest.parity
    print(
        f"exported {manifest.method} ({manifest.precision}) to {args.out}: parity image {p.max_abs_diff_image:.2e}, "
        f"text {p.max_abs_diff_text:.2e}, top-1 agreement {100 * p.top1_agreement:.1f}% "
        f"({p.n_images} images x {p.n_classes} classes)"
    )
    from exports.manifest import artifact_digest

    print(f"digest {artifact_digest(manifest)} (pin it: promptbake serve --expect-digest, PROMPTBAKE_ARTIFACT_DIGEST)")
    if args.bentoml:
        tag = save_to_bentoml(args.out, args.bentoml, manifest)
        print(f"saved to the BentoML model store as {tag}")
    return 0


# -- serve, pretrain, benchmarks ---------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> int:
    from training.benchmark.pretrain import main as pretrain_main

    pretrain_main(args.extra)  # everything after `pretrain`, for its own parser
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from training.quickstart import quickstart

    result = quickstart(args.out, method=args.method, backbone=args.backbone, dataset=args.dataset, epochs=args.epochs,
                        seed=args.seed, progress=not args.no_progress,
                        min_crop_scale=None if args.min_crop_scale <= 0 else args.min_crop_scale)
    print(json.dumps(result, indent=2))
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from training.grid import results_table, run_grid

    if args.datasets == "all":
        from training.benchmark import list_benchmarks

        datasets = [name for name, _ in list_benchmarks()]
    else:
        datasets = [d for d in args.datasets.split(",") if d]
    from training.methods import list_methods

    if args.methods == "all":  # the baselines first, then the rest by name
        names = [spec.name for spec in list_methods()]
        methods = [m for m in ("zeroshot", "coop") if m in names] + [m for m in names if m not in ("zeroshot", "coop")]
    else:
        from training.grid import split_methods

        methods = split_methods(args.methods)
    from training.grid import parse_method_spec

    for m in methods:
        parse_method_spec(m)  # fail before any training on a typo or a bad option
    seeds = _int_list(args.seeds, "--seeds", minimum=0)
    if args.epochs is not None and args.epochs_scale is not None:
        raise ValueError("give --epochs or --epochs-scale, not both")
    train_options = {k: v for k, v in (("epochs", args.epochs), ("feature_cache_views", args.feature_cache_views),
                                       ("min_crop_scale", args.min_crop_scale)) if v is not None}
    rows = run_grid(methods, datasets, seeds, args.out, args.backbone, args.shots, train_options,
                    test_per_class=args.test_per_class, progress=not args.no_progress, epochs_scale=args.epochs_scale,
                    parallel=args.parallel, collect_only=args.collect, engine=args.engine, address=args.address,
                    cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell)
    print(results_table(rows, methods, datasets))
    if args.plot:
        from training.plots import plot_benchmark

        for path in plot_benchmark(rows, methods, datasets, args.out):
            print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from training.plots import plot_run

    print(f"wrote {plot_run(args.run, args.out)}")
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from training.bench.train import bench_train, format_train_table

    if args.epochs < 1 or args.threads < 1 or args.cache_views < 0:
        raise ValueError("--epochs and --threads must be >= 1, --cache-views >= 0")
    options = {} if args.min_crop_scale is None else {"min_crop_scale": args.min_crop_scale}
    rows = bench_train(args.method, args.backbone, args.dataset, epochs=args.epochs, shots=args.shots, seed=args.seed,
                       threads=args.threads, cache_views=args.cache_views, train_options=options,
                       test_per_class=args.test_per_class)
    print(format_train_table(rows, args.method, args.dataset))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from training.bench.serve import bench_serve, format_serve_table

    try:
        res = bench_serve(args.artifact, device=args.device, clients=args.clients, requests=args.requests,
                          batch_images=args.batch_images, n_names=args.names, seconds=args.seconds)
    except RuntimeError as e:  # the server did not come up, or a measurement failed
        return _error(str(e))
    print(format_serve_table(res))
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


# -- parser -----------------------------------------------------------------------------------

def _add_command(sub: argparse._SubParsersAction, name: str, help: str, help_action: type[argparse.Action] | None = None,
                 **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser; ``-v`` is accepted after the command as well as before it."""
    s = sub.add_parser(name, help=help, allow_abbrev=False, add_help=help_action is None, **kwargs)
    if help_action is not None:
        s.add_argument("-h", "--help", action=help_action)
    s.set_defaults(command_prog=s.prog)  # nested commands overwrite their parent's: `promptbake bench serve`
    # SUPPRESS: a subcommand without -v must not reset a -v given before the command
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return s


def _add_artifact_commands(sub: argparse._SubParsersAction) -> None:
    s = _add_command(sub, "export", "bake a trained run into a verified ONNX artifact directory")
    s.set_defaults(handler=cmd_export)
    s.add_argument("--run", required=True, help="a finished run directory")
    s.add_argument("--out", required=True, help="artifact directory to write (ART_DIR)")
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="fp32: within 1e-4 of torch; fp16 (GPUs) / int8 (CPUs): top-1 agrees with torch fp32 on >= "
                        "--min-top1 of up to 256 test images")
    s.add_argument("--min-top1", type=float, metavar="FRACTION",
                   help="fp16 / int8: the top-1 agreement with torch fp32 needed (default 0.99)")
    s.add_argument("--bentoml", metavar="NAME", help="also save the artifact to the BentoML model store as NAME")
    s.add_argument("--overwrite", action="store_true", help="replace an existing artifact in --out")

    add_exports_commands(sub, _add_command)
    add_serve_command(sub, _add_command)


def _add_timed_training_args(c: argparse.ArgumentParser) -> None:
    """The training job both training benchmarks time: backbone, data, schedule, seed and threads."""
    c.add_argument("--backbone", default="emoji-vit-s")
    c.add_argument("--dataset", default="emoji-nature")
    c.add_argument("--epochs", type=int, default=2)
    c.add_argument("--shots", type=int, default=16)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--threads", type=int, default=1, help="torch threads per training process (default 1)")


def _add_bench_commands(sub: argparse._SubParsersAction) -> None:
    s = _add_command(sub, "bench", "measurements: `bench train` (the training loop vs a reference-style one), "
                      "`bench serve` (HTTP service), `bench classify` (cost per method), `bench train-cost` (training "
                      "time and memory per method)")
    bench = s.add_subparsers(dest="bench", required=True)

    doc = "promptbake's training loop vs a reference-style (Dassl) loop: epoch time, speed-up and accuracy"
    c = _add_command(bench, "train", doc, description=f"`promptbake bench train`: {doc}. Each loop trains in a fresh "
                     "process on the same method, data, seed, epochs and threads, then is evaluated.")
    c.set_defaults(handler=cmd_bench_train)
    c.add_argument("--method", default="coop")
    _add_timed_training_args(c)
    c.add_argument("--cache-views", type=int, default=0, metavar="N",
                   help="add a row with the image-feature cache of N views (methods that leave the image graph alone)")
    c.add_argument("--min-crop-scale", type=float, help="RandomResizedCrop's smallest area (default: the method's)")
    c.add_argument("--test-per-class", type=int, help="evaluate on the first N test images per class")
    c.add_argument("--json", action="store_true", help="print the raw figures as JSON too")

    doc = "HTTP throughput and latency of a served artifact vs open_clip torch eager"
    c = _add_command(bench, "serve", doc, description=f"`promptbake bench serve`: {doc}.")
    c.set_defaults(handler=cmd_bench_serve)
    c.add_argument("--artifact", required=True, metavar="ART_DIR")
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--clients", type=int, default=16, help="concurrent clients for the batched rows (default 16)")
    c.add_argument("--requests", type=int, default=64, help="requests per row (default 64)")
    c.add_argument("--batch-images", type=int, default=8, help="images per request in the client-batch row (default 8)")
    c.add_argument("--names", type=int, default=1000, help="class names for the cold vs cached row (default 1000)")
    c.add_argument("--seconds", type=float, default=3.0, help="time per in-process measurement (default 3)")
    c.add_argument("--json", action="store_true", help="print the raw figures as JSON too")

    doc = "epoch time and peak memory of several methods' training, each in a fresh process"
    c = _add_command(bench, "train-cost", doc, description=f"`promptbake bench train-cost`: {doc}.")
    c.set_defaults(handler=cmd_bench_train_cost)
    c.add_argument("--methods", default="coop,skipt", help="comma-separated methods; ratios are to the first (default coop,skipt)")
    _add_timed_training_args(c)
    c.add_argument("--batch-size", type=int, help="one batch size for every method (default: each method's reference)")
    c.add_argument("--json", action="store_true", help="print the raw figures as JSON too")

    doc = "in-process cost of one classification with each artifact (methods side by side)"
    c = _add_command(bench, "classify", doc, description=f"`promptbake bench classify`: {doc}.")
    c.set_defaults(handler=cmd_bench_classify)
    c.add_argument("--artifact", required=True, action="append", metavar="ART_DIR",
                   help="an exported artifact; repeat for more (ratios are to the first)")
    c.add_argument("--names", default="10,100", help="comma-separated class-name counts (default 10,100)")
    c.add_argument("--images", default="1,8", help="comma-separated images per call (default 1,8)")
    c.add_argument("--seconds", type=float, default=1.0, help="length of one timed block (default 1)")
    c.add_argument("--rounds", type=int, default=5, help="timed blocks per artifact and setting; the median is kept (default 5)")
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--descriptions", type=int, default=5,
                   help="sentences sent per class name to artifacts that embed classes from descriptions, per "
                        "attribute to those that read attribute trees (TAP) (default 5)")
    c.add_argument("--json", action="store_true", help="print the raw figures as JSON too")


def _int_list(text: str, option: str, minimum: int = 1) -> list[int]:
    """Parse "1,2,3" for `option`: whole numbers >= `minimum`, each once, in the order given."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < minimum or len(set(values)) != len(values):
        raise ValueError(f"{option} takes distinct comma-separated whole numbers >= {minimum}, got {text!r}")
    return values


def cmd_bench_train_cost(args: argparse.Namespace) -> int:
    from training.bench.train_cost import bench_train_cost, format_train_cost_table

    methods = [m for m in args.methods.split(",") if m.strip()]
    if not methods or args.epochs < 1 or args.threads < 1:
        raise ValueError("--methods needs at least one method; --epochs and --threads must be >= 1")
    options = {"batch_size": args.batch_size} if args.batch_size else {}
    rows = bench_train_cost(methods, args.backbone, args.dataset, epochs=args.epochs, shots=args.shots, seed=args.seed,
                            threads=args.threads, train_options=options)
    print(format_train_cost_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_bench_classify(args: argparse.Namespace) -> int:
    from training.bench.classify import bench_classify, format_classify_table

    rows = bench_classify(args.artifact, names=_int_list(args.names, "--names"), images=_int_list(args.images, "--images"),
                          seconds=args.seconds, rounds=args.rounds, device=args.device, descriptions=args.descriptions)
    print(format_classify_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options; imports no torch (handlers import what they need when run)."""
    p = _Parser(prog="promptbake", allow_abbrev=False, description="Train, evaluate, export and serve CLIP prompt-learning methods.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and other packages' INFO)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # takes_extra: the command receives the arguments its parser does not know (see main)
    p.set_defaults(takes_extra=False)
    sub = p.add_subparsers(dest="command", required=True)

    s = _add_command(sub, "methods", "registered prompt methods and their capabilities")
    s.set_defaults(handler=cmd_methods)
    s.add_argument("--json", action="store_true")
    _add_command(sub, "datasets", "dataset spec forms and known dataset names").set_defaults(handler=cmd_datasets)
    _add_command(sub, "backbones", "backbone spec forms and named backbones").set_defaults(handler=cmd_backbones)

    s = _add_command(
        sub, "train", "train a method on the base classes of a dataset", help_action=_TrainHelp,
        epilog="Method options (e.g. --n-ctx, --ctx-init for coop) are listed by `promptbake train --method NAME --help`.",
    )
    s.set_defaults(handler=cmd_train, takes_extra=True)  # the extra arguments are the method's options
    s.add_argument("--method", required=True)
    s.add_argument("--config", metavar="FILE", help="options from a JSON or YAML file (a run's run.json works: "
                   "the same job again, e.g. with another --seed or --out); options on the line win")
    s.add_argument("--backbone", required=True, help="test-tiny | MODEL:TAG | MODEL:/path/weights | hf-hub:ORG/REPO | local-dir:PATH")
    s.add_argument("--dataset", required=True, help="coop:NAME:ROOT | folder:ROOT | a benchmark name")
    s.add_argument("--shots", type=int, default=16, help="images per base class (default 16)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True, help="run directory (resumed if it holds the same interrupted run)")
    s.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    s.add_argument("--descriptions", metavar="FILE", help='class descriptions in CuPL format ({"class": ["sentence", ...]}), '
                   'or attribute trees ({"class": {"attribute": ["sentence", ...]}}) for tap, for methods that train on '
                   "them (default on emoji benchmarks: the shipped ones, from CLDR and emoji-test)")
    s.add_argument("--init-run", metavar="RUN", help="the finished run a method starts from (dpc: a run of its --host "
                   "on the same dataset and shots)")
    s.add_argument("--no-progress", action="store_true")
    g = s.add_argument_group(
        "training options",
        "Unset options take the method's reference values (its train_defaults, e.g. coop: 200 epochs, batch 32, "
        "lr 0.002; see docs/methods.md), then the TrainConfig defaults shown here.",
    )
    _add_dataclass_options(g, TrainConfig)

    s = _add_command(sub, "eval", "base / novel / HM accuracy of trained runs; writes RUN/metrics.json")
    s.set_defaults(handler=cmd_eval)
    s.add_argument("--run", required=True, nargs="+", help="one or more run directories (several seeds: mean ± std)")
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")

    s = _add_command(sub, "quickstart", "train, evaluate, export and classify novel names once, offline (the main job)")
    s.set_defaults(handler=cmd_quickstart)
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--method", default="coop")
    s.add_argument("--backbone", default="emoji-vit-s")
    s.add_argument("--dataset", default="emoji-nature",
                   help="default emoji-nature: colour art, the benchmark emoji-vit-s knows best")
    s.add_argument("--epochs", type=int, default=10, help="short by default; the reference config trains longer")
    s.add_argument("--min-crop-scale", type=float, default=0.5,
                   help="RandomResizedCrop's smallest area (default 0.5: the 48 px scenes hold one glyph, which the "
                        "reference 0.08 usually crops away; 0 = the method's reference value)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--no-progress", action="store_true")

    s = _add_command(sub, "atprompt-search", "ATPrompt's differentiable search: propose attribute words for a dataset")
    s.set_defaults(handler=cmd_atprompt_search)
    s.add_argument("--backbone", default="emoji-vit-s")
    s.add_argument("--dataset", required=True)
    s.add_argument("--candidates", help="comma-separated candidate words (default on emoji benchmarks: the CLDR "
                   "keywords most shared by the base classes)")
    s.add_argument("--top", type=int, default=5, help="candidates taken from the keywords (default 5, as the reference)")
    s.add_argument("--sizes", default="1,2,3", help="combination sizes searched (default 1,2,3; the reference code: 3,4,5)")
    s.add_argument("--shots", type=int, default=16)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--epochs", type=int, default=40, help="default 40, the reference's")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default="auto")
    s.add_argument("--out", help="write the ranking and the weights per epoch to this JSON file")

    s = _add_command(sub, "plot", "a run's loss and accuracy per epoch as a PNG (needs matplotlib)")
    s.set_defaults(handler=cmd_plot)
    s.add_argument("run", help="a run directory (promptbake train --out)")
    s.add_argument("--out", help="the PNG to write (default RUN/curves.png)")

    s = _add_command(sub, "benchmark", "the base-to-novel protocol over methods x datasets x seeds (resumable)")
    s.set_defaults(handler=cmd_benchmark)
    s.add_argument("--config", metavar="FILE", help="options from a JSON or YAML file; options on the line win")
    s.add_argument("--methods", required=True, help="comma-separated method names, or 'all' registered methods; a "
                   "method with options is a row of its own: atprompt[host=maple;attributes=animal,food]")
    s.add_argument("--datasets", required=True, help="comma-separated dataset specs, or 'all' benchmark datasets")
    s.add_argument("--seeds", default="1,2,3")
    s.add_argument("--out", required=True)
    s.add_argument("--backbone", default="emoji-vit-s")
    s.add_argument("--shots", type=int, default=16)
    s.add_argument("--epochs", type=int, help="override every method's reference epochs (quick checks)")
    s.add_argument("--epochs-scale", type=float, metavar="F",
                   help="train each method for F x its reference epochs (at least 3: one warm-up epoch + two)")
    s.add_argument("--min-crop-scale", type=float, help="RandomResizedCrop's smallest area for every method (reference 0.08)")
    s.add_argument("--feature-cache-views", type=int, help="cache image features (methods that allow it)")
    s.add_argument("--test-per-class", type=int, help="evaluate on the first N test images per class (quick checks)")
    s.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train N cells at once, each in its own process with cpu_count/N torch threads (default 1)")
    s.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine's processes (default); ray: every cell a Ray task, retried and resumed "
                        "from its checkpoint if its worker dies (pip install 'promptbake[ray]')")
    s.add_argument("--address", metavar="auto|HOST:PORT",
                   help="ray engine: join this running Ray cluster (default: start a Ray instance on this machine)")
    s.add_argument("--cpus-per-cell", type=int, metavar="N",
                   help="ray engine: CPUs (and torch threads) per cell (default cpu_count/--parallel)")
    s.add_argument("--gpus-per-cell", type=float, default=0.0, metavar="G",
                   help="ray engine: GPUs per cell (default 0: cells train on CPU)")
    s.add_argument("--plot", action="store_true",
                   help="also draw OUT/b2n.png and OUT/vs_zeroshot.png from the finished cells (needs matplotlib)")
    s.add_argument("--collect", action="store_true",
                   help="train nothing: print the table of the cells finished so far (e.g. a running benchmark's progress)")
    s.add_argument("--no-progress", action="store_true")

    # its options live in its own parser (training.benchmark.pretrain): everything after `pretrain`,
    # --help included, goes there, so this one takes none, not even -v
    s = sub.add_parser("pretrain", help="pretrain the embedded emoji-vit-s backbone (resumable); options: promptbake pretrain --help",
                       add_help=False, allow_abbrev=False)
    s.set_defaults(handler=cmd_pretrain, takes_extra=True)

    _add_bench_commands(sub)
    _add_artifact_commands(sub)
    return p


CONFIG_COMMANDS = ("train", "benchmark")
# what a run.json records besides the options that made it
_RECORD_ONLY = ("base_classnames", "capabilities", "format_version")


def load_config_file(path: str) -> dict[str, Any]:
    """A JSON or YAML mapping of option names to values; a run's ``run.json`` is one (its
    ``method_config`` and ``train`` sections are flattened, what it only records is left out)."""
    text = _read_text(path, "--config")
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("method_config", "train") and isinstance(value, dict):
            flat.update(value)
        elif key == "descriptions" and (value is None or isinstance(value, dict)):  # run.json's provenance record
            if value and value.get("kind") == "file":
                flat["descriptions"] = value["source"]
        elif key not in _RECORD_ONLY:
            flat[key] = value
    return flat


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{what} {path}: {e.strerror or e}") from None


def _config_flags(options: dict[str, Any], known: dict[str, argparse.Action]) -> list[str]:
    """Option values -> the flags a user would type (method options too: they are parsed later)."""
    flags: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            negative = "--no-" + key.replace("_", "-")
            if value:
                flags.append(flag)
            elif flag not in known or negative in known:  # BooleanOptionalAction (method options are)
                flags.append(negative)
        elif isinstance(value, (list, tuple)):  # several values, or one comma-separated (--methods, --seeds)
            single = flag in known and known[flag].nargs in (None, "?")
            flags += [flag, ",".join(map(str, value))] if single else [flag, *map(str, value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def expand_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--config FILE`` of train / benchmark replaced by the file's options, placed right after the
    command so that options typed on the line win."""
    argv = list(argv)
    idx = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if idx is None:
        return argv
    if argv[idx].startswith("--config="):
        path, rest = argv[idx].split("=", 1)[1], argv[idx + 1:]
    elif idx + 1 < len(argv):
        path, rest = argv[idx + 1], argv[idx + 2:]
    else:
        raise ValueError("--config needs a file (JSON or YAML; a run's run.json works)")
    argv = argv[:idx] + rest
    command = next((a for a in argv if a in CONFIG_COMMANDS), None)
    if command is None:
        raise ValueError(f"--config is an option of {' and '.join(CONFIG_COMMANDS)}")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = _config_flags(load_config_file(path), dict(sub._option_string_actions))
    at = argv.index(command) + 1
    return argv[:at] + flags + argv[at:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        try:
            argv = expand_config(parser, sys.argv[1:] if argv is None else argv)
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:  # --help, or a usage error already printed (one line, _Parser.error)
            return int(e.code or 0)
        if extra and not args.takes_extra:
            return _error(f"unrecognized arguments: {' '.join(extra)} (see `{args.command_prog} --help`)")
        args.extra = extra
        _setup_logging(args.verbose)
        return args.handler(args)
    # BackboneError, DatasetError, RunError and ArtifactError are ValueErrors; an unknown method is a
    # KeyError (raised while parsing too, by `train --method NAME --help`)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as e:
        return _error(e.args[0] if isinstance(e, KeyError) and e.args else str(e))
    except OSError as e:  # a full or read-only disk, a permission: files are written atomically, so nothing is torn
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}; nothing half-written was left: free the space (or fix the "
                      "permission) and re-run the same command (train and benchmark resume from their last checkpoint)")
    except KeyboardInterrupt:
        print("promptbake: interrupted; re-run the same command to resume (train, benchmark and pretrain continue "
              "from their last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
