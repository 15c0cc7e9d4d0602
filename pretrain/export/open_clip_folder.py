"""The folder `open_clip.create_model_and_transforms("local-dir:DIR")` loads, for an image-text checkpoint:
open_clip_config.json (a CustomTextCLIP whose vision tower is InternImage through open_clip's timm adapter, the text
transformer as trained, the tokenizer's context length, the evaluation transform) and open_clip_model.safetensors in
open_clip's key layout. `import pretrain.models` first: that registers InternImage with timm.

The adapter builds its tower with `timm.create_model(name, num_classes=embed_dim, global_pool=pool)` and no other
arguments, so a model with the released hyper-parameters is named by its timm name; one with overridden ones (the
demo's tiny model) is named `local-dir:` + this folder's absolute path, whose config.json (timm's format) carries them:
such a folder keeps working where it was written."""
from pathlib import Path

import torch

from pretrain.export import timm_folder
from pretrain.fileio import atomic_write_json, replacing

CONFIG, WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
TRUNK = "visual.trunk."  # open_clip's TimmModel holds the timm model as `trunk`; with proj="" its head is the trunk's


def open_clip_state(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageTextModel's state dict (visual.*, text.*, logit_scale) -> CustomTextCLIP's."""
    state = {}
    for key, value in full.items():
        if key.startswith("visual."):
            state[TRUNK + key[len("visual."):]] = value
        elif key == "logit_scale":
            state[key] = value.reshape(())  # ours has shape (1,): ZeRO-3 cannot partition 0-d parameters
        else:
            state[key] = value
    return state


def open_clip_config(timm_cfg: dict, stage_cfg, tower_name: str) -> dict:
    text, data = stage_cfg.text, stage_cfg.data
    vision = {"timm_model_name": tower_name, "timm_model_pretrained": False, "timm_pool": timm_cfg["global_pool"],
              "timm_proj": "", "image_size": data.image_size}
    return {
        "model_cfg": {
            "embed_dim": text.embed_dim, "custom_text": True, "vision_cfg": vision,
            "text_cfg": {"context_length": data.context_length, "vocab_size": text.vocab_size, "width": text.width,
                         "heads": text.heads, "layers": text.layers},
        },
        # open_clip's eval transform resizes the short side to `size` and centre-crops it: it has no crop_pct.
        "preprocess_cfg": {"size": data.image_size, "mean": list(data.augment.mean), "std": list(data.augment.std),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }


def write_open_clip_folder(folder: Path, timm_cfg: dict, stage_cfg, full: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder = folder.resolve()
    released = not timm_cfg["model_args"].keys() - {"num_classes"}
    tower_name = timm_cfg["architecture"] if released else f"local-dir:{folder}"
    folder.mkdir(parents=True, exist_ok=True)
    if not released:
        atomic_write_json(folder / timm_folder.CONFIG, timm_cfg)  # the tower's arguments; its weights are below
    with replacing(folder / WEIGHTS) as tmp:
        save_file(open_clip_state(full), str(tmp))
    atomic_write_json(folder / CONFIG, open_clip_config(timm_cfg, stage_cfg, tower_name))
    return folder
