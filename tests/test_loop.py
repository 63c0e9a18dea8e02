"""The training loop: schedule, learning on a separable set, resume equality, feature cache."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import KillAt, KilledRun

from training.data import SampleDataset, build_train_transform, load_dataset, sample_few_shot, split_base_novel
from training.loop import TrainConfig, learning_rate, train
from training.methods import Capabilities, create_method, get_method
from training.methods.coop import CoOp
from training.runs import CHECKPOINT_FILE, LEARNED_FILE, LOG_FILE, RunDir, load_tensors


def test_schedule_is_constant_warmup_then_cosine():
    cfg = TrainConfig(epochs=10, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    assert learning_rate(cfg, 0) == 1e-5
    # Dassl steps CosineAnnealingLR(T_max=epochs) once per epoch after the warm-up.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for epoch in range(1, 10):
        opt.step()
        cos.step()
        assert learning_rate(cfg, epoch) == pytest.approx(cos.get_last_lr()[0], rel=1e-9)
    assert learning_rate(cfg, 9) > 0


def test_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TrainConfig(precision="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_crop_scale"):
        TrainConfig(min_crop_scale=0.0)


@pytest.fixture(scope="module")
def base_split(colour_root):
    ds = load_dataset(f"folder:{colour_root}")
    base, _ = split_base_novel(ds)
    return base


def _setup(backbone, base, shots=4, seed=1, method="coop", init_seed=0, **options):
    torch.manual_seed(init_seed)
    m = create_method(method, backbone, options or {"ctx_init": "", "n_ctx": 4}, base.classnames)
    ds = SampleDataset(sample_few_shot(base.train, shots, seed), build_train_transform(backbone.preprocess))
    return m, ds, m.tokenize(base.classnames)


def test_coop_loss_falls_and_base_accuracy_rises(tiny_backbone, base_split, tmp_path):
    # a random frozen backbone: the colours separate, but only the learned context can align names to them
    m, ds, tokens = _setup(tiny_backbone, base_split, shots=8, ctx_init="", n_ctx=8)
    cfg = TrainConfig(epochs=12, batch_size=8, lr=0.01, optimizer="adamw")
    train(m, ds, tokens, cfg, RunDir(tmp_path), seed=1, progress=False)
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert len(log) == 12
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert log[-1]["acc"] > log[0]["acc"] + 30
    assert (tmp_path / LEARNED_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_kill_reaches_identical_tensors(tiny_backbone, base_split, tmp_path, optimizer):
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, optimizer=optimizer)
    m, ds, tokens = _setup(tiny_backbone, base_split)
    full = train(m, ds, tokens, cfg, RunDir(tmp_path / "full"), seed=1, progress=False)

    m2, ds2, _ = _setup(tiny_backbone, base_split)
    with pytest.raises(KilledRun):  # dies in the middle of epoch 2
        train(m2, KillAt(ds2, len(ds2) + 3), tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    assert (tmp_path / "killed" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "killed" / LEARNED_FILE).exists()

    m3, ds3, _ = _setup(tiny_backbone, base_split, init_seed=99)  # a different init: the checkpoint must win
    resumed = train(m3, ds3, tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_a_resume_trims_the_log_to_its_checkpoint(tiny_backbone, base_split, tmp_path):
    """A run killed after logging an epoch but before checkpointing it, with a torn last line:
    resumed, its log holds every epoch once and parses."""
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.01)
    m, ds, tokens = _setup(tiny_backbone, base_split)
    run = RunDir(tmp_path / "run")
    with pytest.raises(KilledRun):  # dies in epoch 3: epochs 1 and 2 are logged and checkpointed
        train(m, KillAt(ds, 2 * len(ds) + 1), tokens, cfg, run, seed=1, progress=False)
    with open(run.file(LOG_FILE), "a") as f:  # as if the kill came between epoch 3's log line and its checkpoint
        f.write(json.dumps({"epoch": 3, "loss": 1.0}) + "\n" + '{"epoch": 4, "lo')
    m2, ds2, _ = _setup(tiny_backbone, base_split)
    train(m2, ds2, tokens, cfg, run, seed=1, progress=False)
    epochs = [json.loads(line)["epoch"] for line in run.file(LOG_FILE).read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]
    assert run.trim_log(4) == 0


def test_feature_cache_trains_and_refuses_visual_methods(tiny_backbone, base_split, tmp_path):
    m, ds, tokens = _setup(tiny_backbone, base_split, shots=8)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=0.002, feature_cache_views=3)
    train(m, ds, tokens, cfg, RunDir(tmp_path / "cached"), seed=1, progress=False)
    log = [json.loads(line) for line in (tmp_path / "cached" / LOG_FILE).read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]

    class Visual(CoOp):
        @classmethod
        def capabilities_for(cls, config):
            return Capabilities(changes_image_graph=True)

    v = Visual(tiny_backbone, get_method("coop").config_cls(), base_split.classnames)
    with pytest.raises(ValueError, match="cannot be cached"):
        train(v, ds, tokens, cfg, RunDir(tmp_path / "visual"), seed=1, progress=False)


def test_images_kept_in_memory_train_to_identical_tensors(tiny_backbone, base_split, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01)
    m, ds, tokens = _setup(tiny_backbone, base_split)
    from_disk = train(m, ds, tokens, cfg, RunDir(tmp_path / "disk"), seed=1, progress=False)

    m2, ds2, _ = _setup(tiny_backbone, base_split)
    assert not ds2.keep_decoded(max_bytes=100)  # over the budget: still read from disk
    assert ds2.keep_decoded()
    import training.data.transforms as transforms

    def no_disk(path):
        raise AssertionError(f"read {path} from disk")

    monkeypatch.setattr(transforms, "load_image", no_disk)
    in_memory = train(m2, ds2, tokens, cfg, RunDir(tmp_path / "memory"), seed=1, progress=False)
    assert from_disk.keys() == in_memory.keys()
    for k in from_disk:
        assert torch.equal(from_disk[k], in_memory[k]), k


def test_full_context_tokens_train_like_trimmed_ones(tiny_backbone, base_split, tmp_path):
    """The reference's 77-token prompts (bench train's reference-style loop) and the trimmed ones
    promptbake trains on: the causal text tower makes them the same computation, up to rounding."""
    from training.prompts.text import pad_tokens

    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01)
    m, ds, tokens = _setup(tiny_backbone, base_split)
    assert tokens.shape[-1] < tiny_backbone.context_length
    full = pad_tokens(tokens, tiny_backbone.context_length)
    assert full.shape[-1] == tiny_backbone.context_length and torch.equal(full[..., : tokens.shape[-1]], tokens)
    assert not full[..., tokens.shape[-1]:].any()
    trimmed = train(m, ds, tokens, cfg, RunDir(tmp_path / "trimmed"), seed=1, progress=False)
    m2, ds2, _ = _setup(tiny_backbone, base_split)
    padded = train(m2, ds2, full, cfg, RunDir(tmp_path / "full"), seed=1, progress=False)
    for k in trimmed:
        assert torch.allclose(trimmed[k], padded[k], atol=1e-5), (k, (trimmed[k] - padded[k]).abs().max())
    with pytest.raises(ValueError, match="more than the context length"):
        pad_tokens(full, 10)


def test_amp_needs_cuda(tiny_backbone, base_split, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only machines")
    m, ds, tokens = _setup(tiny_backbone, base_split)
    with pytest.raises(ValueError, match="CUDA"):
        train(m, ds, tokens, TrainConfig(epochs=1, precision="amp"), RunDir(tmp_path), seed=1, progress=False)


def test_zero_epochs_and_untrainable_methods_write_learned_file(tiny_backbone, base_split, tmp_path):
    m, ds, tokens = _setup(tiny_backbone, base_split, method="zeroshot", templates=("a photo of a {}.",))
    learned = train(m, ds, tokens, TrainConfig(epochs=0), RunDir(tmp_path), seed=1, progress=False)
    assert learned == {} and (tmp_path / LEARNED_FILE).is_file()
    assert math.isfinite(float(m.logit_scale()))


class _TwoStage(CoOp):
    """Stage 1 trains the context, stage 2 a temperature on the logits (2SFS-like recipes)."""

    def __init__(self, backbone, config, train_classnames):
        super().__init__(backbone, config, train_classnames)
        self.temp = torch.nn.Parameter(torch.zeros(()))
        self.declare_learned()
        self.snapshots = []

    def stages(self):
        from training.protocol import Stage

        return (Stage("context", 0.5), Stage("temperature", 0.5, warmup=False))

    def begin_stage(self, stage):
        self.ctx.requires_grad_(stage.name == "context")
        self.temp.requires_grad_(stage.name == "temperature")

    def logit_scale(self):
        return super().logit_scale() * self.temp.exp()

    def on_epoch_end(self, epoch, epochs):
        self.snapshots.append((self.ctx.detach().clone(), float(self.temp)))


def _two_stage(backbone, base, init_seed=0):
    torch.manual_seed(init_seed)
    m = _TwoStage(backbone, get_method("coop").config_cls(ctx_init="", n_ctx=4), base.classnames)
    ds = SampleDataset(sample_few_shot(base.train, 4, 1), build_train_transform(backbone.preprocess))
    return m, ds, m.tokenize(base.classnames)


def test_stages_train_their_own_tensors_and_resume_inside_a_stage(tiny_backbone, base_split, tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=4, lr=0.05, warmup_epochs=1)
    m, ds, tokens = _two_stage(tiny_backbone, base_split)
    init_ctx = m.ctx.detach().clone()
    full = train(m, ds, tokens, cfg, RunDir(tmp_path / "full"), seed=1, progress=False)
    assert set(full) == {"ctx", "temp"}  # the declared learned state, whatever trains now
    log = [json.loads(line) for line in (tmp_path / "full" / LOG_FILE).read_text().splitlines()]
    assert [r["stage"] for r in log] == ["context", "context", "temperature", "temperature"]
    # stage 1: warm-up, then its cosine; stage 2 (no warm-up) restarts at the full lr
    assert [r["lr"] for r in log] == [1e-5, pytest.approx(0.025), pytest.approx(0.05), pytest.approx(0.025)]
    (c1, t1), (c2, t2), (c3, t3), (c4, t4) = m.snapshots
    assert not torch.equal(c2, init_ctx) and t1 == t2 == 0.0  # stage 1 moves the context only
    assert torch.equal(c2, c3) and torch.equal(c3, c4) and t4 != 0.0  # stage 2 the temperature only

    m2, ds2, _ = _two_stage(tiny_backbone, base_split)
    with pytest.raises(KilledRun):  # dies in epoch 4 (stage 2): the checkpoint holds stage 2's optimizer state
        train(m2, KillAt(ds2, 3 * len(ds2) + 2), tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    m3, ds3, _ = _two_stage(tiny_backbone, base_split, init_seed=7)
    resumed = train(m3, ds3, tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


class _Alternating(_TwoStage):
    """TAP-like: context and temperature alternate (2, 1, 2, 1 epochs), each its own track."""

    def stages(self):
        from training.protocol import Stage

        return (Stage("context", 2 / 6, track="c"), Stage("temperature", 1 / 6, track="t"),
                Stage("context", 2 / 6, track="c"), Stage("temperature", 1 / 6, track="t"))


def _alternating(backbone, base, init_seed=0):
    torch.manual_seed(init_seed)
    m = _Alternating(backbone, get_method("coop").config_cls(ctx_init="", n_ctx=4), base.classnames)
    ds = SampleDataset(sample_few_shot(base.train, 4, 1), build_train_transform(backbone.preprocess))
    return m, ds, m.tokenize(base.classnames)


def test_stages_of_a_track_share_one_optimizer_and_one_schedule(tiny_backbone, base_split, tmp_path):
    cfg = TrainConfig(epochs=6, batch_size=4, lr=0.05, warmup_epochs=1, optimizer="adamw")
    m, ds, tokens = _alternating(tiny_backbone, base_split)
    steps = {}  # after each epoch: the checkpoint's Adam step counts, per optimizer key

    def read_checkpoint(epoch):
        tensors, meta = load_tensors(tmp_path / "full" / CHECKPOINT_FILE)
        steps[epoch] = {k.removesuffix("/0/step"): int(v) for k, v in tensors.items() if k.endswith("/0/step")}

    full = train(m, ds, tokens, cfg, RunDir(tmp_path / "full"), seed=1, progress=False, on_epoch_end=read_checkpoint)
    log = [json.loads(line) for line in (tmp_path / "full" / LOG_FILE).read_text().splitlines()]
    assert [r["stage"] for r in log] == ["context"] * 2 + ["temperature"] + ["context"] * 2 + ["temperature"]
    # each track: warm-up at its first epoch, then one cosine over its own epochs (context 4, temperature 2)
    c = TrainConfig(epochs=4, lr=0.05, warmup_epochs=1)
    t = TrainConfig(epochs=2, lr=0.05, warmup_epochs=1)
    want = [learning_rate(c, 0), learning_rate(c, 1), learning_rate(t, 0), learning_rate(c, 2), learning_rate(c, 3),
            learning_rate(t, 1)]
    assert [r["lr"] for r in log] == [pytest.approx(v) for v in want]
    # one AdamW per track, its state carried over the other track's phases and checkpointed beside it
    # (the running stage's under optim/, the other's under optim@TRACK/); a finished track's is dropped
    n = len(ds) // 4
    assert steps[2] == {"optim": 2 * n}
    assert steps[3] == {"optim": n, "optim@c": 2 * n}
    assert steps[5] == {"optim": 4 * n, "optim@t": n}
    assert steps[6] == {"optim": 2 * n}

    # killed in the second context phase (epoch 5), resumed by a fresh process: same tensors
    m2, ds2, _ = _alternating(tiny_backbone, base_split)
    with pytest.raises(KilledRun):
        train(m2, KillAt(ds2, 4 * len(ds2) + 2), tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    m3, ds3, _ = _alternating(tiny_backbone, base_split, init_seed=7)
    resumed = train(m3, ds3, tokens, cfg, RunDir(tmp_path / "killed"), seed=1, progress=False)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_a_track_trains_the_same_tensors_in_every_stage(tiny_backbone, base_split, tmp_path):
    class _Wrong(_Alternating):
        def begin_stage(self, stage):
            super().begin_stage(stage)
            self.temp.requires_grad_(stage.name == "temperature" or self.snapshots != [])

    torch.manual_seed(0)
    m = _Wrong(tiny_backbone, get_method("coop").config_cls(ctx_init="", n_ctx=4), base_split.classnames)
    ds = SampleDataset(sample_few_shot(base_split.train, 4, 1), build_train_transform(tiny_backbone.preprocess))
    with pytest.raises(ValueError, match="track 'c' must train the same tensors"):
        train(m, ds, m.tokenize(base_split.classnames), TrainConfig(epochs=6, batch_size=4), RunDir(tmp_path), seed=1,
              progress=False)


def test_stage_plans_are_checked():
    from training.loop import stage_plan
    from training.protocol import Stage

    plan = stage_plan(10, (Stage("a", 0.6), Stage("b", 0.4)))
    assert [(st.name, start, n) for st, start, n in plan] == [("a", 0, 6), ("b", 6, 4)]
    with pytest.raises(ValueError, match="sum to 1"):
        stage_plan(10, (Stage("a", 0.6), Stage("b", 0.6)))
    with pytest.raises(ValueError, match="gets no epoch"):
        stage_plan(1, (Stage("a", 0.5), Stage("b", 0.5)))
    with pytest.raises(ValueError, match="share must be"):
        Stage("c", 0.0)
    with pytest.raises(ValueError, match="track name"):
        Stage("c", 0.5, track="a/b")
    plan = stage_plan(12, (Stage("v", 5 / 12, track="v"), Stage("t", 1 / 12, track="t"),
                           Stage("v", 5 / 12, track="v"), Stage("t", 1 / 12, track="t")))
    assert [(p.track, p.first, p.epochs, p.track_first, p.track_epochs) for p in plan] == [
        ("v", 0, 5, 0, 10), ("t", 5, 1, 0, 2), ("v", 6, 5, 5, 10), ("t", 11, 1, 1, 2)]
    from training.protocol import track_epoch

    assert track_epoch(plan, 7)[0] is plan[2] and track_epoch(plan, 7)[1] == 6
    assert [p.track for p in stage_plan(2, (Stage("a", 0.5), Stage("b", 0.5)))] == ["#0", "#1"]


def test_without_warm_up_the_schedule_is_the_plain_cosine():
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for epoch in range(4):
        assert learning_rate(cfg, epoch) == pytest.approx(cos.get_last_lr()[0], rel=1e-9)
        opt.step()
        cos.step()


def test_best_val_selection_keeps_the_best_epoch_and_survives_a_resume(tiny_backbone, base_split, tmp_path):
    from training.runs import load_tensors

    scores = iter([40.0, 75.0, 75.0, 60.0])  # epoch 2 is best; epoch 3 only ties it

    def validate(method):
        assert not method.training
        snapshots.append(method.learned_state()["ctx"].clone())
        return next(scores)

    snapshots = []
    m, ds, tokens = _setup(tiny_backbone, base_split, shots=2)
    cfg = TrainConfig(epochs=4, batch_size=4, select="best_val")
    stop = [2]

    def interrupt(epoch):
        if epoch == stop[0]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(m, ds, tokens, cfg, RunDir(tmp_path), seed=1, progress=False, on_epoch_end=interrupt, validate=validate)
    _, meta = load_tensors(tmp_path / CHECKPOINT_FILE)
    assert (meta["best_epoch"], meta["best_acc"]) == ("2", "75.0")
    m2, _, _ = _setup(tiny_backbone, base_split, shots=2)
    learned = train(m2, ds, tokens, cfg, RunDir(tmp_path), seed=1, progress=False, validate=validate)
    torch.testing.assert_close(learned["ctx"], snapshots[1])  # epoch 2's tensors, not the last epoch's
    assert not torch.equal(learned["ctx"], snapshots[-1])
    tensors, meta = load_tensors(tmp_path / LEARNED_FILE)
    assert meta["epoch"] == "2" and torch.equal(tensors["ctx"], snapshots[1])
    log = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["val_acc"] for r in log] == [40.0, 75.0, 75.0, 60.0]
    with pytest.raises(ValueError, match="validation split"):
        train(m2, ds, tokens, cfg, RunDir(tmp_path / "other"), seed=1, progress=False)
    with pytest.raises(ValueError, match="select"):
        TrainConfig(select="best_test")  # type: ignore[arg-type]


def test_best_val_selection_leaves_an_averaging_methods_training_alone(tiny_backbone, base_split, tmp_path):
    """PromptSRC averages its epoch ends; choosing the best epoch must neither load that partial
    average into the method mid-run nor keep it: the run trains as with --select last."""
    runs = {}
    for select in ("last", "best_val"):
        torch.manual_seed(0)
        m = create_method("promptsrc", tiny_backbone, {"gpa_mean": 2.0}, base_split.classnames)
        ds = SampleDataset(sample_few_shot(base_split.train, 2, 1), build_train_transform(tiny_backbone.preprocess))
        seen = []
        cfg = TrainConfig(epochs=3, batch_size=4, select=select)
        train(m, ds, m.tokenize(base_split.classnames), cfg, RunDir(tmp_path / select), seed=1, progress=False,
              validate=(lambda method: seen.append({k: v.clone() for k, v in method.learned_state().items()}) or 50.0)
              if select == "best_val" else None)
        runs[select] = (load_tensors(tmp_path / select / CHECKPOINT_FILE)[0], seen)
    last, (best_val, seen) = runs["last"][0], runs["best_val"]
    for k, v in last.items():
        if k.startswith("learned/"):
            torch.testing.assert_close(best_val[k], v)  # the same trajectory to the last epoch
    learned, _ = load_tensors(tmp_path / "best_val" / LEARNED_FILE)
    assert all(torch.equal(learned[k], seen[0][k]) for k in seen[0])  # epoch 1 (ties keep the first), as measured


@pytest.mark.parametrize("options, message", [
    ({"epochs": "2"}, "epochs must be int, got '2'"),
    ({"lr": True}, "lr must be float"),
    ({"optimizer": "adam"}, "optimizer must be one of 'sgd', 'adamw'"),
    ({"adam_betas": (0.9,)}, "adam_betas must be a list of 2 float"),
])
def test_options_of_the_wrong_type_are_named_not_a_type_error(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_method_options_of_the_wrong_type_are_named():
    with pytest.raises(ValueError, match="n_ctx must be int or None, got '4'"):
        get_method("coop").config_cls.from_dict({"n_ctx": "4"})
    with pytest.raises(ValueError, match="top_k must be a list of int"):
        get_method("surpl").config_cls.from_dict({"top_k": "10"})
    assert get_method("atprompt").config_cls.from_dict({"attributes": ["a", "b"]}).attributes == ("a", "b")
    assert get_method("atprompt").config_cls.from_dict({"attributes": "a,b"}).attributes == ("a", "b")
    assert TrainConfig(lr=1).lr == 1  # an int is a fine float
