"""The universal conversion (a resume on another number of ranks) resumes after a kill: the next attempt skips what
the killed one finished, without writing its files again, redoes the unit the kill cut off, and ends with the same
universal checkpoint, tensor by tensor, as DeepSpeed's own ds_to_universal converting without interruption. What
another checkpoint's conversion left is discarded."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPTS
from pretrain.engine.checkpoint import MANIFEST, convert_to_universal

TAG = "step00000012"


@pytest.fixture
def checkpoints(reference_run, tmp_path) -> Path:
    """The reference run's last checkpoint (saved on 2 ranks, ZeRO-3), in a folder of this test's."""
    shutil.copytree(reference_run[0] / "checkpoints" / TAG, tmp_path / "checkpoints" / TAG)
    return tmp_path / "checkpoints"


def convert_killed_at(point: str, checkpoints: Path, monkeypatch):
    """convert_to_universal as a resume calls it, its converting process SIGKILLed at `point` (killed_conversion.py):
    the interpreter it starts is a wrapper that runs that script instead of the module."""
    wrapper = checkpoints.parent / f"python-killed-at-{point}"
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {SCRIPTS / "killed_conversion.py"} {point} "$@"\n')
    wrapper.chmod(0o755)
    with monkeypatch.context() as patched:
        patched.setattr(sys, "executable", str(wrapper))
        with pytest.raises(RuntimeError, match="failed: killed by SIGKILL; the next attempt resumes it from"):
            convert_to_universal(checkpoints, TAG, world_size=1)


def marked(staging: Path) -> set[str]:
    return {p.name for p in (staging / "progress").iterdir()}


def written(folder: Path, pattern: str) -> dict:
    """Each file's inode and modification time: what a second write of it would change."""
    return {p.relative_to(folder): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob(pattern)}


def same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if hasattr(a, "__dict__"):  # DeepSpeed's loss scaler: no __eq__ of its own
        return type(a) is type(b) and same(vars(a), vars(b))
    return a == b


def files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_a_killed_conversion_resumes_where_it_stopped(checkpoints, tmp_path, monkeypatch):
    staging = checkpoints / f".staging-{TAG}_universal"
    convert_killed_at("extract", checkpoints, monkeypatch)
    assert marked(staging) == {"source.json", "extract.0"}
    rank0 = written(staging / "tmp", "*/0/*.00")
    assert rank0 and written(staging / "tmp", "*/0/*.01")  # rank 1's shard was cut off part-way

    convert_killed_at("merge", checkpoints, monkeypatch)
    assert written(staging / "tmp", "*/0/*.00") == rank0  # rank 0's shard was not extracted again
    merges = sorted(name for name in marked(staging) if name.startswith("merge."))
    assert marked(staging) == {"source.json", "extract.0", "extract.1", *merges} and len(merges) == 1
    first = merges[0].removeprefix("merge.")
    merged = written(staging / "zero" / first, "*.pt")
    assert len(merged) == 3  # fp32, exp_avg, exp_avg_sq

    convert_to_universal(checkpoints, TAG, world_size=1)
    universal = checkpoints / f"{TAG}_universal"
    assert not staging.exists() and not (universal / "tmp").exists()
    assert written(universal / "zero" / first, "*.pt") == merged  # not merged again
    assert {"optimizer_state", "model_states"} <= marked(universal)

    expected = tmp_path / "deepspeed" / f"{TAG}_universal"
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                    str(checkpoints / TAG), "--output_folder", str(expected)],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    ours = [f for f in files(universal) if f.parts[0] != "progress" and f != Path(MANIFEST)]
    assert ours == files(expected) and len(ours) > 3
    differ = [f for f in ours if not same(torch.load(universal / f, weights_only=False),
                                           torch.load(expected / f, weights_only=False))]
    assert not differ


def test_a_conversion_discards_what_another_checkpoint_left(checkpoints, monkeypatch):
    staging = checkpoints / f".staging-{TAG}_universal"
    convert_killed_at("merge", checkpoints, monkeypatch)
    assert "extract.1" in marked(staging)
    # The same step saved anew (a rank's shard rewritten), and an earlier checkpoint's conversion killed part-way.
    os.utime(checkpoints / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    other = checkpoints / ".staging-step00000008_universal"
    (other / "zero").mkdir(parents=True)
    convert_killed_at("extract", checkpoints, monkeypatch)
    assert not other.exists()
    assert marked(staging) == {"source.json", "extract.0"}  # nothing of the first attempt was kept
