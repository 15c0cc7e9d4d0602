"""What a failed stage tells its user: which rank failed first, its traceback once, and one line for every other rank.

When one rank raises, its peers fail too, moments later, in whatever collective they were waiting in ("Connection
closed by peer"): their tracebacks say nothing about the cause and would bury the one that does. So each rank that
ends with an error writes a record, RUN_DIR/failures/rankNNNNN.json, saying whether its error was its own ("failed")
or the loss of a peer ("stopped"), and prints a single line. The launcher, once every rank has ended, reads the records
of this attempt (newer than its start) and prints one line per rank and the culprit's traceback last. A rank killed
outright (SIGKILL, the OOM killer) leaves no record; its exit status says what happened to it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.fileio import atomic_write_json

FOLDER = "failures"
FAILED, STOPPED = "failed", "stopped"

# How gloo and NCCL report a collective whose peer is gone (closed socket, aborted communicator, watchdog timeout).
PEER_LOSS = re.compile(r"Connection (closed|reset) by peer|Broken pipe|gloo/transport|NCCL communicator was aborted"
                       r"|Watchdog caught collective operation timeout|Socket Timeout|Timed out")


@dataclass
class FailureRecord:
    rank: int
    kind: str  # FAILED: the error was this rank's own; STOPPED: it lost a peer
    error: str  # "Type: message", the first line of the message
    traceback: str
    host: str
    pid: int
    time: float

    def line(self, stage: str) -> str:
        what = "failed" if self.kind == FAILED else "stopped: a peer rank ended"
        return f"[{stage}] rank {self.rank} {what} ({self.error}) on {self.host}, pid {self.pid}"


def is_peer_loss(error: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or bool(PEER_LOSS.search(str(error)))


def _first_line(error: BaseException, limit: int = 200) -> str:
    message = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {message[0]}" if message else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def record(run_dir: str | Path, rank: int, error: BaseException) -> FailureRecord:
    """Write this rank's record of `error` (best effort: a full disk must not hide the error itself)."""
    rec = FailureRecord(rank, STOPPED if is_peer_loss(error) else FAILED, _first_line(error),
                        "".join(traceback.format_exception(error)), socket.gethostname(), os.getpid(), time.time())
    folder = Path(run_dir) / FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"rank{rank:05d}.json", asdict(rec))
    except OSError:
        pass
    return rec


def read_records(run_dir: str | Path, since: float) -> list[FailureRecord]:
    """This attempt's records (written after `since`), oldest first; unreadable ones are skipped."""
    records = []
    for path in sorted((Path(run_dir) / FOLDER).glob("rank*.json")):
        try:
            rec = FailureRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if rec.time >= since:
            records.append(rec)
    return sorted(records, key=lambda r: r.time)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def report(stage: str, run_dir: str | Path, since: float, exit_codes: dict[int, int | None],
           ended_by_launcher: frozenset[int] = frozenset(), ranks_said_theirs: bool = False,
           stalled: str | None = None) -> str:
    """One line per rank, then the culprit's traceback. The culprit: the first rank whose error was its own; else a
    rank killed by a signal the launcher did not send (no record: SIGKILL, the OOM killer); else the first record.
    `ranks_said_theirs`: the ranks' own lines already reached the user (the local launcher's shared console), so only
    the ranks without a record get a line here. `stalled`: the line naming a rank that stopped making progress (see
    pretrain/progress.py), the culprit when no rank failed of its own and none was killed from outside."""
    records = {r.rank: r for r in read_records(run_dir, since)}
    own = [r for r in records.values() if r.kind == FAILED]
    killed = [rank for rank, code in sorted(exit_codes.items())
              if code is not None and code < 0 and rank not in records and rank not in ended_by_launcher]
    culprit = own[0] if own else None if killed or stalled else min(records.values(), key=lambda r: r.time,
                                                                     default=None)
    lines = []
    for rank in sorted(set(exit_codes) | set(records)):
        if rank in records and records[rank] is not culprit and not ranks_said_theirs:
            lines.append(records[rank].line(stage))
        elif rank not in records:
            how = "ended by the launcher" if rank in ended_by_launcher else describe_exit(exit_codes.get(rank))
            lines.append(f"[{stage}] rank {rank}: {how}")
    if culprit is not None:
        lines += [culprit.line(stage) + ":", culprit.traceback.rstrip()]
    elif killed:
        lines.append(f"[{stage}] rank {killed[0]} was {describe_exit(exit_codes[killed[0]])} and left no traceback "
                     "(killed from outside, or by the kernel when out of memory: see dmesg)")
    elif stalled:
        lines.append(stalled)
    return "\n".join(lines)
