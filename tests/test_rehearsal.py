"""`pretrain rehearse` on data the test writes in the production formats (tests/production_data.py), from a copy of
configs/ whose only change is the data paths, run from another working directory. Here the checks made before any
stage runs: a planted culprit in each of three stages' data fails the rehearsal naming it, and nothing is run."""
import json
import os

from production_data import classification_shards, img2dataset_source, production_configs, write_production_data
from launch import cli
from pretrain.config import load_stage_config

import pytest


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
    assert record["warnings"] == ["stage pretrain: data.samples_per_epoch is 427,000,000 but the shards' "
                                  "sizes.json/*_stats.json count 36 samples"]


def test_the_production_image_text_stages_zero_shot_val_set_passes_the_checks(tmp_path):
    """The H pretraining stage scores zero-shot on ImageNet-1K val, whose samples have a label and no caption."""
    from launch.rehearsal import check_stages, rehearsal_plan

    write_production_data(tmp_path / "data")
    configs = production_configs(tmp_path, tmp_path / "data")
    plan = rehearsal_plan(str(configs / "schedules/internimage_h.yaml"), [], nproc=2, steps=4)
    assert "imagenet1k-wds/val" in load_stage_config(plan.stages[0].config, plan.stages[0].overrides).data.val
    problems, _ = check_stages(plan, nproc=2)
    assert problems == []
