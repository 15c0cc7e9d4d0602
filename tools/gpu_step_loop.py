"""A training step loop of one stage's model on synthetic batches, for tools/gpu_check.py (figures in
docs/benchmarks.md). The model, loss, parameter groups and DeepSpeed config are the engine's own (pretrain.engine);
the batches are made once on the device, so that the loader is not what is measured. Writes one JSON object:
samples/s, TFLOP/s, MFU, peak memory beside `pretrain estimate-memory`'s figure for the same settings, the losses,
and a summary of a short torch.profiler profile (top kernels by time, the DCNv3 share, idle gaps on the device).

    python tools/gpu_step_loop.py configs/internimage_h/in1k_640.yaml data.image_size=224 batch_size=128 \
        --steps 8 --profile-steps 2 --json h_finetune.json

One process, world size 1 (NCCL on a GPU, gloo on CPU), under ZeRO-3 as every stage runs.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Settings the step loop cannot honour or does not measure: no epochs or declared global batch (one process, a fixed
# number of steps), no EMA (estimate-memory does not count it either, so the two figures stay comparable).
LOOP_OVERRIDES = ["global_batch=null", "epochs=null", "warmup_epochs=null", "ema_decay=null", "eval.ema=false"]
GIB = 2**30


def build_engine(cfg, world, dtype):
    """As the trainer builds it: the task's model (inside zero.Init), the release's parameter groups, our DeepSpeed
    JSON."""
    import deepspeed

    from pretrain.engine.distributed import seed_everything
    from pretrain.engine.optim import deepspeed_config, param_groups, peak_lr, scheduler_factory
    from pretrain.engine.tasks import build_task
    from pretrain.engine.trainer import build_model

    seed_everything(cfg.seed)
    task = build_task(cfg, world)
    model = build_model(task, cfg, dtype, world.device)
    base_lr = peak_lr(cfg, world.size)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg, base_lr),
        config=deepspeed_config(cfg, base_lr, world.device.type == "cuda", False),
        lr_scheduler=scheduler_factory(cfg, base_lr))
    return task, engine


def synthetic_batch(cfg, device) -> dict:
    generator = torch.Generator(device).manual_seed(cfg.seed)
    size = cfg.data.image_size
    batch = {"image": torch.randn(cfg.batch_size, 3, size, size, device=device, generator=generator)}
    if cfg.task == "image-text":
        batch["text"] = torch.randint(0, cfg.text.vocab_size, (cfg.batch_size, cfg.data.context_length),
                                      device=device, generator=generator)
    else:
        batch["label"] = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device, generator=generator)
    return batch


def train_step(task, engine, batch, dtype) -> float:
    """The trainer's step (pretrain/engine/trainer.py): loss, backward, optimizer step, and the loss read back."""
    loss, _ = task.loss(engine, batch, dtype)
    engine.backward(loss)
    engine.step()
    return loss.item()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(task, engine, batch, dtype, device, steps) -> tuple[list[float], float]:
    synchronize(device)
    start = time.perf_counter()
    losses = [train_step(task, engine, batch, dtype) for _ in range(steps)]
    synchronize(device)
    return losses, time.perf_counter() - start


def merged_intervals(events) -> list[tuple[float, float]]:
    merged = []
    for start, end in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def summarize_trace(trace: dict, device_type: str, steps: int, top: int = 10) -> dict:
    """Device work of a chrome trace: on a GPU its kernels, copies and memsets; on CPU its operators. Times in ms."""
    categories = ("kernel", "gpu_memcpy", "gpu_memset") if device_type == "cuda" else ("cpu_op",)
    work = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in categories]
    if not work:
        return {"events": 0}
    busy_intervals = merged_intervals(work)
    span = busy_intervals[-1][1] - busy_intervals[0][0]
    busy = sum(end - start for start, end in busy_intervals)
    gaps = sorted((b[0] - a[1] for a, b in zip(busy_intervals, busy_intervals[1:])), reverse=True)
    by_name: dict[str, list[float]] = {}
    for e in work:
        by_name.setdefault(e["name"], []).append(e["dur"])
    total = sum(e["dur"] for e in work)
    ranked = sorted(by_name.items(), key=lambda item: -sum(item[1]))
    dcnv3 = sum(sum(durations) for name, durations in by_name.items() if "dcnv3" in name.lower())
    return {
        "events": len(work), "steps": steps, "span_ms_per_step": span / 1e3 / steps,
        "busy_fraction": busy / span, "idle_ms_per_step": (span - busy) / 1e3 / steps,
        "gaps_over_100us": sum(g > 100 for g in gaps), "largest_gaps_ms": [g / 1e3 for g in gaps[:5]],
        "dcnv3_share": dcnv3 / total,
        "top": [{"name": name[:160], "calls": len(durations), "ms_per_step": sum(durations) / 1e3 / steps,
                 "share": sum(durations) / total} for name, durations in ranked[:top]],
    }


def profile(task, engine, batch, dtype, device, steps) -> dict:
    """`steps` profiled steps after one warm-up step under the profiler (which leaves its own start-up out)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trace.json"
        # With a schedule the trace exists only inside on_trace_ready, at the end of the active steps.
        with torch_profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps),
                           on_trace_ready=lambda prof: prof.export_chrome_trace(str(path))) as prof:
            for _ in range(steps + 1):
                train_step(task, engine, batch, dtype)
                synchronize(device)
                prof.step()
        trace = json.loads(path.read_text())
    return summarize_trace(trace, device.type, steps)


def peak_memory_gib(device) -> dict:
    if device.type == "cuda":
        return {"allocated": torch.cuda.max_memory_allocated(device) / GIB,
                "reserved": torch.cuda.max_memory_reserved(device) / GIB}
    from pretrain.engine.metrics import peak_memory_mb

    return {"allocated": peak_memory_mb(device) / 1024, "reserved": None}


def flops_per_sample(cfg, task) -> float:
    from pretrain.engine.metrics import train_flops_per_sample

    size = cfg.data.image_size
    inputs = [torch.zeros(1, 3, size, size)]
    if cfg.task == "image-text":
        inputs.append(torch.zeros(1, cfg.data.context_length, dtype=torch.long))
    return train_flops_per_sample(task.build, tuple(inputs))


def memory_estimate(cfg) -> dict:
    from pretrain.engine.memory import GIB as ESTIMATE_GIB, estimate

    result = estimate(cfg, devices=1)
    return {"per_device_gib": result.as_gib(),
            "total_gib": result.total(cfg.model.activation_checkpointing) / ESTIMATE_GIB}


def run(args) -> dict:
    from pretrain.config import load_stage_config
    from pretrain.engine.distributed import init_distributed
    from pretrain.engine.metrics import device_peak_tflops
    from pretrain.engine.precision import DTYPES

    cfg = load_stage_config(args.config, [*LOOP_OVERRIDES, f"max_steps={args.steps + args.warmup}", *args.overrides])
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)  # a plain `python` start: without them DeepSpeed looks for MPI
    world = init_distributed()
    device = world.device
    dtype = DTYPES[cfg.precision]
    start = time.perf_counter()
    task, engine = build_engine(cfg, world, dtype)
    built_s = time.perf_counter() - start
    batch = synthetic_batch(cfg, device)
    warmup_losses, _ = timed_steps(task, engine, batch, dtype, device, args.warmup)
    losses, seconds = timed_steps(task, engine, batch, dtype, device, args.steps)
    samples_per_s = cfg.batch_size * args.steps / seconds
    flops = flops_per_sample(cfg, task)
    tflops = flops * samples_per_s / 1e12
    peak = device_peak_tflops(device, cfg.logging.peak_tflops)
    memory, estimate_figures = peak_memory_gib(device), memory_estimate(cfg)
    report = {
        "config": str(args.config), "overrides": args.overrides, "task": cfg.task, "model": cfg.model.name,
        "image_size": cfg.data.image_size, "batch": cfg.batch_size, "precision": cfg.precision,
        "activation_checkpointing": cfg.model.activation_checkpointing, "zero_stage": cfg.zero.stage,
        "optimizer": type(engine.basic_optimizer).__name__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
        "build_s": built_s, "steps": args.steps, "warmup_steps": args.warmup, "step_s": seconds / args.steps,
        "samples_per_s": samples_per_s, "flops_per_sample": flops, "tflops_per_device": tflops,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "peak_memory_gib": memory, "estimate": estimate_figures,
        "measured_over_estimate": memory["allocated"] / estimate_figures["total_gib"],
        "losses": warmup_losses + losses, "losses_finite": all(math.isfinite(x) for x in warmup_losses + losses),
    }
    report["profile"] = profile(task, engine, batch, dtype, device, args.profile_steps) if args.profile_steps else None
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a stage config YAML (its task, model, precision, checkpointing, optimizer)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch_size=64 data.image_size=224")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, autotuning, caches)")
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled steps after the timed ones (0: none)")
    parser.add_argument("--json", required=True, help="where to write the report")
    args = parser.parse_args()
    report = run(args)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("task", "samples_per_s", "tflops_per_device", "mfu", "peak_memory_gib",
                                             "measured_over_estimate")}))
    sys.stdout.flush()
    # DeepSpeed's ZeRO-3 hooks and NCCL sometimes abort in C++ destructors at interpreter exit; the report is written.
    os._exit(0)


if __name__ == "__main__":
    main()
