"""SLURM launcher through submitit: one job per stage, one task per rank, later stages chained with afterok.

The whole schedule is queued at once. Each job's tasks derive their rendezvous from SLURM's environment
(launch.rendezvous.from_slurm); the first task of a dependent job exports the previous stage's backbone before training
(no extra job in the chain).

Preemption and time limits. SLURM sends submitit's signal (USR2, `--signal=USR2@90`) to every task. Submitit's own
handler would checkpoint from inside the signal handler on rank 0 only; instead every rank's handler asks the engine to
stop (`request_stop()`), the engine saves a checkpoint with all ranks together at the next step boundary and returns
"preempted", and only then rank 0 hands over to submitit's handler, which calls `StageTask.checkpoint()` and requeues
the job (`scontrol requeue`). The requeued job resumes from run_dir. `scontrol requeue` (or preemption with
PreemptMode=REQUEUE) sends SIGTERM instead, on which the engine does the same coordinated save; SLURM requeues the job
itself. A preempted task exits without a result, so the job stays pending/running for submitit.

Without accounting (the test cluster), submitit's sacct-based states read UNKNOWN; the wait loop reads states from
squeue instead, and once squeue forgets a job, its stage's result.json or failure records (never a pickle).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from launch.schedule import Plan, StagePlan, read_result, write_summary
from launch import failures
from launch.base import Launcher
from launch.lifetime import bind_rank_to_parent
from launch.run_lock import EXIT_BUSY, RunDirBusy, RunLock
from launch.worker import DEFAULT_ENGINE, EXIT_FAILED, end_with_error, load_engine, run_rank

FINISHED_OK = {"COMPLETED"}
FINISHED_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmOptions:
    """sbatch resources; None leaves the stage's `slurm:` block (schedule YAML) or SLURM's default in force."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int | None = None
    folder: str | None = None  # submitit's folder; default RUN_DIR/submitit/<timestamp>/%j

    def for_stage(self, stage: StagePlan) -> dict[str, Any]:
        """submitit SlurmExecutor parameters for a stage: defaults, then the stage's `slurm:` block, then the flags."""
        params: dict[str, Any] = {"nodes": 1, "ntasks_per_node": 1, "time": 60}
        names = {"nodes": "nodes", "tasks_per_node": "ntasks_per_node", "gpus_per_node": "gpus_per_node",
                 "cpus_per_task": "cpus_per_task", "mem_gb": "mem", "time_min": "time", "time": "time",
                 "partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
                 "signal_delay_s": "signal_delay_s"}
        from_yaml = stage.extra.get("slurm") or {}
        unknown = set(from_yaml) - set(names)
        if unknown:
            raise ValueError(f"stage {stage.name!r}: unknown slurm keys {sorted(unknown)} (allowed: {sorted(names)})")
        for source in (from_yaml, {k: getattr(self, k) for k in names if hasattr(self, k)}):
            for key, value in source.items():
                if value is not None:
                    check_option(key, value)
                    params[names[key]] = f"{value:g}GB" if key == "mem_gb" else value
        if not params.get("gpus_per_node"):
            params.pop("gpus_per_node", None)
        params["job_name"] = f"pretrain:{stage.name}"
        params["srun_args"] = ["--kill-on-bad-exit=1"]  # one failing task ends the step, rather than leaving its peers
        repo = str(Path(__file__).resolve().parent.parent)
        params["setup"] = [f"export PYTHONPATH={shlex.quote(repo)}${{PYTHONPATH:+:$PYTHONPATH}}"]
        return params


# Values that reach the sbatch script. Each becomes an `#SBATCH --key=value` line: a newline would start a shell
# command, so text options are held to the characters SLURM's own syntax uses (a constraint's &|[]*, lists' commas).
TEXT_OPTIONS = {"partition": ".,-", "account": ".-", "qos": ".,-", "constraint": ".,:&|*[]()-"}  # beside \w
COUNT_OPTIONS = {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 0, "cpus_per_task": 1, "time_min": 1, "time": 1,
                 "signal_delay_s": 0}  # the least each may be


def check_option(key: str, value: Any) -> None:
    if key in TEXT_OPTIONS:
        if not isinstance(value, str) or not re.fullmatch(f"[\\w{re.escape(TEXT_OPTIONS[key])}]+", value, re.ASCII):
            raise ValueError(f"slurm option {key}={value!r}: only letters, digits, '_' and {TEXT_OPTIONS[key]!r} "
                             "are allowed")
    elif key == "mem_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"slurm option mem_gb={value!r}: expected a number of GB > 0")
    elif isinstance(value, bool) or not isinstance(value, int) or value < COUNT_OPTIONS[key]:
        raise ValueError(f"slurm option {key}={value!r}: expected a whole number >= {COUNT_OPTIONS[key]}")


def check_path(what: str, path: str) -> None:
    """Paths reach the sbatch script too (--output, --error)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise ValueError(f"{what} {path!r} holds a control character")


class StageTask:
    """The callable each task of a stage's job runs (pickled by submitit). Checkpointable: see the module doc."""

    def __init__(self, plan: Plan, stage_index: int, engine: str = DEFAULT_ENGINE) -> None:
        self.plan = plan
        self.stage_index = stage_index
        self.engine = engine

    @property
    def stage(self) -> StagePlan:
        return self.plan.stages[self.stage_index]

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 after the coordinated save: requeue the same task (it resumes from run_dir)."""
        import submitit

        return submitit.helpers.DelayedSubmission(StageTask(self.plan, self.stage_index, self.engine))

    def __call__(self) -> dict[str, Any]:
        import submitit

        from launch.rendezvous import from_slurm

        bind_rank_to_parent(os.getppid())  # slurmstepd, which ends the step's tasks when srun or the batch script dies
        job_env = submitit.JobEnvironment()
        rdzv = from_slurm()
        usr_sig = job_env._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)
        engine = load_engine(self.engine)
        caught: list[int] = []

        def on_preempt(signum: int, _frame: Any) -> None:
            caught.append(signum)
            print(f"[{self.stage.name}] rank {rdzv.rank}: caught {signal.Signals(signum).name}; "
                  "saving a checkpoint with all ranks, then requeueing", file=sys.stderr, flush=True)
            engine.request_stop()

        signal.signal(usr_sig, on_preempt)
        print(f"[{self.stage.name}] {job_env}: rendezvous {rdzv.master_addr}:{rdzv.master_port}", flush=True)
        try:
            with RunLock(self.stage.run_dir) if rdzv.rank == 0 else nullcontext():  # rank 0 outlives no peer long
                result = run_rank(self.stage, rdzv, self.engine)
        except RunDirBusy as busy:
            print(f"[{self.stage.name}] {busy}", file=sys.stderr, flush=True)
            cancel_dependants(job_env.job_id)
            sys.exit(EXIT_BUSY)
        except Exception as error:
            code = end_with_error(self.stage, rdzv.rank, error)
            if rdzv.rank == 0:
                cancelled = cancel_dependants(job_env.job_id)
                if cancelled:
                    print(f"[{self.stage.name}] cancelled the dependent job(s) {', '.join(cancelled)}",
                          file=sys.stderr, flush=True)
            if code == EXIT_FAILED:
                raise  # submitit logs the traceback and records it; the non-zero exit ends the step (--kill-on-bad-exit)
            sys.exit(code)
        if result["status"] == "completed":
            if rdzv.rank == 0:
                write_summary(self.plan)
            return result
        # Preempted: the checkpoint is saved on every rank.
        if caught and rdzv.rank == 0 and callable(submitit_handler):
            submitit_handler(usr_sig, None)  # submitit: checkpoint() -> dump -> scontrol requeue -> exit
        # SIGTERM (scontrol requeue / preemption): SLURM requeues the job itself. Exit without a result either way.
        print(f"[{self.stage.name}] rank {rdzv.rank}: checkpoint saved; exiting for the requeue", file=sys.stderr,
              flush=True)
        sys.exit(0)


# ---------------------------------------------------------------------------------------------------- SLURM queries


def _squeue(args: list[str]) -> str:
    return subprocess.run(["squeue", "-h", *args], check=True, capture_output=True, text=True, timeout=60).stdout


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, reason)} for the jobs squeue still knows (finished ones for MinJobAge)."""
    if not job_ids:
        return {}
    try:
        out = _squeue(["-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r"])
    except subprocess.CalledProcessError:
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    return states


def dependants_of(job_id: str) -> list[str]:
    """Pending jobs depending (directly or through others) on job_id, from squeue's dependency column."""
    out = _squeue(["-t", "PD", "-o", "%i|%E"])
    deps: dict[str, set[str]] = {}
    for line in out.splitlines():
        jid, _, dep = line.strip().partition("|")
        deps[jid] = set(re.findall(r"[:,?](\d+)", dep))
    found: list[str] = []
    frontier = [str(job_id)]
    while frontier:
        current = frontier.pop()
        for jid, on in deps.items():
            if current in on and jid not in found:
                found.append(jid)
                frontier.append(jid)
    return found


def cancel_dependants(job_id: str) -> list[str]:
    try:
        ids = dependants_of(job_id)
        if ids:
            subprocess.run(["scancel", *ids], check=False, timeout=60)
        return ids
    except (OSError, subprocess.SubprocessError):
        return []


# ----------------------------------------------------------------------------------------------- submit, dry-run, wait


def _folder(plan: Plan, options: SlurmOptions) -> str:
    folder = options.folder or str(Path(plan.run_dir) / "submitit" / time.strftime("%Y%m%d-%H%M%S") / "%j")
    check_path("submitit folder", folder)
    return folder


def sbatch_script(plan: Plan, stage: StagePlan, options: SlurmOptions, dependency: str | None) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    folder = _folder(plan, options)
    params = dict(options.for_stage(stage), dependency=dependency)
    # The command submitit's SlurmExecutor writes, spelled here: its constructor demands `srun`, which a laptop or a
    # login node showing the dry run may not have (tests/test_config_checks.py compares the two).
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}"
    return _make_sbatch_string(command=command, folder=folder, **{k: v for k, v in params.items() if v is not None})


@dataclass
class Submitted:
    stage: StagePlan
    job: Any  # submitit.Job
    reported: str = ""
    metrics_offset: int = 0
    done: bool = False
    extra: dict = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)  # failure records older than this are another attempt's

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def submit(plan: Plan, options: SlurmOptions, engine: str = DEFAULT_ENGINE, log=print) -> list[Submitted]:
    """Queue every unfinished stage now, each depending (afterok) on the one before."""
    import submitit

    executor = submitit.SlurmExecutor(folder=_folder(plan, options))
    submitted: list[Submitted] = []
    prev_id: str | None = None
    for stage in plan.stages:
        if read_result(stage) is not None:
            log(f"[{stage.name}] already completed ({stage.result_path()}); not submitting")
            continue
        executor.update_parameters(**options.for_stage(stage),
                                   dependency=f"afterok:{prev_id}" if prev_id else None)
        job = executor.submit(StageTask(plan, stage.index, engine))
        prev_id = str(job.job_id)
        submitted.append(Submitted(stage, job))
        log(f"[{stage.name}] submitted job {job.job_id}" + (f" (afterok:{submitted[-2].job_id})" if len(submitted) > 1 else ""))
    return submitted


def _stream_metrics(item: Submitted, log: Callable[[str], None]) -> None:
    path = Path(item.stage.run_dir) / "metrics.jsonl"
    try:
        with open(path) as f:
            f.seek(item.metrics_offset)
            chunk = f.read()
    except FileNotFoundError:
        return
    complete = chunk[: chunk.rfind("\n") + 1]
    item.metrics_offset += len(complete.encode())
    for line in complete.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "event" in rec:
            log(f"[{item.stage.name}] {rec['event']} at step {rec.get('step')}")
        else:
            fields = " ".join(f"{k}={rec[k]:.4g}" if isinstance(rec[k], float) else f"{k}={rec[k]}"
                              for k in ("step", "loss", "lr_peak", "samples_per_s") if k in rec)
            log(f"[{item.stage.name}] {fields}")


def _state_after_queue(item: Submitted) -> str:
    """How a job that squeue no longer lists ended, from what its stage left: result.json, or the ranks' failure
    records. (Not from submitit's result pickle: unpickling a file of the run directory here could run its code.)"""
    if read_result(item.stage) is not None:
        return "COMPLETED"
    if failures.read_records(item.stage.run_dir, item.submitted_at):
        return "FAILED"
    return "UNKNOWN"


def _failure_text(item: Submitted) -> str:
    """The ranks' failure records of this job (the culprit's traceback last), else the last error line of its log."""
    text = failures.report(item.stage.name, item.stage.run_dir, item.submitted_at, {})
    if text:
        return text
    try:
        lines = [ln for ln in item.job.stderr().splitlines() if ln.strip()] if item.job.stderr() else []
    except Exception:  # noqa: BLE001 - the log may be missing; the state is reported anyway
        lines = []
    errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]
    return (errors or lines or ["(no stderr)"])[-1].strip()


def wait(plan: Plan, submitted: list[Submitted], log=print, poll_s: float = 2.0, timeout_s: float | None = None) -> int:
    """Stream states and metrics until every job finished; on a failure, cancel the dependants and say so."""
    t0 = time.monotonic()
    while True:
        states = job_states([s.job_id for s in submitted])
        for item in submitted:
            if item.done:
                continue
            state, reason = states.get(item.job_id, ("", ""))
            if not state:  # gone from squeue (older than MinJobAge)
                state = _state_after_queue(item)
            shown = f"{state} ({reason})" if reason and reason != "None" else state
            if shown != item.reported:
                log(f"[{item.stage.name}] job {item.job_id}: {shown}")
                item.reported = shown
            _stream_metrics(item, log)
            if state in FINISHED_OK:
                item.done = True
                log(f"[{item.stage.name}] completed: {read_result(item.stage)}")
            elif state in FINISHED_BAD:
                earlier = [s for s in submitted if s.stage.index < item.stage.index and not s.done]
                if state == "CANCELLED" and earlier:
                    continue  # cancelled because an earlier stage failed (its job did it): report that one
                item.done = True
                later = [s for s in submitted if s.stage.index > item.stage.index and not s.done]
                why = _failure_text(item) if state != "CANCELLED" else "cancelled"
                cancelled = set(cancel_dependants(item.job_id))
                for other in later:
                    if other.job_id not in cancelled:
                        subprocess.run(["scancel", other.job_id], check=False, timeout=60)
                    other.done = True
                    other.extra["cancelled_because"] = item.stage.name
                names = ", ".join(f"{o.stage.name} (job {o.job_id})" for o in later) or "none"
                log(f"ERROR: stage {item.stage.name!r} (job {item.job_id}) {state.lower()}; cancelled the stages that "
                    f"depend on it: {names}. Logs: {item.job.paths.stderr}")
                log(f"[{item.stage.name}] job {item.job_id} {state}: {why}")
                write_summary(plan)
                return 1
        if all(s.done for s in submitted):
            summary = write_summary(plan)
            log(f"all stages completed; summary in {Path(plan.run_dir) / 'summary.json'}: "
                + json.dumps({k: v for k, v in summary.items() if k not in ("schedule", "run_dir", "stages", "headlines", "complete")}))
            return 0
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            log(f"ERROR: gave up waiting after {timeout_s:.0f} s; jobs {[s.job_id for s in submitted]} left queued")
            return 2
        time.sleep(poll_s)


class SlurmLauncher(Launcher):
    name = "slurm"
    description = "one submitit job per stage, chained with afterok (options override a stage's `slurm:` block)"

    def __init__(self, args, log):
        super().__init__(args, log)
        self.options = SlurmOptions(
            nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min, partition=args.partition,
            account=args.account, qos=args.qos, constraint=args.constraint, signal_delay_s=args.signal_delay_s,
            folder=args.submitit_dir)
        self.no_wait, self.wait_timeout = args.no_wait, args.wait_timeout

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--nodes", type=int)
        group.add_argument("--tasks-per-node", type=int, help="ranks per node: one per GPU (or per CPU rank)")
        group.add_argument("--gpus-per-node", type=int)
        group.add_argument("--cpus-per-task", type=int)
        group.add_argument("--mem-gb", type=float)
        group.add_argument("--time", type=int, dest="time_min", metavar="MIN", help="time limit per job, minutes")
        group.add_argument("--partition")
        group.add_argument("--account")
        group.add_argument("--qos")
        group.add_argument("--constraint")
        group.add_argument("--signal-delay-s", type=int,
                           help="seconds before the time limit at which ranks save and the job requeues (default 90)")
        group.add_argument("--submitit-dir", help="submitit's folder (default RUN_DIR/submitit/<timestamp>/%%j)")
        group.add_argument("--no-wait", action="store_true", help="print the job ids and return once queued")
        group.add_argument("--wait-timeout", type=float, help="give up waiting after this many seconds")

    def ranks(self, stage):
        params = self.options.for_stage(stage)
        return params["nodes"] * params["ntasks_per_node"]

    def check(self, plan):
        _folder(plan, self.options)
        for stage in plan.stages:
            try:
                self.options.for_stage(stage)
            except ValueError as error:
                raise ValueError(f"stage {stage.name!r}: {error}") from None

    def dry_run(self, plan):
        scripts, prev = [], None
        for stage in plan.stages:
            dependency = f"afterok:<job id of {prev}>" if prev else None
            scripts.append(f"# ---- sbatch script for stage {stage.name}\n"
                           + sbatch_script(plan, stage, self.options, dependency).rstrip())
            prev = stage.name
        return "\n".join(scripts)

    def run(self, plan):
        submitted = submit(plan, self.options, self.engine, log=self.log)
        if not submitted:
            self.log("nothing to submit: every stage has completed")
            return 0
        if self.no_wait:
            print(" ".join(s.job_id for s in submitted), flush=True)
            return 0
        try:
            return wait(plan, submitted, log=self.log, timeout_s=self.wait_timeout)
        except KeyboardInterrupt:
            self.log(f"stopped waiting; the jobs stay queued: {' '.join(s.job_id for s in submitted)} "
                     "(scancel them to stop)")
            return 130
