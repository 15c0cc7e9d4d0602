"""What the process computes with: the GPU math settings of the stage config, applied at start-up, and the line rank 0
prints before the first step naming the DCNv3 kernels, the GPU, the optimizer and the precision in use (a run that
silently lost its CUDA kernel or its fused optimizer is slow, not wrong, and nothing else would say so)."""
import torch

from pretrain.config import CudaConfig
from pretrain.ops.kernels import kernels_line


def apply_cuda_settings(cfg: CudaConfig) -> None:
    """Process-wide, so set once before the model is built; harmless where there is no GPU."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def gpu_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"none ({device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (arch {major}.{minor})"


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    """The class that does the step, by module, so DeepSpeed's FusedAdam, its CPU Adam and torch's AdamW differ; with
    torch's own `fused` flag where it has one."""
    kind = type(optimizer)
    fused = optimizer.defaults.get("fused")
    return f"{kind.__module__}.{kind.__qualname__}" + (f" (fused={fused})" if fused is not None else "")


def math_settings() -> str:
    """As torch holds them (not as configured): what the process really computes with."""
    def on(flag: bool) -> str:
        return "on" if flag else "off"

    return (f"TF32 matmul {on(torch.backends.cuda.matmul.allow_tf32)}, cudnn TF32 {on(torch.backends.cudnn.allow_tf32)}"
            f", cudnn.benchmark {on(torch.backends.cudnn.benchmark)}")


def startup_line(device: torch.device, optimizer: torch.optim.Optimizer, precision: str) -> str:
    return (f"{kernels_line()} | GPU: {gpu_name(device)} | optimizer: {optimizer_name(optimizer)} | "
            f"precision: {precision}, {math_settings()}")
