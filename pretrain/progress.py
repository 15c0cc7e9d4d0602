"""Each rank's last sign of life, RUN_DIR/progress/rankNNNNN.json: the step and the phase it is in ("convert", "start",
"step", "save", "evaluate"), when it entered it, and how long that phase may take (its allowance: distributed.timeout_s
for a step, the long phases their own, see pretrain/config.py's DistributedConfig). Written by the rank at every step
and at the start of every phase; read by the launcher, which ends a job whose rank has outlived its
phase's allowance and, whenever a job fails without a rank's own error, names the rank that stopped making progress.

A heartbeat is a rename of a small file, without fsync: losing one to a crash costs nothing, and a step does not wait
for the disk.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

FOLDER = "progress"


@dataclass(frozen=True)
class Beat:
    rank: int
    host: str
    pid: int
    step: int
    phase: str
    time: float
    allowance_s: float

    def seen(self, now: float) -> str:
        return f"rank {self.rank} on {self.host}, last seen {now - self.time:.0f} s ago at step {self.step} in phase {self.phase!r}"


class Progress:
    """This rank's heartbeat writer."""

    def __init__(self, run_dir: str | Path, rank: int):
        self.folder, self.rank = Path(run_dir) / FOLDER, rank
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{rank:05d}.json"

    def beat(self, step: int, phase: str, allowance_s: float):
        beat = Beat(self.rank, socket.gethostname(), os.getpid(), step, phase, time.time(), allowance_s)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps(asdict(beat)))
            os.replace(tmp, self.path)
        except OSError:  # a full disk must not end the step; the save that follows says so
            pass


def read(run_dir: str | Path, since: float) -> dict[int, Beat]:
    """The heartbeats of this attempt (newer than `since`), by rank; unreadable ones are skipped."""
    beats = {}
    for path in (Path(run_dir) / FOLDER).glob("rank*.json"):
        try:
            beat = Beat(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if beat.time >= since:
            beats[beat.rank] = beat
    return beats


def overdue(beats: dict[int, Beat], ranks: list[int], grace_s: float, now: float) -> Beat | None:
    """The longest-silent rank among `ranks` whose phase has lasted longer than its allowance plus `grace_s`."""
    late = [beats[r] for r in ranks if r in beats and now - beats[r].time > beats[r].allowance_s + grace_s]
    return min(late, key=lambda b: b.time, default=None)


def stalled_line(stage: str, beats: dict[int, Beat], rank: int, now: float) -> str:
    """`rank` stopped making progress: where it was last seen, and where its peers were."""
    peers = "; ".join(b.seen(now) for r, b in sorted(beats.items()) if r != rank) or "none reported"
    return f"[{stage}] {beats[rank].seen(now)}, stopped making progress; its peers: {peers}"
