"""Local launcher: the plan's stages in sequence on this machine, each with N rank processes (gloo on CPU).

Stages whose result.json exists are skipped, so re-running the same command resumes the schedule where it stopped
(and the engine resumes an unfinished stage from its run_dir). SIGINT/SIGTERM are forwarded to the ranks, whose
engine saves a checkpoint together before they exit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import rendezvous
from launch.schedule import Plan, StagePlan, read_result, write_summary
from launch.worker import DEFAULT_ENGINE, EXIT_PREEMPTED


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def rank_command(stage: StagePlan, engine: str) -> list[str]:
    return [sys.executable, "-m", "launch.worker", "--engine", engine, "--stage", json.dumps(stage.to_dict())]


def run_stage(stage: StagePlan, nproc: int, engine: str = DEFAULT_ENGINE, log=print) -> int:
    """Run one stage with `nproc` rank processes; returns 0 completed, EXIT_PREEMPTED, or the failing rank's status."""
    port = rendezvous.free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_repo_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        rank_env = dict(env, **rendezvous.local(rank, nproc, port).env())
        procs.append(subprocess.Popen(rank_command(stage, engine), env=rank_env))

    def forward(signum, _frame):
        log(f"[{stage.name}] got {signal.Signals(signum).name}: asking every rank to save and stop")
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed: tuple[int, int] | None = None
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                code = p.poll()
                if code not in (None, 0, EXIT_PREEMPTED) and failed is None:
                    failed = (rank, code)
                    log(f"[{stage.name}] rank {rank} failed with exit status {code}; stopping the other ranks")
                    for other in procs:
                        if other.poll() is None:
                            other.terminate()
            time.sleep(0.2)
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:  # never leave a rank behind
            if p.poll() is None:
                p.kill()
    if failed is not None:
        return failed[1] or 1
    bad = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if bad:
        return bad[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def run_plan(plan: Plan, nproc: int, engine: str = DEFAULT_ENGINE, log=print) -> int:
    for stage in plan.stages:
        if read_result(stage) is not None:
            log(f"[{stage.name}] already completed ({stage.result_path()}); skipping")
            continue
        log(f"[{stage.name}] starting: {nproc} rank(s), run_dir {stage.run_dir}")
        t0 = time.monotonic()
        code = run_stage(stage, nproc, engine, log)
        if code == EXIT_PREEMPTED:
            log(f"[{stage.name}] stopped after saving a checkpoint; run the same command again to resume")
            write_summary(plan)
            return 1
        if code != 0:
            later = [s.name for s in plan.stages if s.index > stage.index]
            log(f"[{stage.name}] FAILED (exit status {code}); not running the stages after it: {', '.join(later) or 'none'}")
            write_summary(plan)
            return 1
        summary = write_summary(plan)
        log(f"[{stage.name}] completed in {time.monotonic() - t0:.0f} s: {summary['stages'][stage.name]['metrics']}")
    log(f"all stages completed; summary in {Path(plan.run_dir) / 'summary.json'}")
    return 0
