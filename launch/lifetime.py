"""Nothing outlives its job: a rank process, its data workers and their `pipe:` commands end within about a second of
the death of the launcher that started the rank, SIGKILL of the launcher included.

Two parts, because the kernel's parent-death signal reaches one generation only. `bind_rank_to_parent()`, called first
thing in a rank, asks the kernel for SIGKILL when the rank's parent dies (PR_SET_PDEATHSIG; checked against the
parent's pid given by the launcher, in case it died before the call). It then starts a watcher, a small process in the
rank's process group that polls its own parent, the rank: once the rank is gone, however it ended, the watcher kills
the whole process group, which holds everything the rank started (data workers, the forkserver, `pipe:` commands),
and itself. The local launcher makes every rank the leader of a process group of its own; under SLURM the rank makes
itself one, so that its watcher never kills a peer task, and its parent is slurmstepd, which ends the step when srun
or the batch script dies. SLURM finds a step's processes by cgroup or by process tree (proctrack), not by process
group, so its signals (preemption, scancel) still reach the rank.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PARENT_PID_ENV = "PRETRAIN_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 0.2


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies; exit at once if `parent_pid` is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the prctl: no signal will come
        os._exit(1)


def bind_rank_to_parent(parent_pid: int) -> subprocess.Popen:
    """Tie this rank, and all it will start, to the lifetime of its parent, `parent_pid` (see the module doc); returns
    the watcher."""
    die_with_parent(parent_pid)
    if os.getpgid(0) != os.getpid():  # under SLURM: the step's tasks share one group, and peers must not die with us
        os.setpgid(0, 0)
    return subprocess.Popen([sys.executable, "-m", "launch.lifetime", str(os.getpid())], stdin=subprocess.DEVNULL)


def watch(rank_pid: int) -> None:
    """The watcher: once `rank_pid`, its parent, is gone, kill the rank's process group (this process included)."""
    while os.getppid() == rank_pid:
        time.sleep(POLL_S)
    os.killpg(os.getpgid(0), signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
