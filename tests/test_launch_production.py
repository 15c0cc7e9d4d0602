"""The production schedules (InternImage-H/G) resolve: every stage config validates against the stage schema, the
chain passes each stage's export on, and each stage's SLURM resources give the global batch its config declares."""
from pathlib import Path

import pytest

from launch.schedule import build_plan, resolved_config
from launch.slurm import SlurmOptions


@pytest.mark.parametrize("name, ranks", [
    ("internimage_h", {"pretrain": 128, "in22k": 32, "in1k": 32}),
    ("internimage_g", {"pretrain": 256, "in22k": 64, "in1k": 64}),
])
def test_production_schedule(name, ranks):
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
    # The hand-off: each stage starts from the export of the one before it. (The classification stages' values
    # against the release's recipes: tests/test_recipe.py.)
    _, in22k, in1k = configs
    assert in22k["model"]["pretrained"] == str(Path(plan.stages[0].run_dir) / "export/backbone.safetensors")
    assert in1k["model"]["pretrained"] == str(Path(plan.stages[1].run_dir) / "export/backbone.safetensors")
