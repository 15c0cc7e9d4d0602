"""Checkpoints in DeepSpeed's format under RUN_DIR/checkpoints/, with DeepSpeed's `latest` file naming the newest tag.

Crash safety: every rank writes its files, all ranks meet at a barrier, and only then does rank 0 point `latest` at
the new tag (an atomic rename). A kill at any moment therefore leaves `latest` naming a complete checkpoint; a
half-written tag is never referenced and is removed by the next pruning.

Besides DeepSpeed's model/optimizer/scheduler state, each tag holds `run_state.json` (step, world size) and one
`rank*_state.pt` per rank (that rank's data-loader position and RNG states, which differ between ranks).
"""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

RUN_STATE = "run_state.json"
UNIVERSAL_SUFFIX = "_universal"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


class CheckpointManager:
    def __init__(self, directory: Path, keep: int, rank: int, world_size: int):
        self.directory, self.keep, self.rank, self.world_size = Path(directory), keep, rank, world_size

    # -- what to resume from (decided before deepspeed.initialize: universal loading is an engine config option)

    def latest_tag(self) -> str | None:
        latest = self.directory / "latest"
        return latest.read_text().strip() if latest.is_file() else None

    def saved_world_size(self, tag: str) -> int:
        return json.loads((self.directory / tag / RUN_STATE).read_text())["world_size"]

    def needs_universal(self, tag: str) -> bool:
        return self.saved_world_size(tag) != self.world_size

    def prepare_universal(self, tag: str) -> str:
        """Convert `tag` to DeepSpeed's universal format (once, on rank 0), so it loads on another number of ranks."""
        universal = tag + UNIVERSAL_SUFFIX
        if self.rank == 0 and not (self.directory / universal / "zero").is_dir():
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(self.directory / tag),
                            "--output_folder", str(self.directory / universal)], check=True,
                           stdout=subprocess.DEVNULL)
            shutil.copy(self.directory / tag / RUN_STATE, self.directory / universal / RUN_STATE)
        dist.barrier()
        return universal

    # -- save / load

    def save(self, engine, step: int, rank_state: dict):
        tag = tag_for(step)
        engine.save_checkpoint(str(self.directory), tag=tag, client_state={"step": step}, save_latest=False)
        _atomic_torch_save({**rank_state, "rng": rng_state()}, self.directory / tag / f"rank{self.rank:05d}_state.pt")
        if self.rank == 0:
            _atomic_write(self.directory / tag / RUN_STATE, json.dumps({"step": step, "world_size": self.world_size}))
        dist.barrier()  # every rank's files are on disk before `latest` may name them
        if self.rank == 0:
            _atomic_write(self.directory / "latest", tag)
            self._prune(keep_tag=tag)
        dist.barrier()

    def load(self, engine, tag: str) -> tuple[int, dict | None]:
        """Load `tag` into the engine; returns (step, this rank's state), the latter None after a world-size change."""
        _, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.directory / tag}")
        run_state = json.loads((self.directory / tag / RUN_STATE).read_text())
        if run_state["world_size"] != self.world_size:
            return run_state["step"], None
        rank_state = torch.load(self.directory / tag / f"rank{self.rank:05d}_state.pt", weights_only=False)
        set_rng_state(rank_state.pop("rng"))
        return run_state["step"], rank_state

    def _prune(self, keep_tag: str):
        tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))
        complete = [t for t in tags if (self.directory / t / RUN_STATE).is_file() and t <= keep_tag]
        stale = set(complete[:-self.keep]) | {t for t in tags if t not in complete and t < keep_tag}
        for tag in stale:
            shutil.rmtree(self.directory / tag, ignore_errors=True)
            shutil.rmtree(self.directory / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
