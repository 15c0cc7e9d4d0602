"""The production schedules (InternImage-H/G) resolve: every stage config validates against the stage schema, the
chain passes each stage's export on, and each stage's SLURM resources give the global batch its config declares: a
contrastive batch of 32,768 pairs for image-text pretraining, the release's 512 images for the classification stages."""
import pytest

from launch.schedule import build_plan, resolved_config
from launch.slurm import SlurmOptions


@pytest.mark.parametrize("name, ranks, image_size", [
    ("internimage_h", {"pretrain": 128, "in22k": 32, "in1k": 32}, 640),
    ("internimage_g", {"pretrain": 256, "in22k": 64, "in1k": 64}, 512),
])
def test_production_schedule(name, ranks, image_size):
    plan = build_plan(f"configs/schedules/{name}.yaml", [])
    assert [s.name for s in plan.stages] == ["pretrain", "in22k", "in1k"]
    configs = [resolved_config(stage) for stage in plan.stages]
    for stage, cfg in zip(plan.stages, configs):
        params = SlurmOptions().for_stage(stage)
        assert params["nodes"] * params["ntasks_per_node"] == ranks[stage.name] and params["gpus_per_node"] == 8
        assert cfg["batch_size"] * ranks[stage.name] == cfg["global_batch"]
        assert cfg["model"]["name"] == name and cfg["model"]["activation_checkpointing"]
        assert cfg["zero"]["stage"] == 3 and cfg["precision"] == "bf16"
        assert cfg["run_dir"] == stage.run_dir
    pretrain, in22k, in1k = configs
    assert pretrain["global_batch"] == 32768
    assert in1k["global_batch"] == 512 and in1k["optim"]["lr"] == 2e-5 and in1k["optim"]["lr_batch"] == 512
    assert in1k["data"]["image_size"] == image_size and in22k["data"]["image_size"] == 384
    assert in1k["ema_decay"] == 0.9999 and in1k["data"]["augment"]["label_smoothing"] == 0.3
    assert in1k["model"]["pretrained"].endswith("in22k/export/backbone.safetensors")
