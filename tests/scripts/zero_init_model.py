"""Build a model inside deepspeed.zero.Init on every rank and report how much of it each rank holds."""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from pretrain.models import create_model

deepspeed.init_distributed("gloo")
name, overrides = sys.argv[1], json.loads(sys.argv[2])
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 2, "zero_optimization": {"stage": 3}}):
    model = create_model(name, **overrides)
params = list(model.parameters())
local = sum(p.ds_tensor.numel() for p in params)
total = sum(p.ds_numel for p in params)
# The release's init must survive partitioning: zero offsets, unit norms, trunc-normal(0.02) Linear weights.
layer = model.levels[0].blocks[0]
with deepspeed.zero.GatheredParameters([layer.dcn.offset.weight, layer.norm1[0].weight, layer.mlp.fc1.weight]):
    init = {
        "offset_abs_max": layer.dcn.offset.weight.abs().max().item(),
        "norm_weight_mean": layer.norm1[0].weight.mean().item(),
        "fc1_std": layer.mlp.fc1.weight.std().item(),
    }
if dist.get_rank() == 0:
    print(json.dumps({"local": local, "total": total, "max_materialised": max(p.numel() for p in params), **init}))
# Under load, a rank's normal interpreter shutdown after zero.Init sometimes aborts in a C++ thread destructor
# ("terminate called without an active exception"); everything is reported, so leave without the teardown.
dist.barrier()
sys.stdout.flush()
os._exit(0)
