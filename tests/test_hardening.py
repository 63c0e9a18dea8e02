"""Careless input to the CLI and the loop: non-finite settings and losses, bad specs, mixed eval runs, export leftovers."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from training.cli import main
from training.config import TrainConfig
from training.runs import atomic_save_tensors, load_tensors


def _train(run, spec, *extra):
    return main(["train", "--method", "coop", "--backbone", "test-tiny", "--dataset", spec, "--shots", "2",
                 "--epochs", "1", "--batch-size", "4", "--out", str(run), "--no-progress", *extra])


@pytest.mark.parametrize("field,value", [("lr", math.nan), ("lr", math.inf), ("warmup_lr", math.nan),
                                         ("weight_decay", math.inf), ("momentum", math.nan),
                                         ("adam_betas", (0.9, math.nan)), ("weight_decay", -1.0)])
def test_non_finite_or_negative_hyper_parameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_refuses_a_non_finite_lr_before_writing_anything(colour_spec, tmp_path, capsys, value):
    assert _train(tmp_path / "run", colour_spec, f"--lr={value}") != 0
    err = capsys.readouterr().err
    assert "lr must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_training_and_leaves_no_trained_run(colour_spec, tmp_path, capsys, monkeypatch):
    from training.methods.coop import CoOp

    calls = {"n": 0}
    real = CoOp.compute_loss

    def diverging(self, *args, **kwargs):
        loss, logits = real(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] >= 2 else loss), logits

    monkeypatch.setattr(CoOp, "compute_loss", diverging)
    run = tmp_path / "run"
    assert _train(run, colour_spec, "--epochs", "2", "--batch-size", "2") != 0
    err = capsys.readouterr().err
    assert "the loss became nan at epoch 1, step 2" in err and "Traceback" not in err
    assert (run / "run.json").exists() and not (run / "learned.safetensors").exists()
    assert main(["eval", "--run", str(run), "--no-progress"]) != 0  # not a trained run


def test_eval_and_export_refuse_non_finite_learned_tensors(colour_spec, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, colour_spec) == 0
    tensors, meta = load_tensors(run / "learned.safetensors")
    tensors["ctx"] = tensors["ctx"].clone()
    tensors["ctx"][0, 0] = math.nan
    atomic_save_tensors(run / "learned.safetensors", tensors, meta)
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--no-progress"]) != 0
    assert "learned tensors ctx are not finite" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "art")]) != 0
    assert "learned tensors ctx are not finite" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_a_bad_backbone_spec_writes_no_run_json_so_the_fixed_command_just_works(colour_spec, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--method", "coop", "--backbone", f"ViT-B-32:{tmp_path / 'missing.safetensors'}",
                 "--dataset", colour_spec, "--shots", "2", "--epochs", "1", "--out", str(run), "--no-progress"]) != 0
    assert "Traceback" not in capsys.readouterr().err
    assert not (run / "run.json").exists()
    assert _train(run, colour_spec) == 0  # no --overwrite needed


@pytest.mark.parametrize("shots", ["0", "-1"])
def test_zero_or_negative_shots_are_refused(colour_spec, tmp_path, capsys, shots):
    argv = ["train", "--method", "coop", "--backbone", "test-tiny", "--dataset", colour_spec, "--shots", shots,
            "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) != 0
    assert "--shots must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_eval_refuses_to_average_runs_of_different_jobs(colour_spec, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _train(a, colour_spec) == 0 and _train(b, colour_spec, "--seed", "2") == 0
    assert main(["train", "--method", "kgcoop", "--backbone", "test-tiny", "--dataset", colour_spec, "--shots", "2",
                 "--epochs", "1", "--batch-size", "4", "--out", str(c), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(a), str(c), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert f"{c} is not another seed of {a}" in err and "method" in err
    assert main(["eval", "--run", str(a), str(b), "--no-progress"]) == 0  # two seeds of one job
    assert "2 seeds" in capsys.readouterr().out


def test_export_removes_the_scratch_folders_of_dead_exports(colour_spec, tmp_path):
    from exports.tempdirs import pid_alive

    run = tmp_path / "run"
    assert _train(run, colour_spec) == 0
    dead = 2**22 + 12345
    assert not pid_alive(dead)
    stale = [tmp_path / f".art.tmp-{dead}-abc", tmp_path / ".art.tmp-oldstyle", tmp_path / f".art.fp32-{dead}-x"]
    live = tmp_path / f".art.tmp-{os.getppid()}-live"  # another export still running
    for d in stale + [live]:
        d.mkdir()
        (d / "graph.onnx").write_bytes(b"x" * 1000)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "art")]) == 0
    assert not any(d.exists() for d in stale) and live.exists()
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["method"] == "coop"
    assert [p.name for p in tmp_path.glob(".art.*")] == [live.name]  # nothing of this export is left behind


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_serve_refuses_ports_outside_1_to_65535(port, capsys):
    assert main(["serve", f"--port={port}", "--artifact", "/nonexistent"]) != 0
    err = capsys.readouterr().err
    assert "--port" in err and "65535" in err and err.count("\n") == 1


@pytest.mark.parametrize("var,value", [("PROMPTBAKE_API_KEY", "short"), ("PROMPTBAKE_MAX_IMAGES", "abc"),
                                       ("PROMPTBAKE_READY_TIMEOUT_S", "-3")])
def test_serve_refuses_bad_settings_in_one_line_before_starting(var, value, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("the server must not start"))
    assert main(["serve", "--artifact", "/nonexistent", "--port", "3999"]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"promptbake: error: {var}:") and err.count("\n") == 1


def test_serve_says_in_one_line_that_the_port_is_busy(monkeypatch, capsys):
    import socket

    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("the server must not start"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--artifact", "/nonexistent", "--port", str(port)]) != 0
        err = capsys.readouterr().err
        assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1
    # free again: the checks pass and the artifact is what is missing
    assert main(["serve", "--artifact", "/nonexistent", "--port", str(port)]) != 0
    assert "/nonexistent: no such artifact directory" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["checkpoint", "artifact"])
def test_a_full_disk_is_one_line_and_the_rerun_resumes(where, colour_spec, tmp_path, capsys, monkeypatch):
    import errno

    import training.runs as runs

    run = tmp_path / "run"
    real_save, real_replace = runs.save_file, os.replace
    if where == "checkpoint":  # the second epoch's checkpoint does not fit
        calls = {"n": 0}

        def full(tensors, path, metadata=None):
            calls["n"] += 1
            if calls["n"] == 2:
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: IoError(No space left on device)")
            return real_save(tensors, path, metadata=metadata)

        monkeypatch.setattr(runs, "save_file", full)
        assert _train(run, colour_spec, "--epochs", "3") != 0
        err = capsys.readouterr().err
        assert "checkpoint.safetensors: cannot write" in err and "re-run" in err and "Traceback" not in err
        assert not list(run.glob(".*.safetensors.*"))  # no torn temp file
        monkeypatch.setattr(runs, "save_file", real_save)
        assert _train(run, colour_spec, "--epochs", "3") == 0  # resumes from epoch 1's checkpoint
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1, 2, 3]
    else:  # the export's final rename hits a read-only file system
        assert _train(run, colour_spec) == 0

        def read_only(src, dst):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))

        monkeypatch.setattr(os, "replace", read_only)
        monkeypatch.setattr(os, "rename", read_only)
        capsys.readouterr()
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "art")]) != 0
        err = capsys.readouterr().err
        assert "Read-only file system" in err and "art" in err and err.count("\n") == 1
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.undo()
        assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.*"))
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "art")]) == 0


def _artifact(exported, tmp_path):
    import shutil

    _, art = exported("coop")
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    return copy


def _edit_manifest(art, **changes):
    m = json.loads((art / "manifest.json").read_text())
    for key, value in changes.items():
        target = m
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    (art / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change,message", [
    ({"logit_scale": -100.0}, "logit_scale"), ({"logit_scale": float("inf")}, "logit_scale"),
    ({"parity.max_abs_diff_text": -1.0}, "max_abs_diff_text"), ({"opset": 1}, "opset"),
    ({"embed_dim": 31}, "embed_dim says 31"), ({"preprocess.image_size": 64}, "image_size says 64"),
    ({"tokenizer.context_length": 50}, "context_length says 50"),
])
def test_verify_bounds_every_manifest_field_and_checks_it_against_the_graphs(change, message, exported, tmp_path, capsys):
    art = _artifact(exported, tmp_path)
    _edit_manifest(art, **change)
    assert main(["verify", str(art)]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    from exports.runtime import Predictor
    from exports.manifest import ArtifactError

    with pytest.raises(ArtifactError, match=message):
        Predictor(art)


def test_symlinks_and_other_non_files_are_refused(exported, tmp_path, capsys):
    art = _artifact(exported, tmp_path)
    outside = tmp_path / "outside.onnx"
    (art / "image.onnx").rename(outside)
    (art / "image.onnx").symlink_to(outside)  # same bytes, but it lives outside the artifact
    assert main(["verify", str(art)]) != 0
    assert "image.onnx: a symbolic link" in capsys.readouterr().err
    (art / "image.onnx").unlink()
    outside.rename(art / "image.onnx")
    os.mkfifo(art / "pipe")
    assert main(["verify", str(art)]) != 0
    assert "pipe: not a regular file" in capsys.readouterr().err


def test_the_content_digest_pins_the_artifact(exported, tmp_path, capsys, monkeypatch):
    from exports.manifest import artifact_digest, load_artifact

    art = _artifact(exported, tmp_path)
    assert main(["verify", str(art)]) == 0
    digest = artifact_digest(load_artifact(art))
    assert f"digest {digest}" in capsys.readouterr().out and digest.startswith("sha256:") and len(digest) == 71
    assert main(["verify", str(art), "--expect-digest", digest]) == 0
    # a graph swapped together with its rewritten sha256 passes the file checks, not the pin
    m = json.loads((art / "manifest.json").read_text())
    m["prompt_templates"] = ["X X X X {}!"]  # any edit to the manifest changes the digest
    (art / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["verify", str(art)]) == 0
    assert main(["verify", str(art), "--expect-digest", digest]) != 0
    assert f"is not the expected {digest}" in capsys.readouterr().err
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("the server must not start"))
    assert main(["serve", "--artifact", str(art), "--expect-digest", digest, "--port", "3998"]) != 0
    assert "is not the expected" in capsys.readouterr().err
    monkeypatch.setenv("PROMPTBAKE_ARTIFACT_DIGEST", "sha256:nothex")
    assert main(["serve", "--artifact", str(art), "--port", "3998"]) != 0
    assert "PROMPTBAKE_ARTIFACT_DIGEST" in capsys.readouterr().err


def test_the_service_refuses_an_artifact_with_another_digest_and_reports_its_own(exported, tmp_path, restore_pillow_settings):
    from exports.manifest import ArtifactError, artifact_digest, load_artifact
    from service.config import ServiceConfig
    from service.service import PromptbakeService

    art = _artifact(exported, tmp_path)
    digest = artifact_digest(load_artifact(art))
    svc = PromptbakeService.inner(ServiceConfig(artifact=str(art), artifact_digest=digest))
    assert svc.artifact.digest == digest
    with pytest.raises(ArtifactError, match="is not the expected"):
        PromptbakeService.inner(ServiceConfig(artifact=str(art), artifact_digest="sha256:" + "0" * 64))


def test_tensors_sharing_memory_are_saved_as_copies(tmp_path):
    """safetensors refuses shared memory; several parameters built on one tensor must still checkpoint."""
    base = torch.arange(6.0)
    tensors = {"a": base, "b": base, "c": base[:3]}
    atomic_save_tensors(tmp_path / "t.safetensors", tensors)
    loaded, _ = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("name", ["coop", "surpl", "cpr"])
def test_optional_graph_fields_stay_out_of_the_manifest_and_its_digest_at_their_defaults(name, exported):
    """A field added to the schema must not change the digest of artifacts written before it: at its
    default it is not written, and the digest is the hash of the manifest file's canonical JSON."""
    import hashlib
    import json

    from exports.manifest import MANIFEST_FILENAME, artifact_digest, load_artifact

    _, art = exported(name)
    raw = json.loads((art / MANIFEST_FILENAME).read_text())
    graphs = raw["graphs"]
    for graph in graphs.values():
        if graph is None:
            continue
        assert graph.get("extra_image_inputs", ["x"]) != [] and graph.get("whole_class_list", True) is not False
    assert ("whole_class_list" in (graphs.get("score") or {})) == (name == "cpr")
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert artifact_digest(load_artifact(art)) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
