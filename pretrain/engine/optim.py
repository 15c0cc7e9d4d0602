"""AdamW parameter groups as the release builds them, the warm-up + cosine schedule, and the DeepSpeed JSON derived
from the stage config."""
import math

import torch

from pretrain.config import StageConfig
from pretrain.typed_config import ConfigError
from pretrain.zero3 import full_shape


def lr_ratios(model: torch.nn.Module, layer_decay: float, dcn_lr_mul: float) -> dict[str, float]:
    """The lr ratio of each parameter of every InternImage inside `model` (the model itself, or a CLIP tower),
    from the model's own release rules; parameters outside them keep ratio 1."""
    from pretrain.models import InternImage

    ratios = {}
    for prefix, module in model.named_modules():
        if isinstance(module, InternImage):
            dot = f"{prefix}." if prefix else ""
            ratios.update({dot + name: r for name, r in module.lr_ratios(layer_decay, dcn_lr_mul).items()})
    return ratios


def param_groups(model: torch.nn.Module, cfg: StageConfig, base_lr: float) -> list[dict]:
    """The release's `set_weight_decay_and_lr`: no weight decay on 1-D tensors and biases (its models declare no
    further exemptions); with layer-wise decay on, each parameter's lr ratio and the DCN multiplier (which the
    release applies only inside its layer-decay branch)."""
    optim = cfg.optim
    ratios = lr_ratios(model, optim.layer_decay, optim.dcn_lr_mul) if optim.layer_decay else {}
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if len(full_shape(param)) <= 1 or name.endswith(".bias") else optim.weight_decay
        scale = ratios.get(name, 1.0)
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr": base_lr * scale})
        group["params"].append(param)
    return list(groups.values())


def global_batch(cfg: StageConfig, world_size: int) -> int:
    """Samples per optimizer step on `world_size` ranks, which must be the stage's declared global_batch."""
    samples = cfg.batch_size * world_size * cfg.optim.grad_accumulation
    if cfg.global_batch is not None and samples != cfg.global_batch:
        raise ConfigError(f"global_batch is {cfg.global_batch}, but batch_size {cfg.batch_size} x {world_size} ranks x "
                          f"optim.grad_accumulation {cfg.optim.grad_accumulation} = {samples}; change the number "
                          "of nodes, batch_size or optim.grad_accumulation")
    return samples


def peak_lr(cfg: StageConfig, world_size: int) -> float:
    """optim.lr scaled linearly from optim.lr_batch to this run's global batch."""
    return cfg.optim.lr * global_batch(cfg, world_size) / cfg.optim.lr_batch


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """lr multiplier: linear warm-up over `warmup` steps, then cosine from 1 down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def scheduler_factory(cfg: StageConfig, base_lr: float):
    floor = cfg.optim.min_lr / base_lr
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.optim.warmup_steps, cfg.max_steps, floor))


def zero_optimization(cfg: StageConfig, on_gpu: bool) -> dict:
    """DeepSpeed's zero_optimization section; zero.Init reads it too (where the parameters live from the start)."""
    zero = cfg.zero
    section = {"stage": zero.stage, "stage3_gather_16bit_weights_on_model_save": False,
               "reduce_bucket_size": zero.reduce_bucket_size,
               "stage3_prefetch_bucket_size": zero.stage3_prefetch_bucket_size,
               "stage3_max_live_parameters": zero.stage3_max_live_parameters,
               "stage3_param_persistence_threshold": zero.stage3_param_persistence_threshold,
               "sub_group_size": zero.sub_group_size}
    if zero.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    taken = sorted(set(zero.extra) & (set(section) | {"offload_param", "offload_optimizer"}))
    if taken:
        raise ConfigError(f"zero.extra: {taken} set by the zero: section itself; set them there by name")
    return {**zero.extra, **section}


def adamw_kind(offloaded: bool) -> dict:
    """Which AdamW does the step. On the devices, torch's fused AdamW: its kernels ship in the torch wheel, where
    DeepSpeed's FusedAdam is compiled with nvcc at the first step on every node (a compiler on each compute node, all
    nodes building into one cache at once). Both are one multi-tensor kernel over the partition, so the device step
    should cost the same; `tools/bench_optimizer.py --device cuda` measures it (with apex's FusedAdam where
    installed) when a GPU is at hand. On the CPU, fused is 5x torch's unfused AdamW (docs/benchmarks.md).
    Offloaded, DeepSpeed's CPU Adam steps the host copy: 1.6x faster than torch's fused on the CPU, at the cost of
    one C++ (not CUDA) build per node cache at the first run."""
    return {} if offloaded else {"torch_adam": True, "fused": True}


def deepspeed_config(cfg: StageConfig, base_lr: float, on_gpu: bool, load_universal: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accumulation,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": base_lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, **adamw_kind(cfg.zero.offload_optimizer),
        }},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero_optimization(cfg, on_gpu),
        "communication_data_type": cfg.zero.communication_data_type,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
