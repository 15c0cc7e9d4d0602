"""Local launcher: the plan's stages in sequence on this machine, each with N rank processes (gloo on CPU).

Stages whose result.json exists are skipped, so re-running the same command resumes the schedule where it stopped
(and the engine resumes an unfinished stage from its run_dir). A first SIGINT/SIGTERM is forwarded to the ranks, whose
engine saves a checkpoint together before they exit; a second ends them at once. A failing rank ends the stage, and
its traceback is printed last (failures.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch import failures, rendezvous
from launch.base import Launcher
from launch.lifetime import PARENT_PID_ENV
from launch.run_lock import EXIT_BUSY, RunDirBusy, RunLock
from launch.schedule import Plan, StagePlan, read_result, write_summary
from pretrain import progress
from launch.worker import DEFAULT_ENGINE, EXIT_PREEMPTED


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def rank_command(stage: StagePlan, engine: str) -> list[str]:
    return [sys.executable, "-m", "launch.worker", "--engine", engine, "--stage", json.dumps(stage.to_dict())]


# After a rank fails, its peers get this long to end on their own (gloo peers fail at once; NCCL peers may sit in a
# collective until its timeout); after a stop request, the ranks get this long to save a checkpoint and exit.
FAILURE_GRACE_S = 10.0
STOP_GRACE_S = 300.0
PROGRESS_POLL_S = 1.0
EXIT_INTERRUPTED = 130


class RankGroup:
    """The rank processes of one stage, each the leader of a process group of its own, so that ending a rank also ends
    what it started (data workers, `pipe:` commands), and a Ctrl-C at the terminal reaches the launcher alone."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]]):
        self.procs = [subprocess.Popen(cmd, env=env, start_new_session=True) for cmd, env in zip(commands, envs)]
        self.ended_by_launcher: set[int] = set()

    def codes(self) -> dict[int, int | None]:
        return {rank: p.poll() for rank, p in enumerate(self.procs)}

    def running(self) -> list[int]:
        return [rank for rank, code in self.codes().items() if code is None]

    def terminate(self):
        """Ask the running ranks to save and stop (SIGTERM: the engine's coordinated checkpoint)."""
        for rank in self.running():
            self.procs[rank].send_signal(signal.SIGTERM)

    def kill(self):
        """End every rank and everything in its process group at once."""
        for rank, p in enumerate(self.procs):
            if p.poll() is None:
                self.ended_by_launcher.add(rank)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:  # the group is empty: the rank and all it started are gone
                pass
        for p in self.procs:
            p.wait()


def run_stage(stage: StagePlan, nproc: int, engine: str = DEFAULT_ENGINE, log=print,
              failure_grace_s: float = FAILURE_GRACE_S, stop_grace_s: float = STOP_GRACE_S) -> int:
    """Run one stage with `nproc` rank processes; returns 0 completed, EXIT_PREEMPTED, or non-zero on failure.

    A failing rank ends the stage: the others are asked to stop, then killed after `failure_grace_s`. A first SIGINT or
    SIGTERM asks every rank to save and stop (killed if still running after `stop_grace_s`), a second ends them at
    once. Nothing a rank started outlives the stage."""
    port = rendezvous.free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([_repo_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env[PARENT_PID_ENV] = str(os.getpid())  # each rank dies with this process (lifetime.py)
    started = time.time()
    ranks = RankGroup([rank_command(stage, engine)] * nproc,
                      [dict(env, **rendezvous.local(rank, nproc, port).env()) for rank in range(nproc)])
    deadline: list[float] = []  # when the ranks asked to stop are killed
    signals: list[int] = []

    def on_signal(signum, _frame):
        signals.append(signum)
        if len(signals) > 1:
            log(f"[{stage.name}] got {signal.Signals(signum).name} again: ending every rank now")
            deadline[:] = [0.0]
            return
        log(f"[{stage.name}] got {signal.Signals(signum).name}: asking every rank to save and stop "
            "(send it again to end them at once)")
        ranks.terminate()
        deadline[:] = [min(deadline + [time.monotonic() + stop_grace_s])]

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed, polled = None, time.monotonic()
    try:
        while ranks.running():
            if not deadline and time.monotonic() - polled >= PROGRESS_POLL_S:
                polled = time.monotonic()
                beats = progress.read(stage.run_dir, started)
                late = progress.overdue(beats, ranks.running(), failure_grace_s, time.time())
                if late is not None:  # silent past its phase's allowance: its peers wait in vain, end them all
                    log(progress.stalled_line(stage.name, beats, late.rank, time.time()) + "; ending the job")
                    deadline[:] = [0.0]
            if failed is None:
                failed = next((r for r, c in ranks.codes().items() if c not in (None, 0, EXIT_PREEMPTED)), None)
                if failed is not None:
                    log(f"[{stage.name}] rank {failed} ended ({failures.describe_exit(ranks.codes()[failed])}); "
                        "stopping the other ranks")
                    ranks.terminate()
                    deadline[:] = [min(deadline + [time.monotonic() + failure_grace_s])]
            if deadline and time.monotonic() >= deadline[0]:
                if deadline[0]:
                    log(f"[{stage.name}] rank(s) {ranks.running()} still running; killing them")
                break
            time.sleep(0.1)
    finally:
        ranks.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = ranks.codes()
    if all(c in (0, EXIT_PREEMPTED) for c in codes.values()):
        return EXIT_PREEMPTED if EXIT_PREEMPTED in codes.values() else 0
    if failed is None and signals:
        return EXIT_INTERRUPTED  # stopped by the user before every rank had saved
    log(failures.report(stage.name, stage.run_dir, started, codes, frozenset(ranks.ended_by_launcher),
                        ranks_said_theirs=True, stalled=_stalled(stage, started, ranks.ended_by_launcher)))
    return codes[failed] if failed is not None and codes[failed] > 0 else 1


def _stalled(stage: StagePlan, started: float, ended_by_launcher: set[int]) -> str | None:
    """The rank that stopped making progress, if any: of those that never ended of their own accord while their peers
    gave up on them (a collective timeout, "stopped"), the one silent the longest."""
    beats = progress.read(stage.run_dir, started)
    silent = [beats[r] for r in ended_by_launcher if r in beats]
    if not silent:
        return None
    return progress.stalled_line(stage.name, beats, min(silent, key=lambda b: b.time).rank, time.time())


def run_plan(plan: Plan, nproc: int, engine: str = DEFAULT_ENGINE, log=print) -> int:
    for stage in plan.stages:
        if read_result(stage) is not None:
            log(f"[{stage.name}] already completed ({stage.result_path()}); skipping")
            continue
        t0 = time.monotonic()
        try:
            with RunLock(stage.run_dir, log):
                log(f"[{stage.name}] starting: {nproc} rank(s), run_dir {stage.run_dir}")
                code = run_stage(stage, nproc, engine, log)
        except RunDirBusy as busy:
            log(f"[{stage.name}] {busy}")
            return EXIT_BUSY
        if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
            saved = "after saving a checkpoint" if code == EXIT_PREEMPTED else "before every rank had saved"
            log(f"[{stage.name}] stopped {saved}; run the same command again to resume from the last complete "
                "checkpoint")
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


class LocalLauncher(Launcher):
    name = "local"
    description = "the stages in sequence on this machine, --nproc rank processes each (gloo on CPU, nccl on GPUs)"

    def __init__(self, args, log):
        super().__init__(args, log)
        self.nproc = args.nproc

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--nproc", type=int, default=1, help="rank processes per stage (default 1)")

    def ranks(self, stage):
        return self.nproc

    def check(self, plan):
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")

    def dry_run(self, plan):
        return "\n".join(f"# {stage.name}: {self.nproc} x " + " ".join(rank_command(stage, self.engine))
                         for stage in plan.stages)

    def run(self, plan):
        return run_plan(plan, self.nproc, self.engine, self.log)
