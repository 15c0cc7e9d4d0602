"""Checkpoints in DeepSpeed's format under RUN_DIR/checkpoints/, one folder per step (`step00000800/`), with DeepSpeed's
`latest` file naming the newest.

The commit protocol. A kill -9, a preemption, a full disk or a failing rank at any moment leaves the newest complete
checkpoint in place and named by `latest`; a checkpoint that `latest` names is never written into again.
1. Every rank writes into a staging folder (`.staging-step00000800/`): DeepSpeed's model and optimizer shards, and its
   own `rank*_state.pt` (data position, RNG, EMA shard). A write that fails (ENOSPC, EIO, ...) is recorded, not raised,
   so every rank still reaches step 2 and nobody waits in a collective that will never come.
2. The ranks agree: each reports success and the files it wrote (name, size) to all others. If any rank failed, the
   staging folder is removed and every rank raises `CheckpointNotSaved` naming the ranks and their errors.
3. Rank 0 writes `manifest.json` (step, world size, the task's backbone prefix, every file and its size) into the
   staging folder, renames the folder to `step00000800/`, then points `latest` at it (temp file, fsync, rename, fsync
   of the folder).
On resume the newest folder whose manifest matches the files on disk is used; any other (a save cut off before its
manifest, a file truncated later) is reported, with the reason, and ignored.

Loading never runs code from a file: see safe_loading.py.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.engine.safe_loading import load_file, weights_only_loads
from pretrain.fileio import atomic_write_json, atomic_write_text, fsync_dir

MANIFEST = "manifest.json"
LATEST = "latest"
STAGING = ".staging-"
UNIVERSAL_SUFFIX = "_universal"
TAG = re.compile(r"^step(\d{8})$")


class CheckpointNotSaved(RuntimeError):
    """A save that at least one rank could not write; nothing of it was committed."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_state_name(rank: int) -> str:
    return f"rank{rank:05d}_state.pt"


@dataclass(frozen=True)
class Candidate:
    tag: str
    problem: str | None  # None: complete


def inspect_tag(folder: Path) -> str | None:
    """None if `folder` holds a complete checkpoint, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (a save cut off before its commit, or written by an older version)"
    except (OSError, ValueError) as error:
        return f"unreadable {MANIFEST} ({error})"
    for name, size in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def scan(directory: Path) -> list[Candidate]:
    """Every step folder, newest first, with what is wrong with it (if anything)."""
    tags = sorted((p.name for p in directory.glob("step*") if p.is_dir() and TAG.match(p.name)), reverse=True)
    return [Candidate(tag, inspect_tag(directory / tag)) for tag in tags]


def newest_complete(directory: str | Path) -> str | None:
    return next((c.tag for c in scan(Path(directory)) if c.problem is None), None)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def convert_to_universal(directory: Path, tag: str, world_size: int) -> None:
    """Convert `tag` into `tag`_universal in a process of its own (see universal.py). The conversion writes into a
    staging folder, renamed when complete: a finished conversion is kept; one that fails or is killed part-way leaves
    the staging folder, from which the next attempt resumes (universal.py redoes only what is not marked done). The
    staging folder of another checkpoint's conversion is removed first: only the newest is ever resumed."""
    universal = tag + UNIVERSAL_SUFFIX
    staging, target = directory / (STAGING + universal), directory / universal
    for other in directory.glob(STAGING + "*" + UNIVERSAL_SUFFIX):
        if other != staging:
            shutil.rmtree(other, ignore_errors=True)
    converted = subprocess.run([sys.executable, "-m", "pretrain.engine.universal", "--input_folder",
                                str(directory / tag), "--output_folder", str(staging)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if converted.returncode != 0:
        raise RuntimeError(f"the universal conversion of {directory / tag} (saved on "
                           f"{read_manifest(directory / tag)['world_size']} ranks, resumed on {world_size}) failed: "
                           f"{conversion_failure(converted)}"
                           + (f"; the next attempt resumes it from {staging}" if staging.is_dir() else ""))
    shutil.copy(directory / tag / MANIFEST, staging / MANIFEST)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    fsync_dir(directory)


def conversion_failure(converted: subprocess.CompletedProcess) -> str:
    if converted.returncode < 0:
        return f"killed by {signal.Signals(-converted.returncode).name}"
    return (converted.stderr.strip().splitlines()[-1:] or [f"exit status {converted.returncode}"])[0]


def convert_for_resume(directory: str | Path, rank: int, world_size: int, poll_s: float = 1.0) -> None:
    """Run before the process group exists, so that no collective's timeout runs while a large checkpoint converts
    (a G checkpoint of 128 ranks takes longer than any sensible timeout): if the newest complete checkpoint was saved
    on another number of ranks, rank 0 converts it to the universal format and the other ranks wait for the result on
    the file system. If rank 0 fails, its launcher ends the waiting ranks."""
    directory = Path(directory)
    tag = newest_complete(directory)
    if tag is None or read_manifest(directory / tag)["world_size"] == world_size:
        return
    done = directory / (tag + UNIVERSAL_SUFFIX) / MANIFEST
    if rank == 0 and not done.is_file():
        convert_to_universal(directory, tag, world_size)
    while not done.is_file():
        time.sleep(poll_s)


class RecordingWriter:
    """Stands in for DeepSpeed's checkpoint engine (its `save` is the one place DeepSpeed writes a shard): a failed
    write is recorded instead of raised, so the rank carries on through DeepSpeed's collectives to the agreement, and
    each written file is fsynced and listed with its size for the manifest."""

    def __init__(self, inner):
        self.inner = inner
        self.error: str | None = None
        self.files: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def begin(self):
        self.error, self.files = None, {}

    def save(self, state_dict, path: str):
        if self.error is not None:
            return  # this save will not be committed; write nothing more
        try:
            self.inner.save(state_dict, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            self.files[Path(path).name] = os.path.getsize(path)
        except Exception as error:  # ENOSPC and EIO come as OSError or as torch's RuntimeError from its zip writer
            self.error = f"{type(error).__name__}: {error} (writing {path})"


class CheckpointManager:
    def __init__(self, directory: Path, keep: int, rank: int, world_size: int, backbone_prefix: str):
        self.directory, self.keep, self.rank, self.world_size = Path(directory), keep, rank, world_size
        self.backbone_prefix = backbone_prefix  # recorded in the manifest, for the export
        self.writer: RecordingWriter | None = None
        self.saved_step: int | None = None  # the step of the checkpoint this run last saved or resumed from

    def attach(self, engine):
        """Route the DeepSpeed engine's checkpoint writes through a RecordingWriter."""
        self.writer = RecordingWriter(engine.checkpoint_engine)
        engine.checkpoint_engine = self.writer

    # -- what to resume from (decided before deepspeed.initialize: universal loading is an engine config option)

    def resume_tag(self, report=print) -> str | None:
        """The newest complete checkpoint, chosen by rank 0 and broadcast (so every rank uses the same one, even on a
        file system whose nodes see new files late). Incomplete ones and interrupted saves are reported."""
        choice = [None]
        if self.rank == 0:
            choice[0] = self._choose(report)
        dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def _choose(self, report) -> str | None:
        candidates = scan(self.directory)
        chosen = next((c.tag for c in candidates if c.problem is None), None)
        for c in candidates:
            if c.problem is not None and (chosen is None or c.tag > chosen):
                report(f"checkpoint {self.directory / c.tag} is incomplete and ignored: {c.problem}")
        for staging in sorted(self.directory.glob(STAGING + "*")):
            report(f"{staging} is an interrupted save; ignored (removed at the next save)")
        latest = self.directory / LATEST
        if chosen is not None and (not latest.is_file() or latest.read_text().strip() != chosen):
            atomic_write_text(latest, chosen)  # a kill between the rename and `latest` leaves it one behind
        return chosen

    def saved_world_size(self, tag: str) -> int:
        return read_manifest(self.directory / tag)["world_size"]

    def needs_universal(self, tag: str) -> bool:
        return self.saved_world_size(tag) != self.world_size

    def prepare_universal(self, tag: str) -> str:
        """`tag` in DeepSpeed's universal format, so it loads on another number of ranks; converted here (rank 0) only
        if convert_for_resume, which runs before any collective, chose another checkpoint than rank 0 now does."""
        universal = tag + UNIVERSAL_SUFFIX
        if self.rank == 0 and not (self.directory / universal / MANIFEST).is_file():
            convert_to_universal(self.directory, tag, self.world_size)
        dist.barrier()
        return universal

    # -- save

    def save(self, engine, step: int, rank_state: dict) -> bool:
        """Save and commit step `step` with every rank; False if it is already saved (a stop request right after a
        periodic save), raises CheckpointNotSaved if any rank could not write its part."""
        if step == self.saved_step:  # known alike on every rank, unlike what each rank's view of the disk says
            return False
        tag = tag_for(step)
        staging = self.directory / (STAGING + tag)
        if self.rank == 0:  # DeepSpeed's save opens with a barrier, so no rank writes here before this is gone
            shutil.rmtree(staging, ignore_errors=True)
        self.writer.begin()
        engine.save_checkpoint(str(self.directory), tag=staging.name, client_state={"step": step}, save_latest=False)
        self.writer.save({**rank_state, "rng": rng_state()}, str(staging / rank_state_name(self.rank)))
        outcomes = [None] * self.world_size
        dist.all_gather_object(outcomes, (self.writer.error, self.writer.files))
        failures = {rank: error for rank, (error, _) in enumerate(outcomes) if error is not None}
        if failures:
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            kept = newest_complete(self.directory)
            raise CheckpointNotSaved(
                f"checkpoint at step {step} was not saved: " + "; ".join(f"rank {r}: {e}" for r, e in failures.items())
                + f". Nothing of it was kept; the last complete checkpoint is {kept or 'none'}.")
        if self.rank == 0:
            files = {name: size for _, written in outcomes for name, size in written.items()}
            self._commit(staging, tag, {"step": step, "world_size": self.world_size,
                                        "backbone_prefix": self.backbone_prefix, "files": files})
        self.saved_step = step
        return True

    def _commit(self, staging: Path, tag: str, manifest: dict):
        atomic_write_json(staging / MANIFEST, manifest)
        self._publish(staging, tag)
        self._point_latest(tag)
        self._prune(tag)

    def _publish(self, staging: Path, tag: str):
        target = self.directory / tag
        shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover of the same step; never `latest`'s tag
        os.rename(staging, target)
        fsync_dir(self.directory)

    def _point_latest(self, tag: str):
        atomic_write_text(self.directory / LATEST, tag)

    def _prune(self, newest: str):
        """Keep the newest `keep` complete checkpoints (`newest`, which `latest` names, among them); remove the
        others, incomplete folders, interrupted saves and universal conversions of removed checkpoints."""
        candidates = [c for c in scan(self.directory) if c.tag <= newest]
        kept = {c.tag for c in candidates if c.problem is None}
        kept = set(sorted(kept, reverse=True)[:self.keep]) | {newest}
        stale = [self.directory / c.tag for c in candidates if c.tag not in kept]
        stale += [self.directory / (c.tag + UNIVERSAL_SUFFIX) for c in candidates if c.tag not in kept]
        stale += list(self.directory.glob(STAGING + "*"))
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    # -- load

    def load(self, engine, tag: str) -> tuple[int, dict | None]:
        """Load `tag` into the engine; returns (step, this rank's state), the latter None after a world-size change."""
        folder = self.directory / tag
        with weights_only_loads(folder):
            _, client_state = engine.load_checkpoint(str(self.directory), tag=tag)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
        manifest = read_manifest(folder)
        self.saved_step = manifest["step"]
        if manifest["world_size"] != self.world_size:
            return manifest["step"], None
        rank_state = load_file(folder / rank_state_name(self.rank))
        set_rng_state(rank_state.pop("rng"))
        return manifest["step"], rank_state

    def saved_rank_states(self, tag: str, part: str) -> list:
        """One part (e.g. "loader") of every rank's state saved in `tag` (or in the checkpoint it was converted from)."""
        return saved_rank_states(self.directory / tag.removesuffix(UNIVERSAL_SUFFIX), part)


def saved_rank_states(folder: Path, part: str) -> list:
    """One part of every rank's state saved in the checkpoint `folder`, in rank order, one file read at a time."""
    return [load_file(folder / rank_state_name(rank))[part] for rank in range(read_manifest(folder)["world_size"])]


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (so it loads weights-only)."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position,
                                                   has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
