"""Process-group set-up from the torch env:// variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
which both launchers export: gloo on CPU, nccl on GPUs."""
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import DistributedConfig


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = DistributedConfig.timeout_s) -> World:
    """The process group, whose collectives give up on a silent peer after `timeout_s` (distributed.timeout_s)."""
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed("nccl" if device.type == "cuda" else "gloo", verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def set_collective_timeout(seconds: float):
    """Every process group of this rank waits up to `seconds` for a peer, from its next operation on (gloo:
    tests/test_progress.py; NCCL reads the timeout into each new work item). Every group, not only the default one:
    DeepSpeed runs ZeRO's collectives on a clone of the world group, made by new_group with torch's default timeout
    (30 minutes on gloo, 10 on NCCL), not the one init_process_group was given."""
    for group in dist.distributed_c10d._world.pg_map:  # torch has no public list of the groups
        dist.set_timeout(timedelta(seconds=seconds), group)


@contextmanager
def collective_timeout(seconds: float, after_s: float):
    """`seconds` for collectives inside the block, `after_s` after it (also for the groups made inside it)."""
    set_collective_timeout(seconds)
    try:
        yield
    finally:
        set_collective_timeout(after_s)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Per-key sums over ranks (numbers, or one-element tensors left on the device); every rank must pass the same
    keys. One collective, and one wait for the device, whatever the number of keys."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def mean_over_ranks(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    return {k: v / dist.get_world_size() for k, v in sum_over_ranks(values, device).items()}


def sum_counts_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums where ranks may hold different keys (e.g. skipped samples by reason)."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, counts)
    total: dict[str, int] = {}
    for rank_counts in every:
        for key, count in rank_counts.items():
            total[key] = total.get(key, 0) + count
    return total


def shutdown():
    """The orderly end of a run: every rank is here, so a barrier is safe."""
    dist.barrier()
    dist.destroy_process_group()


def abort():
    """The end of a failing rank: no collective (a peer may be dead, or blocked in one of its own). Gloo peers see the
    connections close and fail at once; NCCL peers are ended by the launcher (srun --kill-on-bad-exit, the local
    launcher's SIGTERM then SIGKILL); NCCL's communicators are aborted, not destroyed. The rank's own child processes are
    ended too (see end_child_processes)."""
    end_child_processes()
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "nccl":  # destroy_process_group would wait on the in-flight collectives; abort does not
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the error being raised is the one to report, not a teardown failure after it
        pass


def end_child_processes():
    """SIGKILL every process this one started, and theirs. Data workers ignore SIGTERM (SLURM sends it to every
    process of a job step, and the rank must outlive it to save), so multiprocessing's own exit handler, which
    terminates and then joins them, would wait forever on one stuck in a `pipe:` read; nor may a `pipe:` command
    outlive its rank."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:  # already gone
            pass
