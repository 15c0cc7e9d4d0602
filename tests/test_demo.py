"""The demo schedule, shortened, through the same entry point as `make demo`: local launcher, 2 ranks, real engine."""
import json
import subprocess
import sys

from conftest import REPO


def test_shortened_demo_schedule(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "launch", "run", "configs/schedules/demo.yaml", "--launcher", "local", "--nproc", "2",
           f"run_dir={run_dir}", "max_steps=8", "checkpoint.every=4", "logging.every=4", "logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"]
    assert 0 <= summary["zero_shot_top1"] <= 1 and 0 <= summary["finetune_top1"] <= 1
    export = run_dir / "pretrain/export/backbone.safetensors"
    assert export.is_file() and (run_dir / "pretrain/export/backbone.pth").is_file()
    events = [json.loads(l) for l in (run_dir / "finetune/metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "pretrained" and events[0]["path"] == str(export.resolve())
    assert [e["step"] for e in events if "loss" in e] == [4, 8]
