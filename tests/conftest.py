import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.rendezvous import free_port

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"
CONFIG = str(REPO / "configs/demo/pretrain.yaml")
# The demo's pretraining stage, shortened: what the engine tests run on 2 CPU ranks. No data workers: each rank would
# start a forkserver for them (~12 s on 2 cores); the tests about workers ask for them with WORKERS.
FAST = ["data.workers=0", "batch_size=16", "logging.every=1", "logging.progress_bar=false", "optim.warmup_steps=2",
        "data.demo_root=" + str(REPO / "data/demo")]
WORKERS = "data.workers=1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_check_smoke: tools/gpu_check.py's CPU smoke run (~2 min; CI runs it, "
                                       "`pytest -m 'not gpu_check_smoke'` leaves it out while working)")


@pytest.fixture
def torchrun():
    """Run a script under torchrun with N CPU ranks; returns the CompletedProcess (fails the test on non-zero exit)."""

    def run(script, *args, nproc=2, timeout=600, check=True, env=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(SCRIPTS / script), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        if check and proc.returncode != 0:
            pytest.fail(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return proc

    return run


def stage_command(run_dir, *overrides, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
            str(SCRIPTS / "run_stage.py"), CONFIG, f"run_dir={run_dir}", *FAST, *overrides]


def run(run_dir, *overrides, nproc=2, env=None):
    """One stage under torchrun, which must complete; returns rank 0's result."""
    proc = subprocess.run(stage_command(run_dir, *overrides, nproc=nproc), capture_output=True, text=True,
                          timeout=900, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}  # later lines (after resume) win


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run, checkpointing every 4 steps: the losses every fault test must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(run_dir, "max_steps=12", "checkpoint.every=4")
    return run_dir, result


@pytest.fixture(scope="session")
def reference_weights(reference_run, tmp_path_factory) -> dict:
    """Every parameter of the reference run's last checkpoint as DeepSpeed's universal conversion writes it (one fp32
    file each): ds_to_universal merges the ranks' shards its own way, a reading independent of zero_to_fp32, which
    consolidate uses. Converted in a copy: the reference run's checkpoints are shared with other tests."""
    import shutil

    import torch

    from pretrain.engine.checkpoint import convert_to_universal
    from pretrain.engine.safe_loading import load_file

    work = tmp_path_factory.mktemp("universal")
    shutil.copytree(reference_run[0] / "checkpoints", work / "checkpoints")
    tag = (work / "checkpoints/latest").read_text().strip()
    convert_to_universal(work / "checkpoints", tag, world_size=1)
    zero = work / "checkpoints" / f"{tag}_universal" / "zero"
    # the files hold flat tensors; their shapes are in DeepSpeed's model states
    groups = load_file(work / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
    shapes = {name: shape for group in groups for name, shape in group.items()}
    return {name: torch.load(zero / name / "fp32.pt", weights_only=True).view(shape) for name, shape in shapes.items()}
