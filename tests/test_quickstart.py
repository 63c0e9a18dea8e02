"""The main job end to end on the tiny backbone: train, eval, export, classify novel names."""
from __future__ import annotations

import json

from training.cli import main


def test_quickstart_runs_every_step(colour_root, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--backbone", "test-tiny", "--dataset", f"folder:{colour_root}",
                 "--epochs", "1", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == {"base_acc", "novel_acc", "hm"}
    assert (out / "run" / "metrics.json").is_file() and (out / "artifact" / "manifest.json").is_file()
    novel = {"magenta", "red", "yellow"}
    assert result["examples"] and all(e["truth"] in novel and e["predicted"] in novel for e in result["examples"])
    assert main(["verify", str(out / "artifact")]) == 0
