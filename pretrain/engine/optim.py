"""AdamW parameter groups (no decay on norms/biases/layer-scale, layer-wise lr decay, the 0.1 lr multiplier on
offset/mask parameters), the warm-up + cosine schedule, and the DeepSpeed JSON derived from the stage config."""
import math
import re

import torch

from pretrain.config import StageConfig

# DCNv3's sampling parameters: offsets, mask logits and the center-feature-scale projection (release's lr multiplier).
OFFSET_PARAM = re.compile(r"\.dcn\.(offset|mask|center_feature_scale_proj)")
BLOCK = re.compile(r"(?:^|\.)levels\.(\d+)\.(?:blocks\.(\d+)|post_norms|norm|downsample)")


def shape_of(param) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 leaves an empty placeholder in param.shape


def layer_id(name: str, depths: list[int]) -> int:
    """0 for the stem, 1..n for the InternImage layers in order, n + 1 for heads and the text tower."""
    if re.search(r"(?:^|\.)patch_embed\.", name):
        return 0
    match = BLOCK.search(name)
    if match is None:
        return sum(depths) + 1
    level, block = int(match.group(1)), match.group(2)
    before = sum(depths[:level])
    return before + (int(block) if block is not None else depths[level] - 1) + 1


def param_groups(model: torch.nn.Module, cfg: StageConfig, depths: list[int], base_lr: float) -> list[dict]:
    optim, n_layers = cfg.optim, sum(depths)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if len(shape_of(param)) <= 1 else optim.weight_decay
        scale = optim.layer_decay ** (n_layers + 1 - layer_id(name, depths)) if optim.layer_decay else 1.0
        if OFFSET_PARAM.search(name):
            scale *= optim.offset_lr_scale
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr": base_lr * scale})
        group["params"].append(param)
    return list(groups.values())


def peak_lr(cfg: StageConfig, world_size: int) -> float:
    global_batch = cfg.batch_size * world_size * cfg.optim.grad_accumulation
    return cfg.optim.lr * global_batch / cfg.optim.lr_batch


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


def deepspeed_config(cfg: StageConfig, base_lr: float, on_gpu: bool, load_universal: bool) -> dict:
    zero = {"stage": cfg.zero.stage, "stage3_gather_16bit_weights_on_model_save": False}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accumulation,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": base_lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
            # DeepSpeed's fused Adam is a CUDA kernel; on the CPU accelerator torch's AdamW does the step.
            "torch_adam": not on_gpu and not cfg.zero.offload_optimizer,
        }},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
