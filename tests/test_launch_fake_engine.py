"""A stand-in engine for the launcher tests (run_stage / request_stop / consolidate with the engine's contract).

It really rendezvouses (gloo, env://), so a wrong MASTER_ADDR/RANK/WORLD_SIZE fails; it saves a "checkpoint" with all
ranks together when asked to stop, resumes from run_dir with a `resume` event, and records the backbone it started
from. Stage settings come from the YAML and `key=value` overrides: max_steps, step_time, fail_at_step, checkpoint.every,
model.pretrained, run_dir. Used by the launcher tests through the `--engine` seam, and until the real engine exists.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import yaml

_stop = False


def request_stop() -> None:
    global _stop
    _stop = True


def _config(config_path: str, overrides: list[str]) -> dict:
    cfg = yaml.safe_load(Path(config_path).read_text()) or {}
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


def _latest(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text()) if latest.exists() else 0


def run_stage(config_path: str, overrides: list[str]) -> dict:
    import torch
    import torch.distributed as dist

    global _stop
    _stop = False
    signal.signal(signal.SIGTERM, lambda *_: request_stop())
    signal.signal(signal.SIGUSR1, lambda *_: request_stop())
    cfg = _config(config_path, overrides)
    run_dir = Path(cfg["run_dir"])
    max_steps = int(cfg.get("max_steps", 6))
    every = int(cfg.get("checkpoint.every", 2))
    step_time = float(cfg.get("step_time", 0.2))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"

    def log(rec: dict) -> None:
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def save(step: int) -> None:
        (ckpt / f"rank{rank}.json").write_text(json.dumps({"step": step}))
        dist.barrier()
        if rank == 0:
            (ckpt / "latest").write_text(str(step))
        dist.barrier()

    start = _latest(run_dir)
    if start:
        log({"event": "resume", "step": start})
    else:
        log({"event": "start", "step": 0, "world_size": world, "hosts": os.environ.get("SLURMD_NODENAME", "")})
    for step in range(start + 1, max_steps + 1):
        time.sleep(step_time)
        if cfg.get("fail_at_step") == step:
            raise RuntimeError(f"fake engine: failing at step {step} as configured")
        stop = torch.tensor([1.0 if _stop else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        log({"step": step, "loss": 1.0 / step, "lr_peak": 1e-3, "world_size": world,
             "node": os.environ.get("SLURMD_NODENAME", "")})
        if stop.item() or step % every == 0 or step == max_steps:
            save(step)
        if stop.item() and step < max_steps:
            dist.destroy_process_group()
            return {"status": "preempted", "metrics": {"step": step}}
    pretrained = cfg.get("model.pretrained")
    if "finetune" in Path(config_path).stem:
        metrics_out = {"top1": 0.5, "top5": 0.9, "headline": {"finetune_top1": 0.5}}
    else:
        metrics_out = {"zero_shot_top1": 0.25, "headline": {"zero_shot_top1": 0.25}}
    metrics_out["pretrained_backbone"] = Path(pretrained).read_text() if pretrained else None
    metrics_out["world_size"] = world
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(metrics_out))
    dist.barrier()
    dist.destroy_process_group()
    return {"status": "completed", "metrics": metrics_out}


def consolidate(checkpoint_dir: str, out_dir: str, dtype: str = "fp16", weights: str = "live") -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = f"backbone of {checkpoint_dir} at step {(Path(checkpoint_dir) / 'latest').read_text()} ({dtype}, {weights})"
    paths = {}
    for name in ("backbone.safetensors", "backbone.pth"):
        (out / name).write_text(text)
        paths[name] = str(out / name)
    return paths
