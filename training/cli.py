"""The ``promptbake`` command line.

Method options and training options are derived from the typed config dataclasses, so a new
method's options appear here without touching this file. Errors a user can cause (bad spec, bad
option, missing file) print one line and exit with status 2; no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin, get_type_hints

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
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- commands ---------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from training.methods import list_methods

    rows = []
    for spec in list_methods():
        caps = spec.method_cls.capabilities_for(spec.config_cls())
        rows.append({"name": spec.name, "description": spec.description, "capabilities": caps.to_dict()})
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
    from training.backbones import list_backbones

    for name, desc in list_backbones():
        print(f"{name:<16} {desc}")
    print(f"{'MODEL:TAG':<16} an open_clip model with a pretrained tag, e.g. ViT-B-16:openai (needs internet)")
    print(f"{'MODEL:PATH':<16} an open_clip model with local weights (.safetensors, or .pt/.bin read with weights_only=True)")
    return 0


def _parse_method_options(method: str, argv: Sequence[str]) -> dict[str, Any]:
    from training.methods import get_method

    spec = get_method(method)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {method}", add_help=False)
    _add_dataclass_options(p, spec.config_cls)
    ns, rest = p.parse_known_args(argv)
    if rest:
        raise SystemExit(f"promptbake: unknown option(s) for method {method}: {' '.join(rest)} (see promptbake train --method {method} --help)")
    return vars(ns)


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from training.jobs import train_job
    from training.loop import TrainConfig

    method_options = _parse_method_options(args.method, extra)
    train_options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    run = train_job(
        args.method, args.backbone, args.dataset, args.shots, args.seed, args.out,
        method_options=method_options, train_options=train_options, overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"trained run: {run.path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from training.jobs import eval_job, format_metrics_table

    rows = [eval_job(r, batch_size=args.batch_size, device=args.device, workers=args.workers, progress=not args.no_progress) for r in args.run]
    print(format_metrics_table(rows))
    return 0


# -- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from training.loop import TrainConfig

    p = argparse.ArgumentParser(prog="promptbake", description="Train, evaluate, export and serve CLIP prompt-learning methods.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="registered prompt methods and their capabilities")
    s.add_argument("--json", action="store_true")
    sub.add_parser("datasets", help="dataset spec forms and known dataset names")
    sub.add_parser("backbones", help="backbone spec forms and named backbones")

    s = sub.add_parser(
        "train", help="train a method on the base classes of a dataset",
        epilog="Method options (e.g. --n-ctx, --ctx-init for coop) are listed by `promptbake train --method NAME --help`.",
    )
    s.add_argument("--method", required=True)
    s.add_argument("--backbone", required=True, help="test-tiny | MODEL:TAG | MODEL:/path/weights")
    s.add_argument("--dataset", required=True, help="coop:NAME:ROOT | folder:ROOT | a benchmark name")
    s.add_argument("--shots", type=int, default=16, help="images per base class (default 16)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True, help="run directory (resumed if it holds the same interrupted run)")
    s.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    s.add_argument("--no-progress", action="store_true")
    g = s.add_argument_group("training options (defaults: the method's reference config)")
    _add_dataclass_options(g, TrainConfig)

    s = sub.add_parser("eval", help="base / novel / HM accuracy of trained runs; writes RUN/metrics.json")
    s.add_argument("--run", required=True, nargs="+", help="one or more run directories (several seeds: mean ± std)")
    s.add_argument("--batch-size", type=int, default=100)
    s.add_argument("--device", default="auto")
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--no-progress", action="store_true")
    return p


def _train_method_help(argv: Sequence[str]) -> bool:
    """`promptbake train --method NAME --help`: show that method's options."""
    if "--method" not in argv or not ({"-h", "--help"} & set(argv)):
        return False
    from training.methods import get_method

    name = argv[argv.index("--method") + 1]
    spec = get_method(name)
    p = argparse.ArgumentParser(prog=f"promptbake train --method {name}", description=spec.description)
    _add_dataclass_options(p, spec.config_cls)
    print((spec.config_cls.__doc__ or "").strip())
    p.print_help()
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from training.backbones import BackboneError
    from training.data import DatasetError
    from training.runs import RunError

    try:
        if argv[:1] == ["train"] and _train_method_help(argv):
            return 0
        parser = build_parser()
        if argv[:1] == ["train"]:
            args, extra = parser.parse_known_args(argv)
        else:
            args, extra = parser.parse_args(argv), []
        _setup_logging(args.verbose)
        if args.command == "train":
            return cmd_train(args, extra)
        return {"methods": cmd_methods, "datasets": cmd_datasets, "backbones": cmd_backbones, "eval": cmd_eval}[args.command](args)
    except (BackboneError, DatasetError, RunError, KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"promptbake: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("promptbake: interrupted; a train command resumes from its last finished epoch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
