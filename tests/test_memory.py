import json
import subprocess
import sys

import pytest

from conftest import REPO
from pretrain.config import load_stage_config
from pretrain.engine.memory import GIB, estimate, gradient_bucket_bytes, model_state_bytes

B_224 = ["task=classification", "num_classes=1000", "model.name=internimage_b", "model.args={}", "data.image_size=224", "batch_size=8", "precision=bf16",
         "data.demo_root=null", "data.train=[{shards: /x/000.tar}]"]


def test_zero_stages_partition_what_the_zero_paper_says():
    n, layer, devices = 1_000_000, 10_000, 8
    assert model_state_bytes(n, layer, "bf16", 0, devices) == (2 * n, 2 * n, 12 * n, 0)
    assert model_state_bytes(n, layer, "bf16", 1, devices) == (2 * n, 2 * n, 12 * n / 8, 0)
    assert model_state_bytes(n, layer, "bf16", 2, devices) == (2 * n, 2 * n / 8, 12 * n / 8, 0)
    assert model_state_bytes(n, layer, "bf16", 3, devices) == (2 * n / 8, 2 * n / 8, 12 * n / 8, 4 * layer)
    assert model_state_bytes(n, layer, "fp32", 3, devices)[:3] == (4 * n / 8, 4 * n / 8, 8 * n / 8)


@pytest.mark.parametrize("dtype, element", [("fp32", 4), ("bf16", 2)])
def test_zero3_counts_its_gradient_bucket_in_the_communication_dtype(dtype, element):
    cfg = load_stage_config(REPO / "configs/demo/finetune.yaml", B_224 + ["zero.reduce_bucket_size=1000000",
                                                                           f"zero.communication_data_type={dtype}"])
    assert gradient_bucket_bytes(cfg) == element * 1_000_000
    result = estimate(cfg, devices=8)
    assert result.gradient_bucket == element * 1_000_000
    assert result.total(False) == pytest.approx(result.parameters + result.gradients + result.optimizer +
                                                result.gathered_layer + result.gradient_bucket + result.activations)


def test_activation_checkpointing_cuts_internimage_b_activations_by_more_than_3x():
    cfg = load_stage_config(REPO / "configs/demo/finetune.yaml", B_224)
    result = estimate(cfg, devices=8)
    assert result.activations / result.activations_checkpointed > 3
    # B has 97.5M parameters: ZeRO-3 over 8 devices, bf16 + fp32 Adam = 16 bytes per parameter / 8
    assert (result.parameters + result.gradients + result.optimizer) / GIB == pytest.approx(97_461_832 * 16 / 8 / GIB, rel=0.01)


def test_estimate_memory_command_reports_the_h_schedule_fits_80gb():
    out = subprocess.run([sys.executable, "-m", "launch", "estimate-memory", str(REPO / "configs/demo/finetune.yaml"),
                          *B_224, "model.activation_checkpointing=true", "--nodes", "2", "--gpus-per-node", "8"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["devices"] == 16 and report["fits"]
    assert report["per_device_gib"]["activations_checkpointed"] < report["per_device_gib"]["activations"]


@pytest.mark.parametrize("schedule", ["internimage_h", "internimage_g"])
def test_production_schedules_fit_80gb_gpus(schedule):
    import yaml

    stages = yaml.safe_load((REPO / f"configs/schedules/{schedule}.yaml").read_text())["stages"]
    for stage in stages:
        cfg = load_stage_config(REPO / "configs/schedules" / stage["config"])
        devices = stage["slurm"]["nodes"] * stage["slurm"]["gpus_per_node"]
        assert cfg.batch_size * devices * cfg.optim.grad_accumulation == cfg.global_batch  # what the config declares
        assert cfg.global_batch == (32768 if cfg.task == "image-text" else 512)  # contrastive scale / the release's
        result = estimate(cfg, devices)
        assert result.total(cfg.model.activation_checkpointing) < 80e9 * 0.9, (stage["name"], result.as_gib())
