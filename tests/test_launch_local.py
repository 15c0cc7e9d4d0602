"""Local launcher: a two-stage schedule with 2 rank processes per stage (stand-in engine), resume and failure."""
import json
import os
from pathlib import Path

from test_launch_units import run_cli, write_schedule

TESTS = str(Path(__file__).resolve().parent)


def test_local_schedule_two_ranks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    schedule = write_schedule(tmp_path)
    args = [str(schedule), "--launcher", "local", "--nproc", "2", "--engine", "test_launch_fake_engine",
            "step_time=0.01", "max_steps=4"]
    assert run_cli(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"] and summary["zero_shot_top1"] == 0.25 and summary["finetune_top1"] == 0.5
    fine = summary["stages"]["finetune"]["metrics"]
    assert fine["world_size"] == 2
    assert fine["pretrained_backbone"] == f"backbone of {run}/pretrain/checkpoints at step 4 (fp16, live)"
    # the last stage is exported too
    assert (run / "finetune/export/backbone.safetensors").read_text() == \
        f"backbone of {run}/finetune/checkpoints at step 4 (fp16, live)"
    # the same command again skips the finished stages
    assert run_cli(args) == 0
    assert "already completed" in capsys.readouterr().out


def test_local_failing_stage_stops_schedule(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    schedule = write_schedule(tmp_path, pretrain_extra={"fail_at_step": 2})
    code = run_cli([str(schedule), "--nproc", "2", "--engine", "test_launch_fake_engine", "step_time=0.01"])
    out = capsys.readouterr().out
    assert code == 1
    assert "[pretrain] FAILED" in out and "not running the stages after it: finetune" in out
    assert not (tmp_path / "run" / "finetune").exists()
