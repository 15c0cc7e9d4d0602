"""Engine benchmarks (results in docs/benchmarks.md).

  zero3       InternImage-H (or any model) forward + backward + optimizer step under DeepSpeed ZeRO-3, synthetic images;
              reports each rank's share of parameters and optimizer states, peak memory and step time.
              torchrun --nproc-per-node 2 tools/bench_engine.py zero3 --model internimage_h --image-size 64 --optimizer sgd
  activations Activation memory of one training step (forward + backward) with and without per-layer activation
              checkpointing, measured as the growth of peak RSS in a fresh process (CPU) or peak allocated (GPU),
              next to the estimate of `pretrain estimate-memory`.
              python tools/bench_engine.py activations --model internimage_b --image-size 224 --batch 8
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from pretrain.engine.metrics import peak_memory_mb


# AdamW is the real one; SGD (no optimizer states) lets InternImage-H step on two CPU ranks of a 24 GB machine, where
# AdamW's 12 bytes/parameter of fp32 states alone would need 13 GB per rank.
OPTIMIZERS = {
    "adamw": lambda cpu: {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": cpu}},
    "sgd": lambda cpu: {"type": "SGD", "params": {"lr": 1e-4}},
}


def zero3(args):
    import deepspeed
    import torch.distributed as dist

    from pretrain.engine.distributed import init_distributed
    from pretrain.models import create_model

    world = init_distributed()
    # Smaller buckets and optimizer sub-groups than DeepSpeed's GPU-sized defaults (sub_group_size 1e9 alone is a 4 GB
    # fp32 scratch buffer), so that H's 17 GB of states fit two ranks on a 24 GB machine.
    zero = {"stage": 3, "sub_group_size": int(1e8), "reduce_bucket_size": int(5e7),
            "stage3_prefetch_bucket_size": int(5e7), "stage3_max_live_parameters": int(1e8)}
    config = {"train_micro_batch_size_per_gpu": args.batch, "zero_optimization": zero,
              "bf16": {"enabled": args.precision == "bf16"},
              "optimizer": OPTIMIZERS[args.optimizer](world.device.type == "cpu"),
              "steps_per_print": 2**31 - 1, "zero_allow_untested_optimizer": True}
    torch.manual_seed(0)
    t0 = time.time()
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = create_model(args.model, with_cp=True)
    built = time.time() - t0
    memory_after_build = peak_memory_mb(world.device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=world.device, dtype=dtype)
    labels = torch.randint(0, 1000, (args.batch,), device=world.device)
    times = []
    for _ in range(args.steps):
        t0 = time.time()
        loss = torch.nn.functional.cross_entropy(engine(images).float(), labels)
        engine.backward(loss)
        engine.step()
        times.append(time.time() - t0)
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    optimizer_bytes = sum(t.numel() * t.element_size() for state in optimizer.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    optimizer_bytes += sum(t.numel() * t.element_size() for t in optimizer.fp32_partitioned_groups_flat)
    report = {"rank": world.rank, "parameters_total": total, "parameters_local": local,
              "local_fraction": local / total, "optimizer_state_gib_local": optimizer_bytes / 2**30,
              "optimizer_state_gib_unpartitioned": total * 4 * (1 + 2 * (args.optimizer == "adamw")) / 2**30,
              "peak_memory_mb_after_build": memory_after_build, "peak_memory_mb": peak_memory_mb(world.device),
              "build_s": built, "step_s_median": sorted(times)[len(times) // 2], "loss": loss.item()}
    reports = [None] * world.size
    dist.all_gather_object(reports, report)
    if world.is_main:
        print(json.dumps(reports, indent=2))


def activation_step(args):
    """One measurement in this (fresh) process: prints the activation memory of a training step."""
    from pretrain.models import create_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, with_cp=args.with_cp, drop_path_rate=0.0).to(device).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + images.numel() * 4
    model(images).float().logsumexp(-1).sum().backward()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"with_cp": args.with_cp, "activation_gib": (peak - before - grads) / 2**30}))


def activations(args):
    from pretrain.config import load_stage_config
    from pretrain.engine.memory import GIB, estimate

    measured = {}
    for with_cp in (False, True):
        cmd = [sys.executable, __file__, "activation-step", "--model", args.model, "--image-size", str(args.image_size),
               "--batch", str(args.batch)] + (["--with-cp"] if with_cp else [])
        # glibc keeps freed blocks resident, so peak RSS would count caches; serving every block over 64 KiB from
        # mmap (returned to the system when freed) makes peak RSS track the peak of live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        measured[with_cp] = json.loads(out.strip().splitlines()[-1])["activation_gib"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_stage_config(os.path.join(repo, "configs/demo/finetune.yaml"), [
        "num_classes=1000", f"model.name={args.model}", "model.args={}", f"data.image_size={args.image_size}",
        f"batch_size={args.batch}", "precision=fp32"])
    estimated = estimate(cfg, devices=1)
    print(json.dumps({
        "model": args.model, "image_size": args.image_size, "batch": args.batch,
        "measured_gib": {"plain": measured[False], "checkpointed": measured[True],
                         "reduction": measured[False] / measured[True]},
        "estimated_gib": {"plain": estimated.activations / GIB, "checkpointed": estimated.activations_checkpointed / GIB,
                          "reduction": estimated.activations / estimated.activations_checkpointed},
    }, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["zero3", "activations", "activation-step"])
    parser.add_argument("--model", default="internimage_h")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--with-cp", action="store_true")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw")
    args = parser.parse_args()
    {"zero3": zero3, "activations": activations, "activation-step": activation_step}[args.mode](args)


if __name__ == "__main__":
    main()
