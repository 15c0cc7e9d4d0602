"""Under ZeRO-3 build_model puts every buffer on the run's device: DeepSpeed skips module.to(device) for a model
zero.Init touched, so a buffer built outside it (open_clip's attention mask) would stay on the CPU. The meta device
stands in for the GPU; zero.Init is replaced, as it needs a process group and only places what it builds."""
from contextlib import nullcontext
from types import SimpleNamespace

import deepspeed
import torch
import torch.nn as nn

from conftest import CONFIG
from pretrain.config import load_stage_config
from pretrain.engine.trainer import build_model


class TowerWithMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("attn_mask", torch.full((3, 3), float("-inf")).triu(1), persistent=False)


def test_buffers_built_outside_zero_init_reach_the_device(monkeypatch):
    monkeypatch.setattr(deepspeed.zero, "Init", lambda **kwargs: nullcontext())
    cfg = load_stage_config(CONFIG, ["precision=bf16"])
    task = SimpleNamespace(build=lambda zero_init: TowerWithMask())
    model = build_model(task, cfg, torch.bfloat16, torch.device("meta"))
    assert model.attn_mask.device.type == "meta"
    assert model.proj.weight.dtype == torch.bfloat16
