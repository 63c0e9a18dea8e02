"""A run directory: what was trained, on what, and the learned tensors — nothing else.

Layout of ``RUN_DIR``:
    run.json                 method, its config, training config, backbone and dataset specs,
                             shots, seed and the base class names trained on
    checkpoint.safetensors   after the last finished epoch: learned tensors, optimizer state, the
                             method's extra training state (e.g. PromptSRC's running aggregate)
                             and, under AMP, the grad-scaler state (in the metadata)
    learned.safetensors      final learned tensors (written when training completes)
    train_log.jsonl          one line per epoch (appended before that epoch's checkpoint)
    metrics.json             written by evaluation

Every file but the log is written to a temporary name and renamed, so a kill never leaves a
torn file; the log is trimmed back to the checkpoint's epoch whenever training (re)starts
(:meth:`RunDir.trim_log`), which drops a line written after the last checkpoint or torn by a kill.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

RUN_FORMAT_VERSION = 1
RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
LEARNED_FILE = "learned.safetensors"
LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"


class RunError(ValueError):
    """A run directory that is missing, incomplete or inconsistent."""


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``data`` into ``path`` through a temporary sibling and a rename (never a partial file); ``mode``
    sets the permissions (mkstemp's are 0600; package data is written 0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _own_storage(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU tensors ready for safetensors, which refuses tensors that share memory (tied parameters,
    several parameters built on one tensor): each after the first of a storage is written as a copy."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def atomic_save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        # a non-empty metadata block also keeps a file with no tensors readable (zero-shot runs)
        meta = {"format": "pt", **(metadata or {})}
        try:
            save_file(_own_storage(tensors), tmp, metadata=meta)
        except SafetensorError as e:  # its I/O errors (a full disk) as the OSError they are, naming the file
            raise OSError(f"{path}: cannot write ({e})") from None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a torn or foreign file is a RunError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"cannot read {path}: {e}") from e


@dataclass
class RunInfo:
    """Contents of ``run.json``."""

    method: str
    method_config: dict[str, Any]
    train: dict[str, Any]
    backbone: str
    dataset: str
    shots: int
    seed: int
    base_classnames: list[str]
    capabilities: dict[str, bool] = field(default_factory=dict)
    #: where the training descriptions came from (``{"source", "sha256"}``), for methods that train on them
    descriptions: dict[str, str] | None = None
    #: the finished run training started from (``{"path", "method", "sha256"}`` of its learned tensors), for DPC-like methods
    init_run: dict[str, str] | None = None
    format_version: int = RUN_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "run.json") -> "RunInfo":
        version = data.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise RunError(f"{source}: format_version {version!r} is not supported (expected {RUN_FORMAT_VERSION})")
        try:
            return cls(**data)
        except TypeError as e:
            raise RunError(f"{source}: {e}") from e

    def job(self) -> dict[str, Any]:
        """What identifies the training job: ``to_dict`` without where the start run lay (its method and
        the sha256 of its learned tensors identify it, so a moved or cloned results folder still matches)."""
        data = self.to_dict()
        if data.get("init_run"):
            data["init_run"] = {k: v for k, v in data["init_run"].items() if k != "path"}
        return data

    def same_job(self, other: "RunInfo") -> bool:
        """Whether two run.json describe the same training job (resume is only allowed then)."""
        return self.job() == other.job()

    def differences(self, other: "RunInfo") -> list[str]:
        """The run.json fields in which two runs' jobs differ."""
        a, b = self.job(), other.job()
        return [k for k in a if a[k] != b.get(k)]


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def read_info(self) -> RunInfo:
        p = self.file(RUN_FILE)
        if not p.is_file():
            raise RunError(f"{self.path} is not a promptbake run: {RUN_FILE} is missing")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{p}: not valid JSON ({e})") from e
        return RunInfo.from_dict(data, str(p))

    def write_info(self, info: RunInfo) -> None:
        atomic_write_json(self.file(RUN_FILE), info.to_dict())

    def has_checkpoint(self) -> bool:
        return self.file(CHECKPOINT_FILE).is_file()

    def is_complete(self) -> bool:
        return self.file(LEARNED_FILE).is_file()

    def load_learned(self) -> dict[str, torch.Tensor]:
        p = self.file(LEARNED_FILE)
        if not p.is_file():
            raise RunError(f"{self.path} has no {LEARNED_FILE}: training did not finish (resume it with the same train command)")
        return load_tensors(p)[0]

    def append_log(self, record: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(LOG_FILE), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def log_records(self) -> list[dict[str, Any]]:
        """The epoch records of the train log, in order ([] when there is none; a torn line is left out)."""
        path = self.file(LOG_FILE)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "epoch" in record:
                records.append(record)
        return records

    def trim_log(self, epoch: int) -> int:
        """Keep the log's records of epochs 1..``epoch`` (a resumed run's checkpoint), once each:
        drops what a killed run logged past its last checkpoint and a line torn by the kill (the loop
        logs an epoch before checkpointing it, so every checkpointed epoch is in the log). Rewritten
        atomically; returns how many lines were dropped."""
        path = self.file(LOG_FILE)
        if not path.is_file():
            return 0
        kept, seen, dropped = [], set(), 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                n = int(record["epoch"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if n > epoch or n in seen:
                dropped += 1
                continue
            seen.add(n)
            kept.append(line)
        if dropped:
            atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())
        return dropped
