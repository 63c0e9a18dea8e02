"""Train and evaluate jobs: the glue between specs on the command line and the library.

``train_job`` writes a run directory (see :mod:`training.runs`); ``eval_job`` reads one back,
re-derives the base/novel split from the dataset spec, and writes ``metrics.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses

import hashlib
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from training.backbones import create_backbone, recorded_backbone_spec, resolve_backbone_spec
from training.benchmark.descriptions import benchmark_attributes, benchmark_descriptions
from training.data import (
    DatasetError,
    Sample,
    SampleDataset,
    build_train_transform,
    load_attributes,
    load_dataset,
    load_descriptions,
    match_descriptions,
    sample_few_shot,
    split_base_novel,
)
from training.evaluate import accuracy_report, harmonic_mean, predict_samples
from training.loop import TrainConfig, resolve_device, stage_plan, train
from training.methods import MethodConfig, PromptMethod, create_method, get_method
from training.prompts.text import every_row_in_full, pad_tokens
from training.runs import (
    CHECKPOINT_FILE,
    LEARNED_FILE,
    LOG_FILE,
    METRICS_FILE,
    RunDir,
    RunError,
    RunInfo,
    atomic_write_json,
)

logger = logging.getLogger(__name__)


def make_train_config(method: str, overrides: Mapping[str, Any], method_cfg: MethodConfig | None = None,
                      *, shots: int | None = None, n_classes: int | None = None) -> TrainConfig:
    """The method's reference training defaults (under ``method_cfg``, default: the method's default
    config), then the caller's overrides. With ``shots`` and ``n_classes`` (the base classes) and no
    epochs given, a method whose reference counts steps tied to the data sets its epochs
    (:meth:`PromptMethod.reference_epochs`)."""
    spec = get_method(method)
    config = method_cfg if method_cfg is not None else spec.config_cls()
    cfg = TrainConfig(**{**spec.method_cls.train_defaults_for(config), **overrides})
    if "epochs" not in overrides and shots is not None and n_classes is not None:
        epochs = spec.method_cls.reference_epochs(config, shots * n_classes, shots, cfg.batch_size)
        if epochs is not None:
            cfg = dataclasses.replace(cfg, epochs=epochs)
    return cfg


def uses_descriptions(method: str, method_cfg: MethodConfig) -> bool:
    """Whether a method trains on class descriptions or embeds classes from them at test time."""
    cls = get_method(method).method_cls
    return cls.needs_train_descriptions or cls.capabilities_for(method_cfg).needs_class_descriptions


_FORMATS = {"sentences": '(CuPL format: {"class name": ["sentence", ...]})',
            "attributes": '(attribute trees: {"class name": {"attribute": ["sentence", ...]}})'}


def _load_descriptions_source(path: str | Path | None, dataset: str, kind: str = "sentences"
                              ) -> tuple[dict[str, Any], dict[str, str]]:
    """``kind``: the method's ``description_kind``, "sentences" or "attributes" (trees)."""
    if path:
        try:
            loaded = load_attributes(path) if kind == "attributes" else load_descriptions(path)
        except (OSError, ValueError) as e:
            raise RunError(f"--descriptions {path}: {e} {_FORMATS[kind]}") from None
        return loaded, {"kind": "file", "source": str(Path(path).resolve()),
                        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    try:
        loaded = benchmark_attributes(dataset) if kind == "attributes" else benchmark_descriptions(dataset)
    except DatasetError:
        raise RunError(f"no class descriptions for {dataset}: pass --descriptions FILE {_FORMATS[kind]}") from None
    canonical = json.dumps(loaded, sort_keys=True, ensure_ascii=False).encode()
    return loaded, {"kind": "benchmark", "source": dataset, "sha256": hashlib.sha256(canonical).hexdigest()}


def _sentence_count(descriptions: Mapping[str, Any]) -> int:
    return sum(sum(map(len, v.values())) if isinstance(v, Mapping) else len(v) for v in descriptions.values())


def train_descriptions(path: str | Path | None, dataset: str, classnames: Sequence[str],
                       require_all: bool = False, kind: str = "sentences") -> tuple[dict[str, Any], dict[str, str]]:
    """The classes' descriptions and where they came from (``{"kind", "source", "sha256"}`` for run.json).

    From ``path`` (CuPL format, or attribute trees for ``kind="attributes"``), else the shipped
    descriptions when ``dataset`` is an emoji benchmark. Classes without a description are left out
    (the loop trains on the others, as ProText's reference does), with a warning that counts them;
    none at all is an error, and so is any gap with ``require_all`` (a method that embeds every class
    from its descriptions).
    """
    loaded, source = _load_descriptions_source(path, dataset, kind)
    matched, unmatched = match_descriptions(loaded, classnames)
    if not matched or (require_all and unmatched):
        raise RunError(f"{source['source']}: no descriptions for {len(unmatched)} of the {len(classnames)} classes "
                       f"({', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''})")
    if unmatched:
        logger.warning("%d of %d training classes have no description and are left out of training (%s)",
                       len(unmatched), len(classnames), ", ".join(unmatched[:5]) + (", ..." if len(unmatched) > 5 else ""))
    logger.info("descriptions: %d classes, %d sentences from %s", len(matched), _sentence_count(matched), source["source"])
    return matched, source


def _described_config(method: str, method_cfg: MethodConfig, method_options: Mapping[str, Any],
                      descriptions: str | Path | None, dataset: str, classnames: Sequence[str]
                      ) -> tuple[MethodConfig, dict[str, Any] | None, dict[str, str] | None]:
    """``(config, the training classes' descriptions, their source)`` for a method that uses them (the
    config completed by :meth:`~training.protocol.PromptMethod.options_for_descriptions`; the caller's
    options win), else ``(config, None, None)``."""
    if not uses_descriptions(method, method_cfg):
        if descriptions:
            raise RunError(f"{method} does not use class descriptions; drop --descriptions")
        return method_cfg, None, None
    spec = get_method(method)
    test_time = spec.method_cls.capabilities_for(method_cfg).needs_class_descriptions
    matched, source = train_descriptions(descriptions, dataset, classnames, require_all=test_time,
                                         kind=spec.method_cls.description_kind)
    try:
        derived = spec.method_cls.options_for_descriptions(method_cfg, matched)
        if derived:
            method_cfg = spec.config_cls.from_dict({**derived, **dict(method_options)})
    except ValueError as e:
        raise RunError(f"{method}: {source['source']}: {e}") from None
    return method_cfg, matched, source


def _fit_to_epochs(method: str, method_cfg: MethodConfig, method_options: Mapping[str, Any], epochs: int) -> MethodConfig:
    """The config with the options a method counts in epochs moved to ``epochs``
    (:meth:`~training.protocol.PromptMethod.options_for_epochs`: PromptSRC's aggregation window, TAP's
    cycles); options the caller gave win."""
    spec = get_method(method)
    try:
        moved = {k: v for k, v in spec.method_cls.options_for_epochs(method_cfg, epochs).items() if k not in method_options}
        return spec.config_cls.from_dict({**method_cfg.to_dict(), **moved}) if moved else method_cfg
    except ValueError as e:
        raise RunError(f"{method}: {e}") from None


def recorded_descriptions(info: RunInfo, classnames: Sequence[str]) -> dict[str, Any]:
    """The descriptions a run recorded (its file, or its benchmark's shipped ones) for ``classnames``.

    A file that changed since training is an error: the run's numbers belong to the old one.
    """
    if not info.descriptions:
        raise RunError(f"the {info.method} run records no class descriptions")
    src = info.descriptions
    kind = get_method(info.method).method_cls.description_kind
    loaded, now = _load_descriptions_source(src["source"] if src.get("kind") == "file" else None, info.dataset, kind)
    if now["sha256"] != src["sha256"]:
        raise RunError(f"{src['source']}: the class descriptions changed since the run was trained")
    return match_descriptions(loaded, classnames)[0]


def start_run(method: str, init_run: str | Path | None, method_options: Mapping[str, Any] | None, backbone: str,
              dataset: str, shots: int, base_classnames: Sequence[str]) -> tuple[PromptMethod, dict[str, Any], dict[str, str]]:
    """The trained method of ``init_run`` a ``method`` starts from, the method options completed with
    the host's (``host`` and ``host_options`` come from the run), and what run.json records of it.

    The run must be finished, of the host method, and on the same backbone, dataset, shots and base
    classes: a stage 2 on other data would silently train on a mismatched stage 1.
    """
    if not init_run:
        raise RunError(f"{method} starts from a finished run of its host: pass --init-run RUN "
                       "(e.g. a coop run on the same dataset, shots and seed)")
    host, info = load_run_method(init_run)
    options = dict(method_options or {})
    if options.get("host", info.method) != info.method:
        raise RunError(f"--init-run {init_run} is a {info.method} run, but {method} was given host={options['host']!r}")
    recorded = json.dumps(info.method_config, sort_keys=True)
    if "host_options" in options and json.loads(options["host_options"]) != info.method_config:
        raise RunError(f"host_options {options['host_options']} differ from the --init-run's options {recorded}")
    options.update(host=info.method, host_options=recorded)
    for what, theirs, ours in (("backbone", info.backbone, resolve_backbone_spec(backbone)), ("dataset", info.dataset, dataset),
                               ("shots", info.shots, shots), ("base classes", info.base_classnames, list(base_classnames))):
        if theirs != ours:
            raise RunError(f"--init-run {init_run} was trained with another {what} ({theirs if what != 'base classes' else '...'}); "
                           f"{method} must start from a run on the same data")
    learned = RunDir(init_run).file(LEARNED_FILE)
    record = {"path": str(Path(init_run).resolve()), "method": info.method,
              "sha256": hashlib.sha256(learned.read_bytes()).hexdigest()}
    return host, options, record


def train_job(
    method: str,
    backbone: str,
    dataset: str,
    shots: int,
    seed: int,
    out: str | Path,
    method_options: Mapping[str, Any] | None = None,
    train_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    descriptions: str | Path | None = None,
    init_run: str | Path | None = None,
) -> RunDir:
    """Train ``method`` on the ``shots``-shot base classes of ``dataset``; resumes an interrupted run.

    ``init_run``: the finished run a method that needs one starts from (DPC: a run of its host on
    the same data; see :func:`start_run`).

    ``descriptions``: a CuPL-format file of class descriptions, for methods that train on them
    (default for emoji benchmarks: the shipped ones; see :func:`train_descriptions`).
    """
    spec = get_method(method)
    if shots < 1:
        raise RunError(f"--shots must be >= 1 (images per base class), got {shots}")
    method_options = {**spec.method_cls.options_for_dataset(dataset), **(method_options or {})}
    base, _ = split_base_novel(load_dataset(dataset))
    start = None
    if spec.method_cls.needs_init_run:
        start, method_options, init_info = start_run(method, init_run, method_options, backbone, dataset, shots,
                                                     base.classnames)
    elif init_run:
        raise RunError(f"{method} does not start from another run; drop --init-run")
    method_cfg = spec.config_cls.from_dict(dict(method_options or {}))
    method_cfg, class_descriptions, source = _described_config(method, method_cfg, method_options or {}, descriptions,
                                                               dataset, base.classnames)
    train_cfg = make_train_config(method, train_options or {}, method_cfg, shots=shots, n_classes=len(base.classnames))
    method_cfg = _fit_to_epochs(method, method_cfg, method_options or {}, train_cfg.epochs)
    if train_cfg.select == "best_val" and not base.val:
        raise RunError(f"{dataset} has no validation split for --select best_val; use --select last")
    info = _run_info(method, method_cfg, train_cfg, backbone, dataset, shots, seed, base.classnames)
    if start is not None:
        info.init_run = init_info
    info.descriptions = source
    run = RunDir(out)
    if run.file("run.json").exists():
        previous = recorded_info(run)
        if not previous.same_job(info):
            if not overwrite:
                raise RunError(f"{run.path} holds a different run ({describe_difference(previous, info)}); "
                               "pick another --out or pass --overwrite")
            for name in (CHECKPOINT_FILE, LEARNED_FILE, LOG_FILE, METRICS_FILE):
                run.file(name).unlink(missing_ok=True)
        elif run.is_complete():
            logger.info("%s is already trained; nothing to do", run.path)
            return run
    torch.manual_seed(seed)  # random context initialisation (seeded before the backbone, as always)
    bb = create_backbone(info.backbone)  # a bad backbone spec fails before run.json is written
    model = spec.method_cls(bb, method_cfg, base.classnames)
    try:  # a recipe its epochs cannot hold fails before run.json too
        stage_plan(train_cfg.epochs, model.stages())
    except ValueError as e:
        raise RunError(f"{method}: {e}") from None
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_info(info)
    if class_descriptions is not None:
        model.use_descriptions(class_descriptions)
    if start is not None:
        model.init_from(start)
    train_samples = sample_few_shot(base.train, shots, seed)
    logger.info("training %s on %d base classes, %d images (%d-shot, seed %d)", method, len(base.classnames), len(train_samples), shots, seed)
    augment = build_train_transform(bb.preprocess, train_cfg.min_crop_scale)
    train_set = SampleDataset(train_samples, model.train_transform(augment, bb.preprocess))
    if train_cfg.images_in_memory and model.training_data == "images":
        train_set.keep_decoded()
    tokens = model.tokenize(base.classnames, class_descriptions)
    if train_cfg.full_context:  # the reference's 77-token prompts (bench train's reference-style loop)
        tokens = pad_tokens(tokens, bb.context_length)
    val_samples = sample_few_shot(base.val, min(shots, 4), seed)  # Dassl's few-shot val: min(shots, 4) per class

    def val_accuracy(m: PromptMethod) -> float:
        preds = predict_samples(m, val_samples, base.classnames, device=next(m.parameters()).device,
                                workers=train_cfg.workers, descriptions=class_descriptions)
        return accuracy_report(preds, val_samples, base.classnames)["acc"]
    with every_row_in_full() if train_cfg.full_context else contextlib.nullcontext():
        train(model, train_set, tokens, train_cfg, run, seed, progress=progress,
              validate=val_accuracy if train_cfg.select == "best_val" else None)
    return run


def job_info(
    method: str,
    backbone: str,
    dataset: str,
    shots: int,
    seed: int,
    method_options: Mapping[str, Any] | None,
    train_options: Mapping[str, Any] | None,
    base_classnames: Sequence[str] | None = None,
    descriptions: str | Path | None = None,
    init_run: str | Path | None = None,
) -> RunInfo:
    """The ``run.json`` of a training job (``base_classnames`` default: loaded from the dataset)."""
    spec = get_method(method)
    if shots < 1:
        raise RunError(f"--shots must be >= 1 (images per base class), got {shots}")
    method_options = {**spec.method_cls.options_for_dataset(dataset), **(method_options or {})}
    init_info = None
    if spec.method_cls.needs_init_run:
        if base_classnames is None:
            base_classnames = split_base_novel(load_dataset(dataset))[0].classnames
        _, method_options, init_info = start_run(method, init_run, method_options, backbone, dataset, shots, base_classnames)
    method_cfg = spec.config_cls.from_dict(dict(method_options or {}))
    if base_classnames is None:
        base_classnames = split_base_novel(load_dataset(dataset))[0].classnames
    method_cfg, _, source = _described_config(method, method_cfg, method_options or {}, descriptions, dataset,
                                              base_classnames)
    train_cfg = make_train_config(method, train_options or {}, method_cfg, shots=shots, n_classes=len(base_classnames))
    method_cfg = _fit_to_epochs(method, method_cfg, method_options or {}, train_cfg.epochs)
    info = _run_info(method, method_cfg, train_cfg, backbone, dataset, shots, seed, base_classnames)
    info.descriptions = source
    info.init_run = init_info
    return info


def _run_info(method: str, method_cfg: MethodConfig, train_cfg: TrainConfig, backbone: str, dataset: str, shots: int, seed: int,
              base_classnames: Sequence[str]) -> RunInfo:
    """``job_info`` from options already parsed into their configs."""
    return RunInfo(
        method=method,
        method_config=method_cfg.to_dict(),
        train=train_cfg.to_dict(),
        backbone=resolve_backbone_spec(backbone),  # never an alias: a later version must not change this run
        dataset=dataset,
        shots=shots,
        seed=seed,
        base_classnames=list(base_classnames),
        capabilities=get_method(method).method_cls.capabilities_for(method_cfg).to_dict(),
    )


def recorded_info(run: RunDir | str | Path) -> RunInfo:
    """A run's ``run.json`` as today's code reads it: the backbone it was built with (a pre-versioning
    alias mapped to its version), and its configs completed with the defaults of options added since
    (an option is only ever added with a default that keeps the earlier behaviour)."""
    info = (run if isinstance(run, RunDir) else RunDir(run)).read_info()
    info.backbone = recorded_backbone_spec(info.backbone)
    method_cfg = get_method(info.method).config_cls.from_dict(dict(info.method_config))
    info.method_config = method_cfg.to_dict()
    info.train = make_train_config(info.method, info.train, method_cfg).to_dict()
    return info


def describe_difference(recorded: RunInfo, wanted: RunInfo) -> str:
    """One line on how a recorded run differs from the wanted one: which fields, and their values."""
    a, b = recorded.job(), wanted.job()
    parts = []
    for key in recorded.differences(wanted):
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            sub = [k for k in sorted(set(a[key]) | set(b[key])) if a[key].get(k) != b[key].get(k)]
            parts += [f"{key}.{k} {a[key].get(k)!r} (asked {b[key].get(k)!r})" for k in sub]
        elif key == "base_classnames":
            parts.append("base_classnames")
        else:
            parts.append(f"{key} {a[key]!r} (asked {b.get(key)!r})")
    return f"{recorded.method} on {recorded.dataset}, seed {recorded.seed}; differs in " + ", ".join(parts)


def load_run_method(run: RunDir | str | Path) -> tuple[PromptMethod, RunInfo]:
    """Rebuild the trained method of a run directory (backbone + learned tensors)."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    info = recorded_info(run)
    bb = create_backbone(info.backbone)
    model = create_method(info.method, bb, info.method_config, info.base_classnames)
    learned = run.load_learned()
    bad = sorted(k for k, v in learned.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise RunError(f"{run.path}: learned tensors {', '.join(bad)} are not finite (the run diverged); retrain it")
    model.load_learned_state(learned)
    return model.eval(), info


def limit_per_class(samples: Sequence[Sample], n: int | None) -> tuple[Sample, ...]:
    """The first ``n`` samples of every class (all when ``n`` is None), in their original order."""
    if n is None:
        return tuple(samples)
    seen: dict[int, int] = {}
    kept = []
    for s in samples:
        if seen.get(s.label, 0) < n:
            seen[s.label] = seen.get(s.label, 0) + 1
            kept.append(s)
    return tuple(kept)


def eval_job(
    run: str | Path,
    batch_size: int = 100,
    device: str = "auto",
    workers: int = 0,
    progress: bool = True,
    test_per_class: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Base and novel accuracy of a trained run; writes and returns ``metrics.json``'s content.

    ``test_per_class`` evaluates on the first N test images of each class only (quick checks);
    ``extra`` is merged into the metrics (e.g. training time).
    """
    rd = RunDir(run)
    model, info = load_run_method(rd)
    ds = load_dataset(info.dataset)
    base, novel = split_base_novel(ds)
    if list(base.classnames) != info.base_classnames:
        raise RunError(f"{info.dataset} no longer has the base classes {rd.path} was trained on")
    dev = resolve_device(device)
    results = {}
    descriptions = recorded_descriptions(info, ds.classnames) if model.capabilities.needs_class_descriptions else None
    for subset in (base, novel):
        test = limit_per_class(subset.test, test_per_class)
        preds = predict_samples(model, test, subset.classnames, batch_size, dev, workers, progress, desc=subset.name,
                                descriptions=descriptions)
        results[subset.name] = accuracy_report(preds, test, subset.classnames)
    metrics = {
        "method": info.method,
        "backbone": info.backbone,
        "dataset": info.dataset,
        "shots": info.shots,
        "seed": info.seed,
        "base_acc": results["base"]["acc"],
        "novel_acc": results["novel"]["acc"],
        "hm": harmonic_mean(results["base"]["acc"], results["novel"]["acc"]),
        "n_test": {"base": results["base"]["n"], "novel": results["novel"]["n"]},
        "test_per_class": test_per_class,  # None: every test image
        "per_class": {"base": results["base"]["per_class"], "novel": results["novel"]["per_class"]},
        "eval_device": str(dev),
        "trained_on": trained_on(rd),
        **(extra or {}),
    }
    atomic_write_json(rd.file(METRICS_FILE), metrics)
    return metrics


def trained_on(run: RunDir) -> list[str] | None:
    """The devices and precisions a run's epochs ran on, from its train log (``["cpu fp32"]``; two
    entries when a resume moved it; [] when no epoch was trained, as for zero-shot; None when an
    epoch was logged before they were recorded: unknown). run.json keeps the options as asked
    (``device: auto``), not what they resolved to."""
    records = run.log_records()
    if any("device" not in r or "precision" not in r for r in records):
        return None
    return list(dict.fromkeys(f"{r['device']} {r['precision']}" for r in records))


#: run.json fields in which the seeds of one job may differ
SEED_FIELDS = frozenset({"seed", "init_run"})


def check_seeds_of_one_job(runs: Sequence[str | Path]) -> None:
    """Runs averaged as seeds must be one job but for the seed (and a DPC's stage-1 run).

    Raises:
        RunError: naming the first run that differs from the first, and how.
    """
    infos = [recorded_info(r) for r in runs]
    for path, info in zip(runs[1:], infos[1:]):
        diff = [k for k in infos[0].differences(info) if k not in SEED_FIELDS]
        if diff:
            raise RunError(f"{path} is not another seed of {runs[0]}: they differ in {', '.join(diff)} "
                           "(eval averages the seeds of one job; evaluate the others separately)")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_metrics_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table of runs, with a mean ± std row when there are several."""
    lines = ["| method | dataset | seed | base | novel | HM |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['dataset']} | {r['seed']} | {r['base_acc']:.2f} | {r['novel_acc']:.2f} | {r['hm']:.2f} |")
    if len(rows) > 1:
        cells = []
        for key in ("base_acc", "novel_acc", "hm"):
            m, s = mean_std([r[key] for r in rows])
            cells.append(f"{m:.2f} ± {s:.2f}")
        lines.append(f"| mean ± std | | {len(rows)} seeds | " + " | ".join(cells) + " |")
    return "\n".join(lines)
