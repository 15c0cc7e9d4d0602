"""Evaluate exported weights (model.safetensors, every tensor) in a fresh model of the stage config, in one process
with a one-rank gloo group, on the stage's own val set; prints the metrics as JSON. Independent of the run that
trained them: no DeepSpeed engine, no checkpoint, only the config and the exported file."""
import dataclasses
import json
import sys
from contextlib import nullcontext


def main():
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from pretrain.data import DeviceBatch, DeviceLoader, build_eval_loader
    from pretrain.engine.config_checks import load_config
    from pretrain.engine.distributed import World
    from pretrain.engine.tasks import build_task

    config, weights, rendezvous, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    cfg = load_config(config, overrides)
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))
    task = build_task(cfg, world)
    model = task.build(nullcontext())
    model.load_state_dict(load_file(weights), strict=True)
    data = dataclasses.replace(cfg.data, format=task.eval_format)
    loader = DeviceLoader(build_eval_loader(data, rank=0, world_size=1, batch_size=cfg.batch_size),
                          DeviceBatch(data, world.device, training=False))
    print(json.dumps(task.evaluate(model.eval(), loader, torch.float32)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
