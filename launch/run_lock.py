"""One job per run directory: a job holds RUN_DIR/.lock for as long as any of its ranks runs, and a second job on the
same directory refuses at once, naming the holder.

Two mechanisms, because cluster file systems differ. `flock` on RUN_DIR/.lock is exact where it is honoured (local
disks, Lustre and GPFS mounted with locking, NFSv4): the kernel drops it when the holder dies, however it dies. Where
it is not honoured across hosts (NFSv3 without lockd, some FUSE mounts), flock succeeds on both hosts, so the holder
also keeps RUN_DIR/lock.json (host, pid, SLURM job id) with a heartbeat renewed every HEARTBEAT_S: a lock.json of
another host whose heartbeat is younger than STALE_S is a live holder even when flock said otherwise. A lock.json
whose holder is gone (its flock dropped on this host, or its heartbeat stale) is taken over, with a note; so is one
left by an earlier run of the same SLURM job (a requeue).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from pretrain.fileio import atomic_write_json

LOCK_FILE, HOLDER_FILE = ".lock", "lock.json"
EXIT_BUSY = 2  # the exit status of a job that refused a busy run directory
HEARTBEAT_S = 15.0
STALE_S = 120.0  # eight missed heartbeats: a holder this quiet is gone, not slow


class RunDirBusy(RuntimeError):
    """Another live job holds the run directory."""


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}"


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """`with RunLock(run_dir, log):` holds the run directory; raises RunDirBusy if a live job holds it."""

    def __init__(self, run_dir: str | Path, log=print):
        self.run_dir, self.log = Path(run_dir), log
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        holder = _read_holder(self.run_dir / HOLDER_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(self._busy(holder or {"host": "unknown (no lock.json yet)"})) from None
        if holder is not None:
            try:
                self._check_gone(holder)
            except RunDirBusy:
                os.close(fd)
                raise
        self._fd = fd
        self._write()
        self._beat = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _busy(self, holder: dict) -> str:
        return f"run directory {self.run_dir} is in use by another job ({describe(holder)}); not starting a second one"

    def _check_gone(self, holder: dict):
        """We hold the flock, but a lock.json is there: taken over unless another host's heartbeat is fresh."""
        age = time.time() - float(holder.get("heartbeat", 0))
        same_job = holder.get("slurm_job_id") and holder.get("slurm_job_id") == self.me["slurm_job_id"]
        if holder.get("host") != self.me["host"] and age < STALE_S and not same_job:
            raise RunDirBusy(self._busy(holder) + f" (heartbeat {age:.0f} s ago; flock is not honoured here)")
        why = "its lock is released" if holder.get("host") == self.me["host"] else f"no heartbeat for {age:.0f} s"
        self.log(f"run directory {self.run_dir}: taking over the lock of a job that is gone ({describe(holder)}: {why})")

    def _write(self):
        atomic_write_json(self.run_dir / HOLDER_FILE, {**self.me, "since": time.time(), "heartbeat": time.time()})

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            holder = _read_holder(self.run_dir / HOLDER_FILE) or {}
            try:
                atomic_write_json(self.run_dir / HOLDER_FILE, {**holder, **self.me, "heartbeat": time.time()})
            except OSError:  # a full or flaky disk: the next beat tries again; the flock still holds
                pass

    def __exit__(self, *_):
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        os.close(self._fd)  # drops the flock
