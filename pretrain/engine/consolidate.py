"""DeepSpeed checkpoint -> fp16/bf16/fp32 weights: the backbone alone (.safetensors, and .pth under 'model' with the
release's key names, which the release's detection/segmentation code loads as a pretrained backbone), and optionally
the full model. The fp32 weights come from DeepSpeed's own zero_to_fp32, so the result equals its output, cast."""
import json
from pathlib import Path

import torch

from pretrain.engine.weights import backbone_from_full

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def consolidate(checkpoint_dir, out_dir, dtype: str = "fp16", tag: str | None = None, full_model: bool = False) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if tag is None and not (checkpoint_dir / "latest").is_file():
        raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}: not a DeepSpeed checkpoint directory")
    full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    prefix = "visual." if any(k.startswith("visual.") for k in full) else ""
    cast = {k: v.to(DTYPES[dtype], copy=True) for k, v in full.items()}  # copies: safetensors refuses views
    backbone = backbone_from_full(cast, prefix)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"backbone_safetensors": out_dir / "backbone.safetensors", "backbone_pth": out_dir / "backbone.pth"}
    save_file(backbone, str(written["backbone_safetensors"]))
    torch.save({"model": backbone}, written["backbone_pth"])
    if full_model:
        written["model_safetensors"] = out_dir / "model.safetensors"
        save_file(cast, str(written["model_safetensors"]))
    source = tag or (checkpoint_dir / "latest").read_text().strip()
    (out_dir / "export.json").write_text(json.dumps(
        {"checkpoint": str(checkpoint_dir / source), "dtype": dtype, "backbone_tensors": len(backbone),
         "backbone_parameters": sum(v.numel() for v in backbone.values())}, indent=2))
    return {k: str(v) for k, v in written.items()}
