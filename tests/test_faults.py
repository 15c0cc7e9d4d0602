"""Faults injected into the real engine (DeepSpeed ZeRO-3, 2 CPU ranks, the local launcher), one after another on one
run directory. After each, `latest` must name a complete checkpoint, the launcher must have ended every process the
stage started, and the next episode, which resumes, must reproduce the uninterrupted run's losses from its resume step.
A save cut off at each of its points, a full disk and a repeated save are tested in-process on two ranks
(tests/test_checkpoint_commit.py); here the launches that only a real job shows: a raise, a SIGKILL, two SIGTERMs.

Each launch runs under a subprocess timeout that only guards against a hang. `pytest -s` prints the seconds from each
fault to the launcher's exit (docs/benchmarks.md, "When a run fails")."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from conftest import CONFIG, FAST, REPO, TESTS, WORKERS, records, wait_for
from pretrain.engine.checkpoint import inspect_tag, tag_for

CHAIN = ["max_steps=12", "checkpoint.every=2"]


@dataclass
class Launch:
    code: int
    out: str
    new_records: list
    seconds_after_fault: float | None
    leftovers: list = field(default_factory=list)


def sessions_alive(run_dir: Path) -> list[str]:
    """Processes still running in a session of one of the stage's ranks (each rank leads its own): data workers,
    forkservers, `pipe:` commands. Zombies, killed and waiting for init to reap them, are not running."""
    sessions = {int(p.read_text()) for p in (run_dir / "pids").glob("rank*")}
    alive = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(proc.pid) in sessions and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.info["cmdline"] or [])[:120])
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def launch(run_dir: Path, fault: str | None, *overrides, act=None, config=CONFIG) -> Launch:
    """`pretrain run` with the local launcher on 2 ranks, PRETRAIN_FAULT injected; `act(proc)` runs meanwhile."""
    metrics = run_dir / "metrics.jsonl"
    offset = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    (run_dir / "fault.json").unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}",
           "PRETRAIN_FAULT": fault or ""}
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", config, "--launcher", "local", "--nproc", "2",
                             "--engine", "fault_engine", f"run_dir={run_dir}", *FAST, *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if act is not None:
        act(proc, run_dir)
    out, _ = proc.communicate(timeout=600)
    ended = time.time()
    fired = json.loads((run_dir / "fault.json").read_text()) if (run_dir / "fault.json").is_file() else None
    seconds = ended - fired["time"] if fired else None
    if seconds is not None:
        print(f"\nFAULT {fault}: {seconds:.1f} s from the fault to the launcher's exit (status {proc.returncode})")
    new = records(run_dir)[offset:] if metrics.is_file() else []
    return Launch(proc.returncode, out, new, seconds, sessions_alive(run_dir) if (run_dir / "pids").is_dir() else [])


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def assert_resumed_exactly(result: Launch, from_step: int, reference: dict):
    resumes = [r for r in result.new_records if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [from_step], result.out[-3000:]
    resumed = {r["step"]: r["loss"] for r in result.new_records if "loss" in r}
    assert resumed and min(resumed) == from_step + 1
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([reference[s] for s in sorted(resumed)], rel=1e-6)


def assert_ended_cleanly(result: Launch, run_dir: Path, latest_step: int, code: int = 1):
    assert result.code == code, result.out[-4000:]
    assert latest(run_dir) == tag_for(latest_step)
    assert inspect_tag(run_dir / "checkpoints" / latest(run_dir)) is None  # complete
    assert not result.leftovers, result.leftovers


def last_lines(out: str, n: int = 2) -> str:
    return "\n".join(line for line in out.splitlines() if line.strip())[-n:]


def test_faults_in_sequence_each_leave_a_resumable_checkpoint(reference_run, tmp_path):
    reference = {r["step"]: r["loss"] for r in records(reference_run[0]) if "loss" in r}
    run_dir = tmp_path / "run"

    # A rank raises mid-step: the job ends at once, rank 1's traceback last, rank 0 only "stopped".
    result = launch(run_dir, "raise:3:1", *CHAIN)
    assert_ended_cleanly(result, run_dir, 2)
    assert "rank 0 stopped: a peer rank ended" in result.out
    assert result.out.count("Traceback") == 1
    tail = result.out[result.out.index("Traceback"):]
    assert "RuntimeError: injected fault: rank 1 raises at step 3" in tail and "rank 0" not in tail

    # A rank is killed outright (the OOM killer): no traceback to show, the launcher says how it died.
    result = launch(run_dir, "kill:5:1", *CHAIN)
    assert_resumed_exactly(result, 2, reference)
    assert_ended_cleanly(result, run_dir, 4)
    assert "rank 1 was killed by SIGKILL" in result.out

    # A second SIGTERM while the ranks save for the first: everything ends at once, the save is not committed.
    def signal_twice(proc, run_dir):
        fault = run_dir / "fault.json"
        wait_for(lambda: fault.is_file() and json.loads(fault.read_text())["kind"] == "hold")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: json.loads(fault.read_text())["kind"] == "save")
        proc.send_signal(signal.SIGTERM)

    result = launch(run_dir, "hold:7:0", *CHAIN, act=signal_twice)
    assert_resumed_exactly(result, 4, reference)
    assert_ended_cleanly(result, run_dir, 6)
    assert "again: ending every rank now" in result.out and "before every rank had saved" in result.out

    # And the run finishes as if nothing had happened.
    result = launch(run_dir, None, *CHAIN)
    assert_resumed_exactly(result, 6, reference)
    assert result.code == 0, result.out[-4000:]
    assert "interrupted save; ignored" in result.out
    assert latest(run_dir) == tag_for(12) and (run_dir / "result.json").is_file()


def test_a_dead_data_source_ends_the_run_naming_it(tmp_path):
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(os.urandom(4096))  # not tars: every open fails
    dead = str(tmp_path / "{00000..00003}.tar")
    result = launch(tmp_path / "run", None, "max_steps=4", WORKERS, f"data.train=[{{shards: '{dead}'}}]",
                    "data.samples_per_epoch=1000")
    assert result.code == 1 and not result.leftovers, result.out[-4000:]
    tracebacks = result.out.count("Traceback (most recent call last)") - result.out.count("Original Traceback")
    assert tracebacks == 1  # one rank's, with its data worker's inside
    assert dead in result.out[result.out.index("Traceback"):]


def test_a_hung_data_source_is_killed_after_the_grace_period(tmp_path):
    """A `pipe:` command that never answers: the ranks cannot reach a step boundary to save, so a stop request ends
    them after the grace period, and the hung command with them."""
    run_dir = tmp_path / "run"
    script = ("import sys; from launch import local; from launch.schedule import build_plan; "
              "plan = build_plan(sys.argv[1], sys.argv[2:]); "
              "sys.exit(local.run_stage(plan.stages[0], 2, 'fault_engine', stop_grace_s=5))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}
    proc = subprocess.Popen([sys.executable, "-c", script, CONFIG, f"run_dir={run_dir}", *FAST, WORKERS, "max_steps=4",
                             "data.train=[{shards: 'pipe:sleep 612'}]", "data.samples_per_epoch=1000"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hung = lambda: [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "612"]]  # noqa: E731
    wait_for(lambda: len(hung()) == 2)  # one per rank's data worker
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    print(f"\nFAULT hung data source: {time.time() - signalled:.1f} s from SIGTERM to the launcher's exit")
    assert proc.returncode == 130, out[-3000:]
    assert "still running; killing them" in out
    assert not hung() and not sessions_alive(run_dir)
