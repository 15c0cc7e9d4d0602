"""Checkpoint files are data, never code: a crafted pickle in any file the project reads (per-rank state, DeepSpeed's
model and optimizer shards, pretrained weights) is refused with a message naming it, and its payload never runs, on
resume, consolidation, the universal conversion and fine-tuning from a backbone."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TESTS
from pretrain.engine.checkpoint import MANIFEST, inspect_tag
from pretrain.engine.safe_loading import UnsafeCheckpointError
from pretrain.engine.weights import read_state_dict

CRAFTED = ("rank00001_state.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class Payload:
    """Unpickling this runs a shell command: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path: Path, marker: Path):
    torch.save({"module": {"weight": torch.zeros(2)}, "payload": Payload(marker)}, path)


def crafted_checkpoint(reference_dir: Path, tmp_path: Path, marker: Path) -> Path:
    """The reference's checkpoints with CRAFTED replaced in the newest tag, its manifest updated to match (an attacker
    who can write the files can write the manifest)."""
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(reference_dir / "checkpoints", checkpoints)
    tag = checkpoints / (checkpoints / "latest").read_text().strip()
    manifest = json.loads((tag / MANIFEST).read_text())
    for name in CRAFTED:
        craft(tag / name, marker)
        manifest["files"][name] = (tag / name).stat().st_size
    (tag / MANIFEST).write_text(json.dumps(manifest))
    assert inspect_tag(tag) is None
    return checkpoints


def resume(run_dir: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}
    return subprocess.run([sys.executable, "-m", "launch", "run", str(REPO / "configs/demo/pretrain.yaml"),
                           "--launcher", "local", "--nproc", str(nproc), "--engine", "fault_engine",
                           f"run_dir={run_dir}", "max_steps=14", "batch_size=16", "logging.progress_bar=false",
                           "data.demo_root=" + str(REPO / "data/demo")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_resume_refuses_a_crafted_checkpoint(reference_run, tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoints = crafted_checkpoint(reference_run[0], tmp_path, marker)
    proc = resume(checkpoints.parent, nproc=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-6000:]
    assert "UnsafeCheckpointError: refused to load" in out
    assert all(name in out for name in CRAFTED) and "posix.system" in out
    assert not marker.exists()


def test_universal_conversion_refuses_a_crafted_checkpoint(reference_run, tmp_path):
    """The conversion a resume on another number of ranks runs first (saved on 2, resumed on 1), called as rank 0 does
    before its process group exists."""
    from pretrain.engine.checkpoint import convert_for_resume

    marker = tmp_path / "payload-ran"
    checkpoints = crafted_checkpoint(reference_run[0], tmp_path, marker)
    with pytest.raises(RuntimeError) as refused:
        convert_for_resume(checkpoints, rank=0, world_size=1)
    message = str(refused.value)
    assert message.startswith(f"the universal conversion of {checkpoints}/step00000012 (saved on 2 ranks, resumed on "
                              "1) failed: UnsafeCheckpointError: refused to load"), message
    assert not marker.exists() and not list(checkpoints.glob("*_universal")) and not list(checkpoints.glob(".staging*"))


def test_consolidate_refuses_a_crafted_checkpoint(reference_run, tmp_path):
    marker = tmp_path / "payload-ran"
    checkpoints = crafted_checkpoint(reference_run[0], tmp_path, marker)
    proc = subprocess.run([sys.executable, "-m", "launch", "consolidate", str(checkpoints), "--out",
                           str(tmp_path / "export")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("pretrain consolidate: refused to load") and len(proc.stderr.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "export" / "backbone.safetensors").exists()


@pytest.mark.parametrize("name", ["backbone.pth", "rank00000_state.pt"])
def test_single_files_are_refused(tmp_path, name):
    from pretrain.engine.safe_loading import load_file

    marker = tmp_path / "payload-ran"
    craft(tmp_path / name, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load {tmp_path / name}.*posix.system"):
        read_state_dict(tmp_path / name) if name.endswith(".pth") else load_file(tmp_path / name)
    assert not marker.exists()
