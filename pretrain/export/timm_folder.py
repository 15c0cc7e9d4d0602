"""The folder `timm.create_model("local-dir:DIR", pretrained=True)` loads: config.json (the architecture, the model
arguments it was trained with, the pretrained_cfg with its evaluation transform) and model.safetensors (the vision
tower, its head included). timm finds InternImage once `pretrain.models` is imported (that registers the family)."""
from pathlib import Path

import torch

from pretrain.fileio import atomic_write_json, replacing

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def timm_config(model_name: str, model_args: dict, num_classes: int, data_cfg) -> dict:
    """timm's hub config for `model_name` built with `model_args`, a head of `num_classes` outputs (the classifier, or
    the image-text projection) and the stage's evaluation transform (image size, crop, mean, std)."""
    from timm.models import get_pretrained_cfg

    from pretrain.models import create_model

    model = create_model(model_name, **model_args, num_classes=num_classes, device="meta")
    size = data_cfg.image_size
    pretrained = {k: v for k, v in get_pretrained_cfg(model_name).to_dict().items()
                  if k in ("first_conv", "classifier", "interpolation", "license", "paper_ids")}
    stride = 16 if model.dcnv3_head_x4 is not None else 32  # H/G's head fuses stages 3 and 4 at stride 16
    pretrained.update(input_size=(3, size, size), pool_size=(size // stride, size // stride),
                      crop_pct=data_cfg.augment.eval_crop_pct, mean=tuple(data_cfg.augment.mean),
                      std=tuple(data_cfg.augment.std), num_classes=num_classes)
    return {"architecture": model_name, "num_classes": num_classes, "num_features": model.num_features,
            "global_pool": model.global_pool, "model_args": {**model_args, "num_classes": num_classes},
            "pretrained_cfg": pretrained}


def write_timm_folder(folder: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with replacing(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(folder / CONFIG, config)
    return folder


def load_timm_folder(folder: str | Path) -> torch.nn.Module:
    """The model in a timm folder, in fp32, in eval mode: what `pretrain export onnx` exports."""
    import timm

    import pretrain.models  # noqa: F401 - registers InternImage with timm

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG}; write it with `pretrain consolidate`")
    return timm.create_model(f"local-dir:{folder}", pretrained=True).float().eval()
