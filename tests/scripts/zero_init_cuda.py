"""Build InternImage-H inside deepspeed.zero.Init on one GPU (NCCL, world size 1, bf16 partitions) and report where
its parameters live, what construction cost in device memory, and whether the release's init survived partitioning."""
import json
import os
import sys

import deepspeed
import torch

from pretrain.models import create_model

deepspeed.init_distributed("nccl")
torch.cuda.set_device(0)
torch.cuda.reset_peak_memory_stats()
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
with deepspeed.zero.Init(config_dict_or_path=config):
    model = create_model("internimage_h", with_cp=True)
params = list(model.parameters())
layer = model.levels[0].blocks[0]
with deepspeed.zero.GatheredParameters([layer.dcn.offset.weight, layer.norm1[0].weight]):
    init = {"offset_abs_max": layer.dcn.offset.weight.abs().max().item(),
            "norm_weight_mean": layer.norm1[0].weight.float().mean().item()}
print(json.dumps({
    "total": sum(p.ds_numel for p in params),
    "devices": sorted({str(p.ds_tensor.device) for p in params}),
    "dtypes": sorted({str(p.ds_tensor.dtype) for p in params}),
    "max_materialised": max(p.numel() for p in params),
    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    **init}))
sys.stdout.flush()
os._exit(0)  # as zero_init_model.py: skip a teardown that can abort in a C++ destructor; everything is reported
