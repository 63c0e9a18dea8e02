"""The one training loop every method uses.

Written once, after Dassl's ``TrainerX`` as CoOp configures it (KaiyangZhou/Dassl.pytorch): SGD
(momentum 0.9, weight decay 5e-4) or AdamW over the method's trainable tensors only, a per-epoch
cosine schedule preceded by a constant warm-up learning rate (``ConstantWarmupScheduler``: epoch 0
runs at 1e-5), the reference augmentations, AMP on CUDA and fp32 on CPU.

Reproducibility: every epoch reseeds its shuffling and augmentation from ``(seed, epoch)``, and the
checkpoint written after each epoch holds the learned tensors and the optimizer state. A run killed
at any point and resumed therefore reaches the same final tensors as an uninterrupted run (for the
same device and worker count).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Callable, Mapping

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.config import TrainConfig  # re-exported; it lives torch-free so the CLI can build its parser
from training.data import SampleDataset
from training.protocol import PromptMethod, stage_plan, track_epoch  # noqa: F401 (stage_plan re-exported)
from training.runs import CHECKPOINT_FILE, LEARNED_FILE, RunDir, RunError, atomic_save_tensors, load_tensors

logger = logging.getLogger(__name__)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Dassl's ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped per epoch; with
    no warm-up, the plain cosine (epoch 0 at the full lr)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    # after a warm-up the cosine successor has stepped once by the first epoch past it
    t = epoch - cfg.warmup_epochs + (1 if cfg.warmup_epochs else 0)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t / max(cfg.epochs, 1)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def _make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    groups = [{"params": g["params"], "lr_scale": float(g.get("lr_scale", 1.0))} for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps)


def _stage_optimizer(method: PromptMethod, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in method.parameters() if p.requires_grad]
    groups = method.param_groups()
    grouped = [id(p) for g in groups for p in g["params"]]
    if sorted(grouped) != sorted(id(p) for p in params):
        raise ValueError(f"{method.name}: param_groups() must hold every trainable tensor exactly once")
    return _make_optimizer(cfg, groups)


def group_lr(cfg: TrainConfig, epoch: int, lr_scale: float) -> float:
    """A parameter group's lr: the warm-up lr for every group, then the cosine of ``lr * lr_scale``."""
    return cfg.warmup_lr if epoch < cfg.warmup_epochs else learning_rate(cfg, epoch) * lr_scale


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, saved: Mapping[str, torch.Tensor]) -> None:
    """``saved``: one optimizer's tensors keyed ``IDX/KEY`` (:func:`_saved_track`)."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in saved.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _other_track_prefix(track: str) -> str:
    """Checkpoint key prefix of a track's optimizer while another track trains (the running one keeps ``optim/``)."""
    return f"optim@{track}/"


def _saved_track(tensors: Mapping[str, torch.Tensor], track: str, checkpoint_track: str | None) -> dict[str, torch.Tensor]:
    """A track's optimizer tensors in a checkpoint (keys ``IDX/KEY``): under ``optim/`` when it was the
    track of the checkpoint's stage (``checkpoint_track``), else under ``optim@TRACK/``; empty if none."""
    prefix = "optim/" if track == checkpoint_track else _other_track_prefix(track)
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class _FeatureCache:
    """Image features of ``views`` augmented views per training image, computed once."""

    def __init__(self, method: PromptMethod, dataset: SampleDataset, views: int, seed: int, device: torch.device, workers: int):
        feats = []
        for v in range(views):
            torch.manual_seed(epoch_seed(seed, 10_000 + v))
            loader = DataLoader(dataset, batch_size=64, shuffle=False, num_workers=workers,
                                generator=torch.Generator().manual_seed(epoch_seed(seed, 10_000 + v)))
            with torch.no_grad():
                feats.append(torch.cat([method.encode_image(x.to(device)).float() for x, _ in loader]))
        self.features = torch.stack(feats, dim=1)  # [N, views, D]
        self.labels = torch.tensor([s.label for s in dataset.samples])

    def batches(self, batch_size: int, generator: torch.Generator):
        n, views = self.features.shape[:2]
        order = torch.randperm(n, generator=generator)
        view = torch.randint(views, (n,), generator=generator)
        stop = n - n % batch_size if n >= batch_size else n  # drop_last, like the image loader
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield self.features[idx, view[idx]], self.labels[idx]


def train(
    method: PromptMethod,
    train_set: SampleDataset,
    tokens: torch.Tensor,
    cfg: TrainConfig,
    run: RunDir,
    seed: int,
    progress: bool = True,
    on_epoch_end: Callable[[int], None] | None = None,
    validate: Callable[[PromptMethod], float] | None = None,
) -> dict[str, torch.Tensor]:
    """Fit ``method`` on ``train_set`` (labels index the classes of ``tokens`` [T, C, L]).

    Resumes from ``run``'s checkpoint when there is one. Returns the final learned tensors, which
    are also written to ``run/learned.safetensors``: the last epoch's, or with ``cfg.select ==
    "best_val"`` those of the epoch whose ``validate(method)`` accuracy was highest (the first of
    equals; the best so far is kept in the checkpoint, so a resumed run selects the same epoch).
    """
    if cfg.select == "best_val" and validate is None:
        raise ValueError("select=best_val needs a validation split to select on")
    device = resolve_device(cfg.device)
    use_amp = device.type == "cuda" and cfg.precision in ("auto", "amp")
    if cfg.precision == "amp" and device.type != "cuda":
        raise ValueError("precision 'amp' needs a CUDA device; use fp32 on CPU")
    method.to(device)
    tokens = tokens.to(device)
    plan = stage_plan(cfg.epochs, method.stages())
    method.begin_stage(plan[0].stage)
    params = [p for p in method.parameters() if p.requires_grad]
    if not params or cfg.epochs == 0:
        if params and cfg.epochs == 0:
            logger.warning("epochs=0: the learned tensors stay at their initialisation")
        learned = method.learned_state()
        atomic_save_tensors(run.file(LEARNED_FILE), learned, {"epoch": "0"})
        return learned
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, checkpoint, best = 0, None, None
    if run.has_checkpoint():
        tensors, meta = load_tensors(run.file(CHECKPOINT_FILE))
        if "best_epoch" in meta:
            best = ({k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")},
                    float(meta["best_acc"]), int(meta["best_epoch"]))
        method.load_learned_state({k.removeprefix("learned/"): v for k, v in tensors.items() if k.startswith("learned/")})
        method.load_training_state({k.removeprefix("state/"): v for k, v in tensors.items() if k.startswith("state/")})
        start_epoch = int(meta["epoch"])
        checkpoint = (tensors, int(meta.get("stage", 0)))  # optim/: that stage's optimizer; optim@T/: track T's
        if meta.get("scaler"):
            scaler.load_state_dict(json.loads(meta["scaler"]))
        logger.info("resuming %s from epoch %d/%d", run.path, start_epoch, cfg.epochs)
    if run.trim_log(start_epoch):
        logger.info("dropped log lines past epoch %d (written after the last checkpoint)", start_epoch)

    cache, cache_seconds = None, 0.0
    data = method.training_texts() if method.training_data == "texts" else train_set
    if cfg.feature_cache_views and method.training_data == "texts":
        raise ValueError(f"{method.name} trains on texts: there are no image features to cache")
    if cfg.feature_cache_views:
        if method.capabilities.changes_image_graph:
            raise ValueError(f"{method.name} changes the image graph: its image features cannot be cached")
        t0 = time.perf_counter()
        method.eval()
        cache = _FeatureCache(method, train_set, cfg.feature_cache_views, seed, device, cfg.workers)
        cache_seconds = time.perf_counter() - t0
        logger.info("cached %d views of %d images in %.1fs", cfg.feature_cache_views, len(train_set), cache_seconds)

    method.on_train_start(data)
    # one optimizer per track (a stage that names no track is one); the schedule runs over the track's epochs
    current, optimizer, stage_cfg, optimizers = -1, None, cfg, {}
    resumed_track = plan[checkpoint[1]].track if checkpoint is not None and 0 <= checkpoint[1] < len(plan) else None
    for epoch in range(start_epoch, cfg.epochs):
        planned, track_index = track_epoch(plan, epoch)
        s = plan.index(planned)
        if s != current:  # a stage begins (or a run resumes inside it): its trainable tensors, optimizer, schedule
            method.begin_stage(planned.stage)
            later = {p.track for p in plan[s:]}
            optimizers = {t: o for t, o in optimizers.items() if t in later}  # a finished track's state is dropped
            optimizer = optimizers.get(planned.track)
            if optimizer is None:
                optimizer = optimizers[planned.track] = _stage_optimizer(method, cfg)
                if checkpoint is not None and resumed_track is not None:
                    _load_optimizer_tensors(optimizer, _saved_track(checkpoint[0], planned.track, resumed_track))
            elif {id(p) for g in optimizer.param_groups for p in g["params"]} != {
                    id(p) for p in method.parameters() if p.requires_grad}:
                raise ValueError(f"{method.name}: the stages of track {planned.track!r} must train the same tensors")
            if checkpoint is not None and {p.track for p in plan[s:]} <= set(optimizers):
                checkpoint = None  # every track still to run has its state back: free the loaded tensors
            first_stage = next(p for p in plan if p.track == planned.track)
            stage_cfg = dataclasses.replace(cfg, epochs=planned.track_epochs,
                                            warmup_epochs=cfg.warmup_epochs if first_stage.stage.warmup else 0)
            if len(plan) > 1:
                logger.info("stage %d/%d %r: epochs %d-%d", s + 1, len(plan), planned.stage.name, planned.first + 1,
                            planned.first + planned.epochs)
            current = s
        lr = learning_rate(stage_cfg, track_index)
        for group in optimizer.param_groups:
            group["lr"] = group_lr(stage_cfg, track_index, group["lr_scale"])
        es = epoch_seed(seed, epoch)
        torch.manual_seed(es)  # augmentations in the main process
        generator = torch.Generator().manual_seed(es)
        if cache is not None:
            batches = cache.batches(cfg.batch_size, generator)
            n_batches = max(len(train_set) // cfg.batch_size, 1)
        else:
            index_batches = method.train_batches(data, cfg.batch_size, generator)
            if index_batches is None:
                batches = DataLoader(
                    data, batch_size=cfg.batch_size, shuffle=True, generator=generator, num_workers=cfg.workers,
                    drop_last=len(data) >= cfg.batch_size, persistent_workers=False,
                )
            else:
                batches = DataLoader(data, batch_sampler=index_batches, num_workers=cfg.workers, persistent_workers=False)
            n_batches = len(batches)
        method.train()
        t0 = time.perf_counter()
        tot_loss, tot_correct, tot_n, n_scored = 0.0, 0, 0, 0
        bar = tqdm(batches, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for step, (x, y) in enumerate(bar, 1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss, logits = method.backward_step(x, y, tokens, are_features=cache is not None, scaler=scaler, amp=use_amp)
            value = loss.item()
            if not math.isfinite(value):  # diverged: stop before the step, so no non-finite tensor is ever saved
                raise RunError(f"{method.name}: the loss became {value} at epoch {epoch + 1}, step {step}; "
                               f"training stopped (try a lower --lr); {run.path} keeps its last finite checkpoint")
            scaler.step(optimizer)
            scaler.update()
            tot_loss += value * y.shape[0]
            if logits is not None:
                tot_correct += int((logits.argmax(-1) == y).sum())
                n_scored += y.shape[0]
            tot_n += y.shape[0]
            bar.set_postfix(loss=f"{tot_loss / tot_n:.4f}", acc=f"{100 * tot_correct / max(n_scored, 1):.1f}", lr=f"{lr:.2e}")
        bar.close()
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "loss": tot_loss / max(tot_n, 1),
            "acc": 100.0 * tot_correct / n_scored if n_scored else None,  # None: the method reports no logits
            "seconds": round(time.perf_counter() - t0, 3),
            "device": str(device),  # what the epoch ran on ("auto" in the config resolved)
            "precision": "amp" if use_amp else "fp32",
        }
        acc = "" if record["acc"] is None else f" acc {record['acc']:.1f}%"
        logger.info("epoch %d/%d loss %.4f%s lr %.2e (%.1fs)", epoch + 1, cfg.epochs, record["loss"], acc, lr, record["seconds"])
        if len(plan) > 1:
            record["stage"] = plan[current].stage.name
        if cache_seconds:  # the feature cache's one-off cost, on the first epoch this process trained
            record["cache_seconds"], cache_seconds = round(cache_seconds, 3), 0.0
        method.on_epoch_end(epoch + 1, cfg.epochs)
        if cfg.select == "best_val":
            method.eval()
            with torch.no_grad():
                record["val_acc"] = float(validate(method))
            if best is None or record["val_acc"] > best[1]:
                # the tensors validate() just measured; final_learned_state() would load a partial epoch
                # average (PromptSRC, TAC) into the method mid-run
                best = ({k: v.detach().clone() for k, v in method.learned_state().items()}, record["val_acc"], epoch + 1)
            logger.info("epoch %d/%d val acc %.2f%% (best %.2f%%, epoch %d)", epoch + 1, cfg.epochs, record["val_acc"],
                        best[1], best[2])
        others = {t: o for t, o in optimizers.items() if o is not optimizer}
        if checkpoint is not None:  # tracks not started since the resume keep their saved state
            for t in {p.track for p in plan[current:]} - set(optimizers):
                kept = _saved_track(checkpoint[0], t, resumed_track)
                if kept:
                    others[t] = kept
        run.append_log(record)  # before the checkpoint: a resume trims the log back to it (RunDir.trim_log)
        _save_checkpoint(run, method, optimizer, scaler, epoch + 1, current, best, others)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)

    if best is not None:
        learned, meta = best[0], {"epoch": str(best[2]), "val_acc": f"{best[1]:.4f}"}
        logger.info("keeping epoch %d (val acc %.2f%%)", best[2], best[1])
    else:
        learned, meta = method.final_learned_state(), {"epoch": str(cfg.epochs)}
    atomic_save_tensors(run.file(LEARNED_FILE), learned, meta)
    return learned


def _save_checkpoint(run: RunDir, method: PromptMethod, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     epoch: int, stage: int = 0, best: tuple[dict[str, torch.Tensor], float, int] | None = None,
                     other_tracks: Mapping[str, torch.optim.Optimizer | Mapping[str, torch.Tensor]] | None = None) -> None:
    """``other_tracks``: the optimizers of tracks other than the running stage's (or their saved
    tensors, for a track not resumed yet), kept under ``optim@TRACK/``."""
    tensors = {f"learned/{k}": v for k, v in method.learned_state().items()}
    tensors.update({f"state/{k}": v for k, v in method.training_state().items()})
    tensors.update(_optimizer_tensors(optimizer))
    for track, other in (other_tracks or {}).items():
        saved = other if isinstance(other, Mapping) else {k.removeprefix("optim/"): v for k, v in _optimizer_tensors(other).items()}
        tensors.update({f"{_other_track_prefix(track)}{k}": v for k, v in saved.items()})
    meta = {"epoch": str(epoch), "stage": str(stage)}
    if best is not None:  # best_val selection: the best epoch so far travels with the checkpoint
        tensors.update({f"best/{k}": v for k, v in best[0].items()})
        meta.update(best_acc=repr(best[1]), best_epoch=str(best[2]))
    if scaler.is_enabled():
        meta["scaler"] = json.dumps(scaler.state_dict())
    atomic_save_tensors(run.file(CHECKPOINT_FILE), tensors, meta)

