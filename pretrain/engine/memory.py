"""Per-device memory of a stage at a given scale: parameters, gradients and optimizer states under the configured ZeRO
stage and precision, plus activations with and without per-layer checkpointing.

States follow the ZeRO paper's accounting (Rajbhandari et al. 2020) with Adam: mixed precision keeps 16-bit weights and
gradients plus fp32 master weights, momentum and variance (2 + 2 + 12 bytes per parameter); fp32 training keeps
4 + 4 + 8. ZeRO-1 partitions the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the weights (which are then
gathered one layer at a time) and holds a gradient bucket of zero.reduce_bucket_size elements. Activations are
measured, not modelled: one forward pass on the meta device records the bytes of every tensor autograd saves for the
backward pass, attributed to the InternImage layer that saved it.
"""
import dataclasses
from dataclasses import dataclass

import torch

from pretrain.config import StageConfig

GIB = 2**30


@dataclass
class MemoryEstimate:
    parameters: float
    gradients: float
    optimizer: float
    gathered_layer: float  # ZeRO-3: the largest layer's full weights while it runs
    gradient_bucket: float  # ZeRO-3: DeepSpeed's contiguous gradient buffer, zero.reduce_bucket_size elements
    activations: float
    activations_checkpointed: float
    devices: int

    def total(self, checkpointing: bool) -> float:
        states = self.parameters + self.gradients + self.optimizer + self.gathered_layer + self.gradient_bucket
        return states + (self.activations_checkpointed if checkpointing else self.activations)

    def as_gib(self) -> dict:
        fields = ("parameters", "gradients", "optimizer", "gathered_layer", "gradient_bucket", "activations",
                  "activations_checkpointed")
        report = {f: round(getattr(self, f) / GIB, 3) for f in fields}
        report["total_with_checkpointing"] = round(self.total(True) / GIB, 3)
        report["total_without_checkpointing"] = round(self.total(False) / GIB, 3)
        return report


def model_state_bytes(n_params: int, largest_layer: int, precision: str, zero_stage: int, devices: int,
                      offload_optimizer: bool = False) -> tuple[float, float, float, float]:
    weight, grad, optim = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    params = n_params * weight / (devices if zero_stage >= 3 else 1)
    grads = n_params * grad / (devices if zero_stage >= 2 else 1)
    optimizer = 0.0 if offload_optimizer else n_params * optim / (devices if zero_stage >= 1 else 1)
    gathered = 2 * largest_layer * weight if zero_stage >= 3 else 0.0  # current layer + the prefetched next one
    return params, grads, optimizer, gathered


def gradient_bucket_bytes(cfg: StageConfig) -> float:
    """ZeRO-3 keeps one buffer of zero.reduce_bucket_size elements in zero.communication_data_type for the whole run
    (DeepSpeed's contiguous_gradients, on by default), gradients copied into it to be reduce-scattered together."""
    element = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.zero.communication_data_type]
    return float(cfg.zero.reduce_bucket_size * element) if cfg.zero.stage == 3 else 0.0


def activation_bytes(model: torch.nn.Module, inputs: tuple, layer_type: type) -> tuple[float, float]:
    """(without, with per-layer checkpointing) bytes saved for backward by one forward pass of `model` on `inputs`.

    With checkpointing, a layer keeps only its input; the largest layer's own activations exist again while it is
    recomputed in the backward pass."""
    current = [None]
    inside: dict[int, float] = {}
    layer_inputs = outside = 0.0

    def pack(t):
        nonlocal outside
        size = t.numel() * t.element_size()
        if current[0] is None:
            outside += size
        else:
            inside[current[0]] = inside.get(current[0], 0.0) + size
        return t

    def enter(module, args):
        nonlocal layer_inputs
        current[0] = id(module)
        layer_inputs += args[0].numel() * args[0].element_size()

    def leave(module, args, output):
        current[0] = None

    handles = []
    for module in model.modules():
        if isinstance(module, layer_type):
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    full = outside + sum(inside.values())
    return full, outside + layer_inputs + max(inside.values(), default=0.0)


def estimate(cfg: StageConfig, devices: int) -> MemoryEstimate:
    from pretrain.engine.distributed import World
    from pretrain.engine.tasks import build_task
    from pretrain.models.internimage import InternImageLayer

    world = World(rank=0, size=devices, local_rank=0, device=torch.device("meta"))
    with torch.device("meta"):
        # Hooks model the checkpointing below; a really checkpointed forward would hide what each layer saves.
        plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation_checkpointing=False))
        task = build_task(plain, world)
        model = task.build()
        model.train()
        full, checkpointed = activation_bytes(model, task.example_inputs(cfg.batch_size), InternImageLayer)
    scale = 0.5 if cfg.precision in ("bf16", "fp16") else 1.0  # measured in fp32 on the meta device
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, InternImageLayer))
    states = model_state_bytes(n_params, largest, cfg.precision, cfg.zero.stage, devices, cfg.zero.offload_optimizer)
    return MemoryEstimate(*states, gradient_bucket_bytes(cfg), full * scale, checkpointed * scale, devices)
