"""metrics.jsonl always; wandb offline when enabled (no network needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.logging import MetricsLog


@pytest.mark.timeout(120)
def test_metrics_jsonl_and_offline_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, ["data.root=/x", "logging.wandb=true", "logging.name=w"])
    log = MetricsLog(tmp_path, cfg, is_main=True)
    log.write({"global_step": 1, "loss": 2.5, "skipped": {"bad_image": 1}})
    log.write({"global_step": 1, "2014/mean_R1": 0.5}, kind="eval")
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["train", "eval"] and lines[0]["loss"] == 2.5
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_other_ranks_write_nothing(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.root=/x"])
    log = MetricsLog(tmp_path, cfg, is_main=False)
    log.write({"global_step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()
