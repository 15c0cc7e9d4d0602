"""Launcher units: rendezvous from SLURM's environment, schedule resolution, summary, --dry-run (no cluster needed)."""
import argparse
import json
from pathlib import Path

import pytest
import yaml

from launch import rendezvous
from launch.schedule import build_plan, ensure_export, reported_weights, write_summary
from launch.commands import run

SLURM_ENV = {
    "SLURM_JOB_ID": "42", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7",
}


def test_rendezvous_from_slurm_env():
    r = rendezvous.from_slurm(SLURM_ENV, resolves=lambda host: True)
    assert (r.master_addr, r.rank, r.world_size, r.local_rank, r.local_world_size) == ("gpu-a07", 3, 4, 1, 2)
    assert rendezvous.PORT_RANGE[0] <= r.master_port < rendezvous.PORT_RANGE[1]
    # every rank of the job (and a requeue of it) agrees on the port; another job gets another one
    again = rendezvous.from_slurm(dict(SLURM_ENV, SLURM_PROCID="0", SLURM_LOCALID="0"), resolves=lambda h: True)
    assert again.master_port == r.master_port and again.rank == 0
    assert rendezvous.from_slurm(dict(SLURM_ENV, SLURM_JOB_ID="43"), resolves=lambda h: True).master_port != r.master_port
    env = r.env()
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4" and env["LOCAL_RANK"] == "1" and env["MASTER_ADDR"] == "gpu-a07"


def test_rendezvous_unresolvable_nodes_and_explicit_master():
    r = rendezvous.from_slurm(SLURM_ENV, resolves=lambda host: False)
    assert r.master_addr == "10.0.0.7"  # the batch host srun launched from
    r = rendezvous.from_slurm(dict(SLURM_ENV, MASTER_ADDR="head", MASTER_PORT="1234"), resolves=lambda h: False)
    assert (r.master_addr, r.master_port) == ("head", 1234)
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        rendezvous.from_slurm({"SLURM_JOB_ID": "1"})


def write_schedule(tmp_path: Path, pretrain_extra=None, finetune_extra=None, **stage_slurm) -> Path:
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({"max_steps": 6, **(pretrain_extra or {})}))
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump({"max_steps": 4, **(finetune_extra or {})}))
    stages = [{"name": "pretrain", "config": "pretrain.yaml", "overrides": {"seed": 1}},
              {"name": "finetune", "config": "finetune.yaml", "overrides": ["seed=2"]}]
    if stage_slurm:
        for s in stages:
            s["slurm"] = dict(stage_slurm)
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "stages": stages}))
    return path


def test_plan_chains_stages(tmp_path):
    plan = build_plan(str(write_schedule(tmp_path)), ["max_steps=3", "finetune:seed=9", f"run_dir={tmp_path}/r"])
    pre, fine = plan.stages
    assert plan.run_dir == str(tmp_path / "r")
    assert pre.config == str(tmp_path / "pretrain.yaml") and pre.pretrained_from is None
    assert pre.overrides == ["seed=1", "max_steps=3", f"run_dir={tmp_path}/r/pretrain"]
    assert fine.overrides == ["seed=2", "max_steps=3", "seed=9", f"run_dir={tmp_path}/r/finetune",
                              f"model.pretrained={tmp_path}/r/pretrain/export/backbone.safetensors"]
    with pytest.raises(ValueError, match="unknown stage"):
        build_plan(str(write_schedule(tmp_path)), ["nope:seed=1"])
    single = build_plan(str(tmp_path / "pretrain.yaml"), ["seed=3", f"run_dir={tmp_path}/one"])
    assert not single.is_schedule and single.stages[0].overrides == ["seed=3", f"run_dir={tmp_path}/one"]


def test_export_and_summary(tmp_path):
    import test_launch_fake_engine as fake

    plan = build_plan(str(write_schedule(tmp_path)), [])
    pre, fine = plan.stages
    assert ensure_export(pre, fake.consolidate) is None
    with pytest.raises(FileNotFoundError, match="did 'pretrain' run"):
        ensure_export(fine, fake.consolidate)
    (Path(pre.run_dir) / "checkpoints").mkdir(parents=True)
    (Path(pre.run_dir) / "checkpoints" / "latest").write_text("6")
    export = ensure_export(fine, fake.consolidate)
    assert (export / "backbone.safetensors").read_text().endswith("at step 6 (fp16, live)")
    # A stage that evaluated its EMA hands on the EMA (the config it ran with says which).
    Path(pre.run_dir, "config.yaml").write_text("eval: {ema: true}\n")
    assert reported_weights(Path(pre.run_dir)) == "ema"
    Path(pre.run_dir, "config.yaml").write_text("eval: {ema: false}\n")
    assert reported_weights(Path(pre.run_dir)) == "live"
    Path(pre.run_dir, "result.json").write_text(json.dumps({"zero_shot_top1": 0.3,
                                                            "headline": {"zero_shot_top1": 0.3}}))
    assert write_summary(plan)["complete"] is False
    Path(fine.run_dir).mkdir(parents=True)
    Path(fine.run_dir, "result.json").write_text(json.dumps({"top1": 0.7, "top5": 0.9,
                                                             "headline": {"finetune_top1": 0.7}}))
    summary = json.loads((Path(plan.run_dir) / "summary.json").read_text()) if write_summary(plan) else None
    assert summary["complete"] and summary["zero_shot_top1"] == 0.3 and summary["finetune_top1"] == 0.7
    assert summary["headlines"] == {"pretrain": {"zero_shot_top1": 0.3}, "finetune": {"finetune_top1": 0.7}}
    assert summary["stages"]["finetune"]["pretrained"] == str(export / "backbone.safetensors")


def run_cli(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return run.main(parser.parse_args(argv))


def test_dry_run_slurm(tmp_path, capsys):
    schedule = write_schedule(tmp_path, nodes=4, tasks_per_node=8, gpus_per_node=8)
    code = run_cli([str(schedule), "--launcher", "slurm", "--dry-run", "--partition", "gpu", "--time", "120",
                    "--account", "proj", "--qos", "high", "--mem-gb", "400", "--cpus-per-task", "10",
                    "--nodes", "2", "max_steps=8", "--engine", "test_launch_fake_engine"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("#SBATCH --nodes=2") == 2  # the flag wins over the schedule's `slurm:` block
    for flag in ("--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=120", "--account=proj",
                 "--qos=high", "--mem=400GB", "--cpus-per-task=10", "--signal=USR2@90",
                 "--dependency='afterok:<job id of pretrain>'", "--job-name=pretrain:finetune"):
        assert f"#SBATCH {flag}" in out, flag
    assert "srun --unbuffered" in out and "submitit.core._submit" in out
    assert f"model.pretrained={tmp_path}/run/pretrain/export/backbone.safetensors" in out
    assert "max_steps: 8" in out  # resolved configs follow the scripts
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_dry_run_local(tmp_path, capsys):
    assert run_cli([str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert run_cli([str(write_schedule(tmp_path)), "--dry-run", "--nproc", "2", "--engine", "test_launch_fake_engine"]) == 0
    out = capsys.readouterr().out
    assert "# pretrain: 2 x " in out and "launch.worker" in out and "seed: 2" in out


def test_a_result_cut_short_counts_as_unfinished(tmp_path, capsys):
    from launch.schedule import read_result

    stage = build_plan(str(write_schedule(tmp_path)), []).stages[0]
    Path(stage.run_dir).mkdir(parents=True)
    stage.result_path().write_text('{"zero_shot_top1": 0.9')
    assert read_result(stage) is None
    assert "will run again from its last checkpoint" in capsys.readouterr().err
