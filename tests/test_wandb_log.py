"""Optional Weights & Biases logging: an offline run writes its files under RUN_DIR/wandb/, with the logged values."""
import importlib.util

import pytest

from pretrain.config import LoggingConfig
from pretrain.engine.metrics import MetricsLogger
from pretrain.engine.wandb_log import wandb_run_id
from pretrain.typed_config import ConfigError


def test_an_offline_run_writes_its_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = MetricsLogger(tmp_path, True, 4, 0, tensorboard=False, progress_bar=False,
                            wandb_project="test", config={"seed": 3})
    metrics.log(1, {"loss": 2.5, "lr": 0.1, "peak_memory_mb": [1.0, 2.0]})
    metrics.log(2, {"loss": 2.25, "lr": 0.1})
    metrics.close()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{wandb_run_id(tmp_path)}"))
    assert len(runs) == 1
    log = (runs[0] / f"run-{wandb_run_id(tmp_path)}.wandb").read_bytes()  # what `wandb sync` uploads
    assert all(token in log for token in (b"loss", b"2.5", b"2.25", b"seed"))
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss"') == 2  # the usual record, unchanged


def test_enabling_it_without_the_package_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="logging.wandb needs the wandb package"):
        LoggingConfig(wandb=True)
    assert LoggingConfig().wandb is False  # never required
