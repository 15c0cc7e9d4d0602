"""Reading and writing backbone weights with the release's key names, whether or not the model is ZeRO-3 partitioned."""
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.engine import safe_loading
from pretrain.zero3 import gathered_for_writing, set_fp32_master

CLASSIFIER_PREFIX = "head."


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = safe_loading.load_file(path)
    return state.get("model", state)


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> list[str]:
    """Copy a backbone's weights (`state`, read from `source`) into `model` (a fresh InternImage), one tensor at a time
    so a ZeRO-3 partitioned model is never gathered whole. Every backbone key must exist in the model; returns the
    model keys left untouched (the new classifier). The parameters hold the weights in the run's precision: after
    deepspeed.initialize, `load_fp32_masters` puts them into the optimizer's fp32 masters as they are."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    unknown = sorted(set(state) - set(params) - set(buffers))
    if unknown:
        raise KeyError(f"{source}: {len(unknown)} keys do not belong to this model, e.g. {unknown[:5]}")
    for name, tensor in state.items():
        if name in buffers:
            buffers[name].copy_(tensor)
        else:
            _copy_into_param(params[name], tensor)
    return sorted((set(params) | set(buffers)) - set(state))


def _copy_into_param(param: nn.Parameter, tensor: torch.Tensor):
    with gathered_for_writing([param]), torch.no_grad():
        param.copy_(tensor)


def load_fp32_masters(model: nn.Module, state: dict[str, torch.Tensor]):
    """The backbone's weights into the fp32 masters deepspeed.initialize made from `model`'s parameters, which
    `load_backbone` had filled in bf16 or fp16: without this every stage hand-off would round the weights through the
    run's precision. (DeepSpeed's fp16 optimizer without ZeRO exposes no masters and keeps the rounded copy.)"""
    params = dict(model.named_parameters())
    for name, tensor in state.items():
        if name in params:
            set_fp32_master(params[name], tensor)


def backbone_from_full(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The vision tower's weights under the release's names: `prefix` stripped, the task's classifier dropped."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(CLASSIFIER_PREFIX)}
