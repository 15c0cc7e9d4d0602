"""What a job leaves behind and whom it lets in, on the real engine (DeepSpeed ZeRO-3, 2 CPU ranks, the local
launcher): a second job on a busy run directory refuses in one line while the first trains on; a save longer than a
step's timeout lives on its own allowance, while a rank frozen in a step ends the job, named; the launcher SIGKILLed
mid-run leaves no process of the job alive and the run directory still; a lock whose holder is gone is taken over.
Every wait is guarded only against a hang."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import CONFIG, FAST, REPO, TESTS, WORKERS, wait_for
from fault_engine import OVERTIME_S
from launch.run_lock import HOLDER_FILE, RunDirBusy, RunLock
from pretrain import progress

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}", "PRETRAIN_FAULT": ""}


def start(run_dir: Path, *overrides, fault: str = "") -> subprocess.Popen:
    """`pretrain run` on 2 local ranks of the real engine (fault_engine records each rank's pid in RUN_DIR/pids)."""
    return subprocess.Popen([sys.executable, "-m", "launch", "run", CONFIG, "--launcher", "local", "--nproc", "2",
                             "--engine", "fault_engine", f"run_dir={run_dir}", *FAST, *overrides],
                            cwd=REPO, env={**ENV, "PRETRAIN_FAULT": fault}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def steps_logged(run_dir: Path, after_line: int = 0) -> int:
    """The last training step in metrics.jsonl, counting only lines after the first `after_line`."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()[after_line:] if metrics.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip() and '"loss"' in line), default=0)


def job_processes(run_dir: Path) -> list[psutil.Process]:
    """Every live process in a rank's process group (each rank leads one): the rank, its data workers, the watcher."""
    groups = {int(p.read_text()) for p in (run_dir / "pids").glob("rank*")}
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) in groups and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


TIMEOUT_S = 30  # distributed.timeout_s: short, yet longer than any wait of a healthy step on a loaded machine
SAVE_ALLOWANCE_S = 120  # distributed.checkpoint_timeout_s: longer than the slow save, TIMEOUT_S + OVERTIME_S


def training(job: subprocess.Popen, run_dir: Path, past_step: int, after_line: int = 0):
    """Wait until `job` logs a step after `past_step`; fail with its output if it ends first."""
    def trained() -> bool:
        if job.poll() is not None:
            raise AssertionError(f"the job ended (status {job.returncode}):\n{job.communicate()[0][-4000:]}")
        return steps_logged(run_dir, after_line) > past_step
    wait_for(trained)


def in_a_step(run_dir: Path, rank: int) -> bool:
    """`rank`'s last heartbeat is a step's, and the save after the next step at the soonest."""
    beat = progress.read(run_dir, since=0).get(rank)
    return beat is not None and beat.phase == "step" and (beat.step + 1) % 5 != 0


def test_a_busy_run_dir_refuses_a_second_job_a_frozen_rank_is_named_a_killed_launcher_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir, "max_steps=1000", "checkpoint.every=5", f"distributed.timeout_s={TIMEOUT_S}",
                  f"distributed.checkpoint_timeout_s={SAVE_ALLOWANCE_S}", fault="slow-save:5:1")
    try:
        training(first, run_dir, 1)
        assert len(job_processes(run_dir)) >= 4  # two ranks, each with a watcher

        asked = time.monotonic()
        second = start(run_dir, "max_steps=1000")
        out, _ = second.communicate(timeout=300)
        print(f"\nFAULT second job on a busy run dir: refused {time.monotonic() - asked:.1f} s after its start "
              "(config checks included)")
        refusal = [line for line in out.splitlines() if "in use by another job" in line]
        assert second.returncode == 2, out[-3000:]
        assert len(refusal) == 1 and str(run_dir) in refusal[0]
        assert f"host {socket.gethostname()}, pid {first.pid}" in refusal[0]
        assert not (run_dir / "failures").exists()
        at_refusal = steps_logged(run_dir)
        training(first, run_dir, at_refusal)  # the first job trains on
        assert first.poll() is None

        # Rank 1's save at step 5 outlasts a step's timeout and the launcher's grace; rank 0 waits for it in the
        # save's collectives, the launcher by the save's allowance, and the job trains on.
        training(first, run_dir, 5)
        slow = json.loads((run_dir / "fault.json").read_text())
        assert (slow["kind"], slow["step"], slow["rank"]) == ("slow-save", 5, 1)
        print(f"\nFAULT a save of {TIMEOUT_S + OVERTIME_S:.0f} s on rank 1, timeout_s={TIMEOUT_S}, "
              f"checkpoint_timeout_s={SAVE_ALLOWANCE_S}: the job trained on")

        # Rank 1 freezes in a step (a wedged device, a stuck read): rank 0's collective gives up after the step's
        # timeout, the launcher ends rank 1 after its grace and names it.
        wait_for(lambda: in_a_step(run_dir, 1))
        frozen = int((run_dir / "pids" / "rank1").read_text())
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()
        out, _ = first.communicate(timeout=600)
        print(f"\nFAULT rank 1 SIGSTOPped, timeout_s={TIMEOUT_S}: {time.monotonic() - stopped:.1f} s to the launcher's "
              "exit")
        assert first.returncode == 1, out[-4000:]
        named = [line for line in out.splitlines() if "stopped making progress" in line]
        assert named and named[-1].startswith(f"[pretrain] rank 1 on {socket.gethostname()}, last seen"), out[-4000:]
        assert "in phase 'step'" in named[-1].split("; its peers")[0]
        assert "its peers: rank 0 on" in named[-1]
        report = out.rstrip().splitlines()
        assert report[-2] == named[-1] and report[-1].startswith("[pretrain] FAILED")  # not rank 0's "timed out"
        assert not job_processes(run_dir)
    finally:
        if first.poll() is None:
            first.kill()

    offset = len((run_dir / "metrics.jsonl").read_text().splitlines())
    resumed = start(run_dir, "max_steps=1000", "checkpoint.every=5", WORKERS)  # its data workers must go with it
    try:
        training(resumed, run_dir, 0, offset)
        resumed.send_signal(signal.SIGKILL)
        resumed.wait(timeout=60)
        killed = time.monotonic()
        wait_for(lambda: not job_processes(run_dir), timeout=60)
        print(f"\nFAULT launcher SIGKILLed: {time.monotonic() - killed:.1f} s until no process of the job is alive")
        before = snapshot(run_dir)
        time.sleep(3)
        assert snapshot(run_dir) == before
    finally:
        if resumed.poll() is None:
            resumed.kill()

    # The killed launcher's lock.json is left behind; its flock went with it, so the next job takes over.
    notes = []
    with RunLock(run_dir, notes.append):
        holder = json.loads((run_dir / HOLDER_FILE).read_text())
        assert holder["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {resumed.pid}" in notes[0] and "its lock is released" in notes[0]
    assert not (run_dir / HOLDER_FILE).exists()


def test_a_lock_of_another_host_holds_until_its_heartbeat_is_stale(tmp_path):
    """Where flock is not honoured across hosts, lock.json's heartbeat decides."""
    holder = {"host": "node17", "pid": 4242, "slurm_job_id": "981", "since": time.time()}
    (tmp_path / HOLDER_FILE).write_text(json.dumps({**holder, "heartbeat": time.time() - 5}))
    try:
        with RunLock(tmp_path):
            raise AssertionError("a live holder's lock was taken")
    except RunDirBusy as busy:
        assert str(tmp_path) in str(busy) and "host node17, pid 4242, SLURM job 981" in str(busy)
    (tmp_path / HOLDER_FILE).write_text(json.dumps({**holder, "heartbeat": time.time() - 600}))
    notes = []
    with RunLock(tmp_path, notes.append):
        pass
    assert len(notes) == 1 and "node17" in notes[0] and "no heartbeat for 600 s" in notes[0]


def test_a_held_lock_refuses_in_the_same_host(tmp_path):
    with RunLock(tmp_path):
        try:
            with RunLock(tmp_path):
                raise AssertionError("the run directory was locked twice")
        except RunDirBusy as busy:
            assert f"pid {os.getpid()}" in str(busy)
