"""DeepSpeed checkpoint -> fp16/bf16/fp32 weights: the backbone alone (.safetensors, and .pth under 'model' with the
release's key names, which the release's detection/segmentation code loads as a pretrained backbone), and optionally
the full model; and the folders timm and open_clip load (pretrain/export/folders.py). The fp32 weights come from
DeepSpeed's own zero_to_fp32, so the result equals its output, cast. `weights="ema"` writes the EMA instead (put
together from every rank's saved EMA state) over the same tensors: buffers and frozen weights stay as trained."""
from pathlib import Path

import torch

from pretrain.engine.precision import DTYPES
from pretrain.engine.checkpoint import newest_complete, read_manifest, saved_rank_states
from pretrain.engine.ema import whole_ema
from pretrain.engine.safe_loading import weights_only_loads
from pretrain.engine.weights import backbone_from_full
from pretrain.export.folders import write_tool_folders
from pretrain.fileio import atomic_write, atomic_write_json, replacing


WEIGHTS = ("live", "ema")


def consolidate(checkpoint_dir, out_dir, dtype: str = "fp16", tag: str | None = None, full_model: bool = False,
                weights: str = "live") -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {list(WEIGHTS)}, got {weights!r}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    tag = tag or newest_complete(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir}")
    with weights_only_loads(checkpoint_dir / tag):
        full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
        if weights == "ema":
            full.update(_ema_weights(checkpoint_dir / tag, full))
    prefix = read_manifest(checkpoint_dir / tag)["backbone_prefix"]  # the task's: where its backbone sits
    cast = {k: v.to(DTYPES[dtype], copy=True) for k, v in full.items()}  # copies: safetensors refuses views
    backbone = backbone_from_full(cast, prefix)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"backbone_safetensors": out_dir / "backbone.safetensors", "backbone_pth": out_dir / "backbone.pth"}
    with replacing(written["backbone_safetensors"]) as tmp:
        save_file(backbone, str(tmp))
    atomic_write(written["backbone_pth"], lambda f: torch.save({"model": backbone}, f))
    if full_model:
        written["model_safetensors"] = out_dir / "model.safetensors"
        with replacing(written["model_safetensors"]) as tmp:
            save_file(cast, str(tmp))
    written.update(write_tool_folders(out_dir, checkpoint_dir, cast, prefix))
    atomic_write_json(out_dir / "export.json",
                      {"checkpoint": str(checkpoint_dir / tag), "dtype": dtype, "weights": weights, "backbone_tensors": len(backbone),
                       "backbone_parameters": sum(v.numel() for v in backbone.values())})
    return {k: str(v) for k, v in written.items()}


def _ema_weights(folder: Path, live: dict) -> dict:
    try:
        ema = whole_ema(saved_rank_states(folder, "ema"))
    except KeyError:
        raise FileNotFoundError(f"{folder} holds no EMA (its run had no ema_decay): export the live weights") from None
    unknown = sorted(set(ema) - set(live))
    if unknown:
        raise RuntimeError(f"EMA weights {unknown[:3]} are not in the checkpoint's model ({len(unknown)} in all)")
    return ema
