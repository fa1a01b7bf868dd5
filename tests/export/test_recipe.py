"""`lineside-export train-all` end to end on synthetic data: interrupted, resumed, reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lineside.export.recipe import RECOMMENDED
from lineside.export.synth import generate

pytestmark = pytest.mark.export

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("recipe-data")
    generate(root, 40, seed=5, size=(192, 256), images_per_series=10, defect_free_share=0.3)
    return root


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lineside.export.cli", "train-all", "--data", str(data), "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_train_all_resumes_after_an_interruption_and_reports(recipe_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe"
    cmd = _cmd(recipe_data, out, "--minutes", "1")

    # given a recipe killed while the SSD trains (its first checkpoint written)
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ssd_record = out / "runs" / "ssd" / "train.json"
    try:
        deadline = time.monotonic() + 300
        while not ssd_record.is_file():
            assert proc.poll() is None, "the recipe ended before the SSD wrote a checkpoint"
            assert time.monotonic() < deadline, "no SSD checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    before = json.loads(ssd_record.read_text(encoding="utf-8"))
    assert not (out / "report.json").exists()

    # when the same command runs again
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)

    # then it resumed the SSD run (its earlier epochs kept) and finished everything
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming ssd" in done.stderr
    after = json.loads(ssd_record.read_text(encoding="utf-8"))
    assert after["history"][: len(before["history"])] == before["history"]
    assert after["training"]["seconds"] >= before["training"]["seconds"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert set(report["trained"]) == {"ssd", "classifier", "vae"}
    assert (out / "bundle" / "manifest.json").is_file() and (out / "bundle.tar.gz").is_file()
    # the split is by series: no series in two parts
    split = report["split"]
    assert not (set(split["train"]) & set(split["val"]) or set(split["train"]) & set(split["test"]))
    assert set(report["evaluations"]) == {"calibration", "test"}
    test = report["evaluations"]["test"]
    assert test["images"] > 0 and 0.0 <= test["operating_point"]["recall"] <= 1.0
    point = report["validation_operating_point"]
    assert point["target_recall"] == 0.98 and point["recall"] >= 0.98
    # a 1-minute budget (the SSD's share: 31 s) holds no full SSD epoch: the report says so instead of staying silent
    assert report["trained"]["ssd"]["epochs"] == 1 and report["trained"]["ssd"]["stopped_by"] == "budget"
    assert any(w.startswith("ssd: the budget") and "barely trained" in w for w in report["warnings"])
    # the recipe's SSD saves the moving average of its weights (raw ones kept beside it for resuming)
    assert after["training"]["params"]["ema"] == RECOMMENDED["ssd"].ema > 0
    assert (out / "runs" / "ssd" / "raw.params").is_file()
    # what the simulator drew on is on record
    simulated = after["training"]["params"]["simulation"]
    assert simulated["backgrounds"] > 0 and simulated["no_part"] == []
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Test series" in markdown and "operating point" in markdown and "AUROC" in markdown
    # where the figures come from: one row per test series, and each model's learning curve
    assert set(test["per_group"]) == set(split["test"])
    for group, g in test["per_group"].items():
        assert f"| {group} | {g['images']} | {g['defective']} |" in markdown
    for kind, t in report["trained"].items():
        assert len(t["val_loss_by_epoch"]) == t["epochs"] > 0
        assert f"- {kind}: " + ", ".join(f"{v:.3f}" for v in t["val_loss_by_epoch"]) in markdown
    assert report["trained"]["ssd"]["val_loss_by_epoch"] == [h["val_loss"] for h in after["history"]]
    # the budget holds: training (all sessions) within a minute plus one checkpoint's slack
    assert sum(t["seconds"] for t in report["trained"].values()) < 60 * 1.5


def test_train_all_refuses_to_resume_with_other_settings(recipe_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe"
    out.mkdir()
    (out / "recipe.json").write_text(json.dumps({"asked": {"data": "elsewhere"}}), encoding="utf-8")

    done = subprocess.run(
        _cmd(recipe_data, out, "--minutes", "1"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )

    assert done.returncode != 0
    assert "other settings" in done.stderr
