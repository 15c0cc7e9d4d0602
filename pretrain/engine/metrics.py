"""What a run reports: RUN_DIR/metrics.jsonl (one object per logged step, plus events such as resume), TensorBoard
scalars, optionally Weights & Biases (wandb_log.py), a rank-0 progress bar with ETA, peak memory per rank, throughput and an MFU estimate."""
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense bf16 peak TFLOP/s of one device, for the MFU estimate (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_per_rank(device: torch.device) -> list[float]:
    mine = torch.tensor([peak_memory_mb(device)], device=device)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [round(t.item(), 1) for t in every]


def device_peak_tflops(device: torch.device, configured: float | None) -> float | None:
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def train_flops_per_sample(build_model, example_inputs) -> float:
    """Forward FLOPs of one sample counted on the meta device (no memory, no compute), times 3 for fwd + bwd."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model()
        inputs = [x.to("meta") for x in example_inputs]
    counter = FlopCounterMode(display=False)
    with counter:
        model(*inputs)
    return 3.0 * counter.get_total_flops() / inputs[0].shape[0]


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, start_step: int, tensorboard: bool,
                 progress_bar: bool, wandb_project: str | None = None, config: dict | None = None):
        """wandb_project: log to Weights & Biases too, in that project, with `config` as the run's config."""
        self.is_main = is_main
        self.file = self.writer = self.bar = self.wandb = None
        if not is_main:
            return
        self.file = open(Path(run_dir) / "metrics.jsonl", "a", buffering=1)
        if wandb_project is not None:
            from pretrain.engine.wandb_log import WandbWriter

            self.wandb = WandbWriter(Path(run_dir), wandb_project, config or {})
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if progress_bar and sys.stderr.isatty():  # a bar redrawn into a SLURM log file is thousands of lines
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=Path(run_dir).name, unit="step",
                            dynamic_ncols=True)

    def event(self, name: str, **fields):
        if self.is_main:
            self.file.write(json.dumps({"event": name, **fields, "time": time.time()}) + "\n")

    def log(self, step: int, values: dict):
        if not self.is_main:
            return
        self.file.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr_peak", "samples_per_s")})

    def advance(self, steps: int = 1):
        if self.bar is not None:
            self.bar.update(steps)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
        if self.file is not None:
            self.file.close()
