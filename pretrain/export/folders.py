"""The tool folders `pretrain consolidate` writes beside the backbone: OUT/timm always, OUT/open_clip for an
image-text checkpoint. What they hold comes from the run's resolved config (RUN_DIR/config.yaml, beside
RUN_DIR/checkpoints): the model's name and arguments, the evaluation transform, the text tower."""
from pathlib import Path

import torch

from pretrain.export.open_clip_folder import write_open_clip_folder
from pretrain.export.timm_folder import timm_config, write_timm_folder


def write_tool_folders(out_dir: Path, checkpoint_dir: Path, full: dict[str, torch.Tensor],
                       prefix: str) -> dict[str, Path]:
    from pretrain.config import load_stage_config
    from pretrain.engine.tasks import ImageTextTask

    config = Path(checkpoint_dir).parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: the run's resolved config names the model to export")
    stage = load_stage_config(config)
    visual = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}  # the head included
    timm_cfg = timm_config(stage.model.name, stage.model.arguments(), visual["head.weight"].shape[0], stage.data)
    written = {"timm": write_timm_folder(out_dir / "timm", timm_cfg, visual)}
    if stage.task == ImageTextTask.name:
        written["open_clip"] = write_open_clip_folder(out_dir / "open_clip", timm_cfg, stage, full)
    return written
