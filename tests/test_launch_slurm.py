"""SLURM launcher on a real cluster (tools/slurm_localhost.sh up): a schedule across 2 nodes that survives
`scontrol requeue`, submitit's preemption signal (coordinated save, then requeue), and a failing stage that cancels its
dependants. Skipped when no cluster answers `sinfo`. Stage settings are shortened through overrides."""
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_launch_units import run_cli, write_schedule

TESTS = str(Path(__file__).resolve().parent)


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


pytestmark = pytest.mark.skipif(not _cluster_up(), reason="no SLURM cluster reachable (`sinfo` fails); "
                                                          "start one with `tools/slurm_localhost.sh up`")


@pytest.fixture
def fake_engine_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def slurm_args(tmp_path, *extra):
    return ["--launcher", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
            "--submitit-dir", str(tmp_path / "submitit" / "%j"), "--wait-timeout", "480", *extra]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def running_job(name: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-t", "R", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()[0] if out.split() else None


def in_thread(fn, *args):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("code", fn(*args)), daemon=True)
    thread.start()
    return thread, box


def test_demo_schedule_two_nodes_survives_scontrol_requeue(tmp_path, capsys):
    """The done-condition, with the real engine: configs/schedules/demo.yaml on 2 nodes x 1 rank, `scontrol requeue`
    mid-pretrain -> coordinated save -> resume; the fine-tune stage starts from the pretrain stage's export."""
    run = tmp_path / "run"
    thread, box = in_thread(run_cli, ["configs/schedules/demo.yaml", *slurm_args(tmp_path), f"run_dir={run}",
                                      "max_steps=16", "checkpoint.every=8", "logging.every=2"])
    pre, fine = run / "pretrain", run / "finetune"
    wait_for(lambda: any(m.get("step", 0) >= 4 and "loss" in m for m in metrics(pre)), timeout=150,
             what="pretrain step 4")
    job = running_job("pretrain:pretrain")
    subprocess.run(["scontrol", "requeue", job], check=True)
    thread.join(540)
    out = capsys.readouterr().out
    assert box.get("code") == 0, out
    resumes = [m for m in metrics(pre) if m.get("event") == "resume"]
    assert len(resumes) == 1 and 4 <= resumes[0]["step"] < 16, metrics(pre)  # saved at the stop, not at step 8
    assert "resume at step" in out and "[pretrain] step=" in out  # progress was streamed
    summary = json.loads((run / "summary.json").read_text())
    # The headline figures are the stages' own evaluations, each stage's under its name.
    assert summary["complete"] and summary["zero_shot_top1"] == json.loads((pre / "result.json").read_text())[
        "zero_shot_top1"] and summary["finetune_top1"] == json.loads((fine / "result.json").read_text())["top1"]
    backbone = pre / "export" / "backbone.safetensors"
    assert summary["stages"]["finetune"]["pretrained"] == str(backbone)
    assert yaml.safe_load((fine / "config.yaml").read_text())["model"]["pretrained"] == str(backbone)
    # the export was made from the finished pretrain stage, before the fine-tune stage trained
    assert backbone.stat().st_mtime <= (fine / "metrics.jsonl").stat().st_mtime
    assert backbone.stat().st_mtime >= (pre / "result.json").stat().st_mtime


def test_submitit_preemption_signal_saves_on_every_rank_and_requeues(tmp_path, fake_engine_env, capsys):
    (tmp_path / "pretrain.yaml").write_text("max_steps: 12\nstep_time: 0.5\ncheckpoint.every: 100\n")
    code = run_cli([str(tmp_path / "pretrain.yaml"), *slurm_args(tmp_path), "--no-wait",
                    "--engine", "test_launch_fake_engine", f"run_dir={tmp_path}/run"])
    assert code == 0
    job = capsys.readouterr().out.strip().splitlines()[-1]
    run = tmp_path / "run"
    wait_for(lambda: any(m.get("step", 0) >= 3 for m in metrics(run)), what="step 3")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends signal_delay_s before the limit
    wait_for(lambda: (run / "result.json").exists(), timeout=150, what="the requeued job to finish")
    resume = [m for m in metrics(run) if m.get("event") == "resume"]
    assert len(resume) == 1 and 3 <= resume[0]["step"] < 12
    saved = {json.loads((run / "checkpoints" / f"rank{r}.json").read_text())["step"] for r in (0, 1)}
    assert saved == {12}
    log = "".join(p.read_text() for p in (tmp_path / "submitit").glob(f"{job}/*_0_log.*"))
    assert "saving a checkpoint with all ranks" in log and f"Requeued job {job}" in log


def test_failing_stage_cancels_dependants(tmp_path, fake_engine_env, capsys):
    schedule = write_schedule(tmp_path, pretrain_extra={"fail_at_step": 2})
    code = run_cli([str(schedule), *slurm_args(tmp_path), "--engine", "test_launch_fake_engine", "step_time=0.1"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "ERROR: stage 'pretrain'" in out, out
    assert "failed; cancelled the stages that depend on it: finetune (job" in out
    assert "RuntimeError: fake engine: failing at step 2" in out
    fine_id = out.split("finetune (job ")[1].split(")")[0]
    state = subprocess.run(["squeue", "-h", "-t", "all", "-j", fine_id, "-o", "%T"], capture_output=True,
                           text=True).stdout.strip()
    assert state == "CANCELLED"
    assert not (tmp_path / "run" / "finetune").exists()


def job_processes(job_id: str) -> list[str]:
    """Processes on this machine that belong to SLURM job `job_id` (by the SLURM_JOB_ID in their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job_id}".encode() in environ:
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except (OSError, ValueError):
            pass
    return found


def test_failing_rank_ends_a_two_node_job_with_its_traceback(tmp_path, fake_engine_env, monkeypatch, capsys):
    """The real engine on 2 nodes, rank 1 raising at step 3 while rank 0 waits in a collective: the job fails at once
    (--kill-on-bad-exit), the launcher prints rank 1's traceback last, and nothing of the job is left running."""
    monkeypatch.setenv("PRETRAIN_FAULT", "raise:3:1")
    run = tmp_path / "run"
    code = run_cli(["configs/demo/pretrain.yaml", *slurm_args(tmp_path), "--engine", "fault_engine", f"run_dir={run}",
                    "max_steps=12", "checkpoint.every=2", "batch_size=16", "logging.every=1",
                    "logging.progress_bar=false"])
    ended = time.time()
    out = capsys.readouterr().out
    assert code == 1, out
    fired = json.loads((run / "fault.json").read_text())
    print(f"\nFAULT raise:3:1 on SLURM: {ended - fired['time']:.1f} s from the fault to the launcher's exit")
    job = out.split("[pretrain] submitted job ")[1].split()[0]
    assert "ERROR: stage 'pretrain'" in out and out.count("Traceback") == 1
    tail = out[out.index("Traceback"):]
    assert "RuntimeError: injected fault: rank 1 raises at step 3" in tail and "rank 0" not in tail
    assert (run / "checkpoints" / "latest").read_text() == "step00000002"
    wait_for(lambda: not job_processes(job), timeout=30, what="the job's processes to end")
