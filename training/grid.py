"""``promptbake benchmark``: the base-to-novel protocol over methods × datasets × seeds.

Every cell is an ordinary run directory (``DIR/runs/METHOD/DATASET/seedS``) trained by
:func:`training.jobs.train_job` and evaluated by :func:`training.jobs.eval_job`, so a finished cell
(one with ``metrics.json``) is never redone and an interrupted one resumes from its checkpoint.
After every cell ``DIR/results.json`` and ``DIR/results.md`` are rewritten. Finished cells must match
the backbone and options asked for (a table never mixes them). ``parallel`` trains several cells at
once in worker processes; a lock file per cell keeps two invocations off the same cell.

``epochs_scale`` shortens every method's reference schedule by the same factor (CPU budgets):
``epochs = max(MIN_SCALED_EPOCHS, round(reference epochs * scale))``. The floor exists because
every reference schedule starts with one constant warm-up epoch at 1e-5 (a 1-epoch run would never
leave it; 3 epochs train two after it). Options counted in epochs follow the method's
``options_for_epochs`` (PromptSRC's aggregation window).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from exports.tempdirs import pid_alive
from training.config import TrainConfig
from training.logs import configure_logging
from training.data import load_dataset, split_base_novel
from training.jobs import describe_difference, eval_job, job_info, mean_std, recorded_info, train_job
from training.methods import get_method
from training.backbones import resolve_backbone_spec
from training.runs import LOG_FILE, METRICS_FILE, RUN_FILE, RunDir, RunError, RunInfo, atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

ROW_KEYS = ("method", "dataset", "seed", "base_acc", "novel_acc", "hm", "train_seconds")
MIN_SCALED_EPOCHS = 3


def split_methods(text: str) -> list[str]:
    """``--methods`` split at the commas outside brackets: ``coop,atprompt[host=maple;attributes=a,b]``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0:
            raise ValueError(f"unbalanced ']' in --methods {text!r}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in --methods {text!r}")
    return [m.strip() for m in out + [cur] if m.strip()]


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A grid row: ``NAME`` or ``NAME[key=value;key=value]``, a method with options (a plug-in's host,
    ATPrompt's attributes, ...) and training options of its own (``epochs=5``: a row at its reference
    schedule in a scaled grid; ``epochs_scale=1``: the row's own schedule scale). A value is read as
    JSON where it parses (numbers, booleans, lists), else as a string. Method options are checked by the method's config, training options by
    :class:`~training.config.TrainConfig` (:func:`row_options` splits them)."""
    name, _, rest = spec.partition("[")
    name = name.strip()
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]"):
            raise ValueError(f"method {spec!r}: options go in brackets at the end, e.g. atprompt[host=maple]")
        for item in filter(None, (x.strip() for x in rest[:-1].split(";"))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"method {spec!r}: {item!r} is not key=value")
            try:
                options[key.strip().replace("-", "_")] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip().replace("-", "_")] = value.strip()
    spec_ = get_method(name)  # unknown names fail here, with close matches
    method_options, train_options = row_options(options)
    spec_.config_cls.from_dict(_config_options(method_options))
    TrainConfig(**train_options)
    _row_scale(spec, options, None)
    return name, options


def row_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A row's options split into ``(method options, training options)`` (TrainConfig's fields)."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return ({k: v for k, v in options.items() if k not in train_fields and k not in GRID_ROW_KEYS},
            {k: v for k, v in options.items() if k in train_fields})


#: row options the grid itself reads: ``epochs_scale`` = the row's own schedule scale (``twosfs[epochs_scale=1]``:
#: the reference budget in a grid scaled to 10%)
GRID_ROW_KEYS = ("epochs_scale",)


def _row_scale(label: str, options: Mapping[str, Any], default: float | None) -> float | None:
    scale = options.get("epochs_scale", default)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1):
        raise ValueError(f"method {label!r}: epochs_scale must be a number in (0, 1], got {scale!r}")
    return scale


def _dir_name(label: str) -> str:
    """A grid row's directory: its label with brackets and separators made path-safe."""
    return "".join(c if c.isalnum() or c in "-_.=+" else "-" for c in label).strip("-")


#: ``run_grid``'s engines: local processes (the default) or Ray tasks
ENGINES = ("local", "ray")


def run_grid(
    methods: Sequence[str],
    datasets: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    backbone: str,
    shots: int = 16,
    train_options: Mapping[str, Any] | None = None,
    test_per_class: int | None = None,
    progress: bool = True,
    epochs_scale: float | None = None,
    parallel: int = 1,
    collect_only: bool = False,
    engine: str = "local",
    address: str | None = None,
    cpus_per_cell: int | None = None,
    gpus_per_cell: float = 0.0,
) -> list[dict[str, Any]]:
    """Train and evaluate every (method, dataset, seed); returns the result rows (in cell order).

    ``collect_only`` trains nothing and writes nothing: the rows of the cells finished so far (the
    progress of a benchmark running elsewhere), with a count of the others.

    ``parallel`` > 1 trains that many cells at once, each in its own process with ``cpu_count // parallel``
    torch threads (per-epoch progress bars off). Every unfinished cell is claimed up front with a
    ``.grid-lock``; a cell claimed by another live process is left out of this table with a warning
    (re-running collects it).

    ``engine="ray"`` runs every cell as a Ray task instead (:mod:`training.ray_engine`): on a Ray
    instance started here (``address`` None) or on a running cluster (``"auto"``, ``HOST:PORT``),
    each with ``cpus_per_cell`` CPUs and torch threads (default ``cpu_count // parallel``) and
    ``gpus_per_cell`` GPUs; a task whose worker died is retried and resumes from its checkpoint.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "ray" and (address is not None or cpus_per_cell is not None or gpus_per_cell):
        raise ValueError("address, cpus_per_cell and gpus_per_cell are options of the ray engine")
    if cpus_per_cell is not None and cpus_per_cell < 1 or gpus_per_cell < 0:
        raise ValueError(f"cpus_per_cell must be >= 1 and gpus_per_cell >= 0, got {cpus_per_cell}, {gpus_per_cell}")
    if epochs_scale is not None and not 0 < epochs_scale <= 1:
        raise ValueError(f"epochs_scale must be in (0, 1], got {epochs_scale}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    out = Path(out).absolute()  # a Ray worker need not share this process's working directory
    backbone = resolve_backbone_spec(backbone)
    cells = []
    def cell_dir(method: str, dataset: str, seed: int) -> Path:
        return out / "runs" / _dir_name(method) / dataset.replace("/", "_").replace(":", "_") / f"seed{seed}"

    base_classes: dict[str, list[str]] = {}

    def base_classnames(dataset: str) -> list[str]:  # a finished cell must have the dataset's base classes still
        if dataset not in base_classes:
            base_classes[dataset] = list(split_base_novel(load_dataset(dataset))[0].classnames)
        return base_classes[dataset]

    folders: dict[str, str] = {}
    for label in methods:  # one folder per row: `coop,coop` or `x[a=b c],x[a=b-c]` would train one cell twice
        other = folders.setdefault(_dir_name(label), label)
        if other != label or methods.count(label) > 1:
            raise ValueError(f"methods {other!r} and {label!r} would share the cells of runs/{_dir_name(label)}: "
                             "list each row once")
    parsed = {label: parse_method_spec(label) for label in methods}
    for label, dataset, seed in ((m, d, s) for d in datasets for m in methods for s in seeds):
        method, row = parsed[label]
        extra, row_train = row_options(row)
        run = cell_dir(label, dataset, seed)
        method_options, opts = _options_for(method, {**(train_options or {}), **row_train},
                                            _row_scale(label, row, epochs_scale), extra,
                                            shots=shots, n_classes=len(base_classnames(dataset)))
        init_run = None
        if get_method(method).method_cls.needs_init_run:  # DPC: stage 2 of the host's cell in this grid
            host = method_options.get("host", get_method(method).config_cls().host)
            if host not in methods:
                raise ValueError(f"{label} cells start from the {host} cells of the same grid: add {host} to the methods")
            init_run = cell_dir(host, dataset, seed)
        if (run / RUN_FILE).is_file():  # every finished or started cell is checked before anything trains
            recorded = recorded_info(run)
            _check_cell(run, recorded, job_info(method, backbone, dataset, shots, seed, method_options, opts,
                                                base_classnames=base_classnames(dataset), init_run=init_run))
        cells.append(_Cell(label, dataset, seed, run, backbone, shots, method_options, opts, test_per_class, init_run,
                           name=method))
    rows: dict[int, dict[str, Any]] = {}

    def record(i: int, metrics: Mapping[str, Any]) -> None:
        rows[i] = {**_row(cells[i].run, metrics), "method": cells[i].method}  # the row's label (a variant's too)
        logger.info("    %s on %s seed %d: base %.2f  novel %.2f  HM %.2f", cells[i].method, cells[i].dataset,
                    cells[i].seed, metrics["base_acc"], metrics["novel_acc"], metrics["hm"])
        if not collect_only:
            write_results(out, [rows[k] for k in sorted(rows)], methods, datasets)

    todo: list[int] = []
    for i, cell in enumerate(cells):
        if (cell.run / METRICS_FILE).is_file():
            logger.info("[%d/%d] %s on %s seed %d: done before", i + 1, len(cells), cell.method, cell.dataset, cell.seed)
            record(i, _finished_metrics(cell))
        else:
            todo.append(i)
    if collect_only:
        if todo:
            running = sum(_CellLock.claimed(cells[i].run) for i in todo)
            logger.warning("%d of %d cells finished; %d claimed by a running benchmark, %d not started "
                           "(--collect trains nothing)", len(cells) - len(todo), len(cells), running, len(todo) - running)
        return [rows[k] for k in sorted(rows)]
    locks = {}
    try:
        for i in todo:
            lock = _CellLock.take(cells[i].run, out / _CellLock.MUTEX)
            if lock is None:
                logger.warning("[%d/%d] %s on %s seed %d is claimed by another running benchmark (%s; delete it if "
                               "none is running): not in this table", i + 1, len(cells), cells[i].method,
                               cells[i].dataset, cells[i].seed, cells[i].run / _CellLock.NAME)
            elif (cells[i].run / METRICS_FILE).is_file():  # finished by another benchmark since the scan above
                lock.release()
                record(i, _finished_metrics(cells[i]))
            else:
                locks[i] = lock
        for i in [i for i in locks if cells[i].init_run is not None]:
            if not (cells[i].init_run / METRICS_FILE).is_file() and not any(
                    cells[j].run == cells[i].init_run for j in locks):  # its host cell is another benchmark's
                logger.warning("[%d/%d] %s on %s seed %d starts from %s, which another running benchmark is training: "
                               "not in this table", i + 1, len(cells), cells[i].method, cells[i].dataset,
                               cells[i].seed, cells[i].init_run)
                locks.pop(i).release()
        # cells that start from another cell (DPC from its host's) run in a second wave, after all others
        waves = [[i for i in locks if cells[i].init_run is None], [i for i in locks if cells[i].init_run is not None]]
        level = logging.getLogger("training").getEffectiveLevel()  # DEBUG under -v (training.logs)
        threads = cpus_per_cell or max(1, (os.cpu_count() or 1) // parallel)
        ray_cells = None
        if engine == "ray" and any(waves):
            from training.ray_engine import RayCells

            ray_cells = RayCells(address, threads, gpus_per_cell, level)
        for wave in waves:
            if ray_cells is not None:
                _run_pool(ray_cells, cells, wave, record, locks)
            elif parallel == 1 or len(wave) <= 1:
                for i in wave:
                    logger.info("[%d/%d] %s on %s seed %d", i + 1, len(cells), cells[i].method, cells[i].dataset, cells[i].seed)
                    record(i, _train_and_eval(cells[i], progress))
                    locks[i].release()
            else:
                _run_parallel(cells, wave, parallel, threads, level, record, locks)
        if ray_cells is not None:
            ray_cells.shutdown()
    finally:
        for lock in locks.values():
            lock.release()
    return [rows[k] for k in sorted(rows)]


@dataclass(frozen=True)
class _Cell:
    method: str
    dataset: str
    seed: int
    run: Path
    backbone: str
    shots: int
    method_options: dict[str, Any]
    train_options: dict[str, Any]
    test_per_class: int | None
    init_run: Path | None = None
    name: str = ""  # the registered method ("" = the label, ``method``, is one)

    @property
    def method_name(self) -> str:
        return self.name or self.method


def _train_and_eval(cell: _Cell, progress: bool) -> dict[str, Any]:
    """Train (or resume) and evaluate one cell; returns its metrics."""
    t0 = time.perf_counter()
    train_job(cell.method_name, cell.backbone, cell.dataset, cell.shots, cell.seed, cell.run,
              method_options=cell.method_options, train_options=cell.train_options, progress=progress,
              init_run=cell.init_run)
    seconds = _epoch_seconds(cell.run)
    if seconds is None:  # nothing trained (zero-shot): the set-up time
        seconds = round(time.perf_counter() - t0, 1)
    return eval_job(cell.run, progress=progress, test_per_class=cell.test_per_class, extra={"train_seconds": seconds})


def _finished_metrics(cell: _Cell) -> dict[str, Any]:
    """A finished cell's metrics, refused if they were evaluated on another test set (``test_per_class``)."""
    metrics = json.loads((cell.run / METRICS_FILE).read_text())
    if metrics.get("test_per_class") != cell.test_per_class:
        def which(n: int | None) -> str:
            return "every test image" if n is None else f"{n} test images per class"
        raise RunError(f"{cell.run} was evaluated on {which(metrics.get('test_per_class'))}, this benchmark asks for "
                       f"{which(cell.test_per_class)}: a table cannot mix them. Pass the same --test-per-class, "
                       "or another --out")
    return metrics


def _row(run: Path, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: metrics.get(k) for k in ROW_KEYS}
    epoch_seconds = _epoch_seconds(run)
    if epoch_seconds is not None:  # cells evaluated before train_seconds came from the log
        row["train_seconds"] = epoch_seconds
    return row


class _LocalPool:
    """The local engine: ``parallel`` spawned worker processes (the same interface as RayCells)."""

    def __init__(self, parallel: int, threads: int, level: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a forked child would inherit torch's thread pools and locks from this process
        self.pool = ProcessPoolExecutor(parallel, mp_context=mp.get_context("spawn"), initializer=_local_worker_init,
                                        initargs=(threads, level, os.getpid()))

    def submit(self, cell: _Cell, label: str):
        return self.pool.submit(_worker_cell, cell, label)

    def shutdown(self, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=True, cancel_futures=cancel_futures)


def _run_parallel(cells: Sequence[_Cell], todo: Sequence[int], parallel: int, threads: int, level: int, record,
                  locks) -> None:
    logger.info("training %d cells, %d at a time (%d torch thread(s) each)", len(todo), parallel, threads)
    pool = _LocalPool(parallel, threads, level)
    _run_pool(pool, cells, todo, record, locks)
    pool.shutdown()


def _run_pool(pool, cells: Sequence[_Cell], todo: Sequence[int], record, locks) -> None:
    """Submit ``todo``'s cells to ``pool`` (local processes or Ray tasks) and record each as it finishes."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = {}
    for i in todo:
        label = f"[{i + 1}/{len(cells)}] {cells[i].method} on {cells[i].dataset} seed {cells[i].seed}"
        pending[pool.submit(cells[i], label)] = i
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                i = pending.pop(future)
                record(i, future.result())  # a failed cell raises here
                locks[i].release()
    except BaseException:
        pool.shutdown(cancel_futures=True)  # no new cells; every finished epoch is checkpointed
        raise


def _ray_cell(cell: _Cell, label: str, threads: int, use_gpu: bool, level: int) -> dict[str, Any]:
    """A cell as a Ray task (:mod:`training.ray_engine`): the local worker's set-up, then the cell."""
    if not use_gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell on a GPU node trains on the CPU it was given
    _worker_init(threads, level)
    return _worker_cell(cell, label)


def _worker_init(threads: int, level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    configure_logging(level <= logging.DEBUG, "%(asctime)s %(levelname)s [pid %(process)d] %(name)s: %(message)s")


def _local_worker_init(threads: int, level: int, parent: int) -> None:
    """A local worker ends with the benchmark process that started it (Linux): the cell locks hold that
    process's pid, so a worker left training after it died would share its cell with the next run."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died before the signal was armed
            os._exit(1)
    _worker_init(threads, level)


def _worker_cell(cell: _Cell, label: str) -> dict[str, Any]:
    logger.info("%s", label)
    return _train_and_eval(cell, progress=False)


class _CellLock:
    """``RUN/.grid-lock`` holding ``PID HOST`` of the benchmark process that claimed the cell (from its
    start until the cell is done); the lock of a process of this host that is gone is stale. A lock
    of another host, or one that cannot be read, counts as held: only its owner (or a person) can
    tell it is stale.

    Taking a lock is serialised across processes by an advisory lock on ``mutex`` (a file of the grid's
    folder): two benchmarks sharing the folder never both take a cell, nor both clear its stale lock.
    """

    NAME = ".grid-lock"
    MUTEX = ".grid-lock.mutex"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = True

    @classmethod
    def take(cls, run: Path, mutex: Path) -> "_CellLock | None":
        run.mkdir(parents=True, exist_ok=True)
        path = run / cls.NAME
        with _exclusive(mutex):
            if path.exists():
                if cls.claimed(run):
                    return None
                path.unlink()  # stale: its process is gone
            # written whole, then renamed: a reader never sees an empty lock
            atomic_write_bytes(path, f"{os.getpid()} {socket.gethostname()}".encode())
        return cls(path)

    @classmethod
    def claimed(cls, run: Path) -> bool:
        """Whether another process may hold the cell's lock (another host's, or an unreadable one, may)."""
        try:
            fields = (run / cls.NAME).read_text().split()
        except FileNotFoundError:
            return False
        except OSError:
            return True
        if not fields or not fields[0].isdigit():
            return True
        pid, host = int(fields[0]), (fields[1] if len(fields) > 1 else socket.gethostname())
        if host != socket.gethostname():
            return True
        return pid != os.getpid() and pid_alive(pid)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive advisory lock on ``path`` (created if missing) for the ``with`` block; released by
    the kernel if the process dies inside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_cell(run: Path, recorded: RunInfo, wanted: RunInfo) -> None:
    """Refuse to mix runs of other backbones or options into one results table (a finished cell is
    otherwise reused as it is)."""
    if recorded.backbone != wanted.backbone:
        raise RunError(
            f"{run} was trained on {recorded.backbone}, this benchmark asks for {wanted.backbone}: a table cannot mix "
            f"backbones. Pass --backbone {recorded.backbone} to continue that table, or another --out"
        )
    if not recorded.same_job(wanted):
        raise RunError(
            f"{run} was trained with other options ({describe_difference(recorded, wanted)}): a table cannot mix them. "
            "Pass the options it was run with, or another --out"
        )


def _epoch_seconds(run: Path) -> float | None:
    """Training time of a run: the sum of its epochs' times from the train log (None: no log)."""
    if not (run / LOG_FILE).is_file():
        return None
    return round(sum(r.get("seconds", 0.0) for r in RunDir(run).log_records()), 1)


def scaled_epochs(method: str, scale: float, options: Mapping[str, Any] | None = None, *,
                  shots: int | None = None, n_classes: int | None = None, batch_size: int | None = None) -> int:
    """``method``'s reference epochs (under ``options``; for ``shots`` x ``n_classes`` images where its
    reference counts steps tied to the data, :meth:`PromptMethod.reference_epochs`) times ``scale``,
    at least MIN_SCALED_EPOCHS (0 stays 0: zero-shot)."""
    spec = get_method(method)
    config = spec.config_cls.from_dict(_config_options(options))
    defaults = spec.method_cls.train_defaults_for(config)
    ref = defaults.get("epochs", TrainConfig.epochs)
    if shots is not None and n_classes is not None:
        batch = batch_size or defaults.get("batch_size", TrainConfig.batch_size)
        ref = spec.method_cls.reference_epochs(config, shots * n_classes, shots, batch) or ref
    return 0 if ref == 0 else max(MIN_SCALED_EPOCHS, round(ref * scale))


def _config_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (options or {}).items()}


def _options_for(method: str, train_options: Mapping[str, Any] | None, epochs_scale: float | None = None,
                 extra: Mapping[str, Any] | None = None, *, shots: int | None = None,
                 n_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method options, training options)`` of one cell: the row's own options (``extra``), a scaled
    schedule unless epochs are given (with the method's epoch-counted options moved along), and no
    feature cache for methods that change the image graph."""
    opts = dict(train_options or {})
    spec = get_method(method)
    config = spec.config_cls.from_dict(_config_options(extra))
    if epochs_scale is not None and "epochs" not in opts:
        opts["epochs"] = scaled_epochs(method, epochs_scale, extra, shots=shots, n_classes=n_classes,
                                       batch_size=opts.get("batch_size"))
    method_options = spec.method_cls.options_for_epochs(config, opts["epochs"]) if "epochs" in opts else {}
    method_options.update(extra or {})
    if opts.get("feature_cache_views") and spec.method_cls.capabilities_for(config).changes_image_graph:
        logger.info("    %s changes the image graph: trained without the feature cache", method)
        opts.pop("feature_cache_views")
    return method_options, opts


def published_b2n(method: str) -> tuple[float, float, float] | None:
    """The published 11-dataset base-to-novel average of a grid row (a method, or a method with
    options: a plug-in's host), from the method's metadata, if any.

    Our backbone and data differ, so only the direction of each method's effect is comparable.
    """
    name, options = parse_method_spec(method)
    spec = get_method(name)
    return spec.method_cls.published_b2n_for(spec.config_cls.from_dict(_config_options(row_options(options)[0])))


SAME_BAND = 0.5  # |difference| below this many points counts as "no change" when comparing directions


def _direction(delta: float) -> str:
    return "=" if abs(delta) < SAME_BAND else ("+" if delta > 0 else "-")


def results_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], datasets: Sequence[str]) -> str:
    """Markdown: per dataset and method, mean ± std over seeds, then the average over datasets.

    When zero-shot and CoOp have averages too, a second table gives each method's average change
    against both, beside the same changes in the published 11-dataset averages (:func:`published_b2n`).
    """
    lines = ["| dataset | method | seeds | base | novel | HM | train s/run |", "|---|---|---|---|---|---|---|"]
    per_method_avg: dict[str, list[tuple[float, float, float]]] = {m: [] for m in methods}
    per_method_secs: dict[str, list[float]] = {m: [] for m in methods}
    for d in datasets:
        for m in methods:
            cell = [r for r in rows if r["method"] == m and r["dataset"] == d]
            if not cell:
                continue
            stats = [mean_std([r[k] for r in cell]) for k in ("base_acc", "novel_acc", "hm")]
            secs = [r["train_seconds"] for r in cell if r.get("train_seconds") is not None]
            t = f"{sum(secs) / len(secs):.0f}" if secs else "-"
            if secs:
                per_method_secs[m].append(sum(secs) / len(secs))
            lines.append(f"| {d} | {m} | {len(cell)} | " + " | ".join(f"{mu:.2f} ± {sd:.2f}" for mu, sd in stats) + f" | {t} |")
            per_method_avg[m].append(tuple(mu for mu, _ in stats))
    averages: dict[str, tuple[float, ...]] = {}
    for m in methods:
        avg = per_method_avg[m]
        if len(avg) == len(datasets) and avg:
            averages[m] = tuple(sum(x[i] for x in avg) / len(avg) for i in range(3))
            secs = per_method_secs[m]
            t = f"{sum(secs) / len(secs):.0f}" if len(secs) == len(datasets) else ""
            lines.append(f"| **average** | {m} | | " + " | ".join(f"{v:.2f}" for v in averages[m]) + f" | {t} |")
    if {"zeroshot", "coop"} <= set(averages) and len(averages) > 2:
        lines += ["", _directions_table(averages)]
    return "\n".join(lines) + "\n"


def _changes(acc: Sequence[float], zeroshot: Sequence[float], coop: Sequence[float]) -> list[float]:
    """Base and novel accuracy minus zero-shot's, then minus CoOp's."""
    return [acc[0] - zeroshot[0], acc[1] - zeroshot[1], acc[0] - coop[0], acc[1] - coop[1]]


def _cells(changes: Sequence[float]) -> list[str]:
    """Four table cells: each change with its direction, blanks for the ones not compared."""
    return [f"{v:+.2f} ({_direction(v)})" for v in changes] + [""] * (4 - len(changes))


def _directions_table(averages: Mapping[str, tuple[float, ...]]) -> str:
    """Each method's average change in base and novel accuracy against zero-shot and CoOp, ours
    beside the published one, with the direction (+, -, = within SAME_BAND points) and whether
    the directions agree."""
    head = ("| method | base − ZS | novel − ZS | base − CoOp | novel − CoOp | published: base − ZS | novel − ZS "
            "| base − CoOp | novel − CoOp | same direction |")
    lines = [head, "|---" * 10 + "|"]
    for m, (b, n, _) in averages.items():
        if m == "zeroshot":
            continue
        k = 2 if m == "coop" else 4  # CoOp against itself says nothing
        ours = _changes((b, n), averages["zeroshot"], averages["coop"])[:k]
        ref = published_b2n(m)
        if ref is None:
            pub_cells, agree = ["n/a"] * 4, "n/a"
        else:
            pub = _changes(ref, published_b2n("zeroshot"), published_b2n("coop"))[:k]
            pub_cells = _cells(pub)
            agree = f"{sum(_direction(o) == _direction(p) for o, p in zip(ours, pub))}/{k}"
        lines.append(f"| {m} | " + " | ".join(_cells(ours) + pub_cells) + f" | {agree} |")
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[Mapping[str, Any]], methods: Sequence[str], datasets: Sequence[str]) -> None:
    atomic_write_json(out / "results.json", list(rows))
    atomic_write_bytes(out / "results.md", results_table(rows, methods, datasets).encode())
