"""`pretrain rehearse` on data the test writes in the production formats (tests/production_data.py), from a copy of
configs/ whose only change is the data paths, run from another working directory. Here the checks made before any
stage runs: a planted culprit in each of three stages' data fails the rehearsal naming it, and nothing is run."""
import json
import os

from production_data import classification_shards, img2dataset_source, production_configs, write_production_data
from launch import cli
from pretrain.config import load_stage_config

import pytest
import yaml


def rehearse(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["rehearse", *argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_a_label_out_of_range_a_source_without_captions_and_an_unlabelled_val_set_fail_the_rehearsal_naming_each(
        tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    write_production_data(data)
    img2dataset_source(data / "yfcc15m", shards=3, per_shard=6, captions=False, name_digits=4)  # no caption column
    classification_shards(data / "imagenet22k-wds", "train", 2, 8, lambda n: 21841 if n == 9 else n, 5)
    configs = production_configs(tmp_path, data)
    monkeypatch.chdir(tmp_path / "data")  # not the repository: stage configs resolve against the schedule file
    code, out, err = rehearse(capsys, str(configs / "schedules/internimage_h.yaml"),
                              f"pretrain:data.val={data}/laion400m/00000.tar")
    run_dir = tmp_path / "data/runs/internimage_h-rehearsal"  # the schedule's run_dir, -rehearsal appended
    record = json.loads((run_dir / "rehearsal.json").read_text())
    assert code == 1 and not record["passed"] and record["stages"] == {}
    assert sorted(os.listdir(run_dir)) == ["rehearsal.json"]  # no stage ran
    assert record["problems"] == [
        f"stage pretrain: source {data}/yfcc15m/{{0000..0001}}.tar: no usable image-text sample in 2 shards read "
        "(missing_caption 12)",
        f"stage pretrain: val {data}/laion400m/00000.tar: no labelled sample to evaluate on (6 usable without a "
        "label; nothing read)",
        f"stage in22k: source {data}/imagenet22k-wds/train-{{00000..00001}}.tar: label 21841 is outside num_classes "
        f"21841: shard {data}/imagenet22k-wds/train-00001.tar, key train0001_0001",
    ]
    assert err.splitlines()[-3:] == [f"rehearsal: {line}" for line in record["problems"]]
    assert "rehearsal of" in out and "FAILED" in out and "in1k         not run" in out
    assert record["warnings"] == [
        "stage pretrain: data.samples_per_epoch is 427,000,000 but the shards' sizes.json/*_stats.json count 36 samples",
        "stage in22k: data.samples_per_epoch is 14,197,122 but the shards' sizes.json/*_stats.json count 16 samples",
        "stage in1k: data.samples_per_epoch is 1,281,167 but the shards' sizes.json/*_stats.json count 16 samples"]


def test_the_production_image_text_stages_zero_shot_val_set_passes_the_checks(tmp_path):
    """The H pretraining stage scores zero-shot on ImageNet-1K val, whose samples have a label and no caption."""
    from launch.rehearsal import check_stages, rehearsal_plan

    write_production_data(tmp_path / "data")
    configs = production_configs(tmp_path, tmp_path / "data")
    plan = rehearsal_plan(str(configs / "schedules/internimage_h.yaml"), [], nproc=2, steps=4)
    assert "imagenet1k-wds/val" in load_stage_config(plan.stages[0].config, plan.stages[0].overrides).data.val
    problems, _ = check_stages(plan, nproc=2)
    assert problems == []


def test_true_epochs_over_shards_without_sizes_fail_the_checks_before_any_stage_runs(tmp_path):
    """The IN-22K stage reads true epochs (data.resampled: false), which need every shard's size: found missing by the
    check, not by the stage's ranks after the pretraining stage has run."""
    from launch.rehearsal import check_stages, rehearsal_plan

    write_production_data(tmp_path / "data")
    (tmp_path / "data/imagenet22k-wds/sizes.json").unlink()
    configs = production_configs(tmp_path, tmp_path / "data")
    problems, _ = check_stages(rehearsal_plan(str(configs / "schedules/internimage_h.yaml"), [], nproc=1, steps=2), 1)
    assert problems == [f"stage in22k ({configs}/internimage_h/in22k_384.yaml): data.resampled: false needs every "
                        "shard's size (sizes.json or *_stats.json beside it); 2 have none, e.g. "
                        f"{tmp_path}/data/imagenet22k-wds/train-00000.tar"]


def test_pretrain_run_of_true_epochs_over_shards_without_sizes_says_so_in_one_line_and_starts_no_rank(tmp_path, capsys):
    from test_launch_units import run_cli

    write_production_data(tmp_path / "data")
    (tmp_path / "data/imagenet22k-wds/sizes.json").unlink()
    configs = production_configs(tmp_path, tmp_path / "data")
    code = run_cli([str(configs / "internimage_h/in22k_384.yaml"), "--launcher", "local", "--nproc", "2",
                    f"run_dir={tmp_path}/run", "model.pretrained=null"])
    out, err = capsys.readouterr()
    assert code == 2 and not out and err.count("\n") == 1, err
    assert err.endswith("data.resampled: false needs every shard's size (sizes.json or *_stats.json beside it); 2 have "
                        f"none, e.g. {tmp_path}/data/imagenet22k-wds/train-00000.tar\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", ["internimage_h", "internimage_g"])
def test_the_production_schedule_rehearses_to_the_end_with_a_pause_and_resume_in_every_stage(
        schedule, tmp_path, monkeypatch, capsys):
    """Every stage of the schedule runs shrunk on its own (production-format) data: paused half-way with a save,
    resumed by the same command at that step, evaluated on its val shard, exported and handed on; the last exported
    too. One rank, two steps a stage: the launches are what it proves, not the figures."""
    data = tmp_path / "data"
    write_production_data(data)
    configs = production_configs(tmp_path, data)
    monkeypatch.chdir(data)
    code, out, err = rehearse(capsys, str(configs / f"schedules/{schedule}.yaml"), "--nproc", "1", "--steps", "2")
    run_dir = data / f"runs/{schedule}-rehearsal"
    record = json.loads((run_dir / "rehearsal.json").read_text())
    assert code == 0 and record["passed"], err[-3000:]
    assert list(record["stages"]) == ["pretrain", "in22k", "in1k"]
    assert all(stage["resumed_at"] == [1] for stage in record["stages"].values())
    pretrain = record["stages"]["pretrain"]["result"]
    assert pretrain["zero_shot_classes"] == 1000 and pretrain["eval_samples"] == 8  # ImageNet-1K names, one val shard
    for name in ("in22k", "in1k"):
        assert record["stages"][name]["result"]["eval_samples"] == 8
        assert (run_dir / name / "export" / "export.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["headlines"]) == {"pretrain", "in22k", "in1k"} and summary["complete"]
    # Each stage ran on the epoch its shards hold (the configured one was a warning of the checks)
    ran_on = {name: yaml.safe_load((run_dir / name / "config.yaml").read_text())["data"]["samples_per_epoch"]
              for name in record["stages"]}
    assert ran_on == {"pretrain": 36, "in22k": 16, "in1k": 16}
