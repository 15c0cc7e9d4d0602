"""The production path's checks, made before any rank starts: what a cluster user meets first (the SLURM dry run on a
machine without SLURM, estimate-memory's input), and the values that would otherwise give a wrong or late result (an
image size H/G cannot take, a glob in a shard pattern, max_steps cutting an epoch-based schedule)."""
import json
import shutil

import pytest

from conftest import REPO
from launch import cli
from pretrain.config import load_stage_config
from pretrain.data.shards import expand_shards
from pretrain.engine.config_checks import load_config
from pretrain.typed_config import ConfigError
from test_launch_units import run_cli

H = REPO / "configs/internimage_h"
H_SCHEDULE = str(REPO / "configs/schedules/internimage_h.yaml")


def test_the_slurm_dry_run_works_where_srun_is_absent(tmp_path, monkeypatch, capsys):
    args = [H_SCHEDULE, "--launcher", "slurm", "--dry-run", f"run_dir={tmp_path / 'run'}"]
    srun = shutil.which("srun")
    if srun:
        assert run_cli(args) == 0
        with_srun = capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    assert run_cli(args) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --nodes=") == 3 and out.count("-m submitit.core._submit ") == 3
    if srun:  # the command spelled by the dry run is the one submitit's executor writes
        import re
        stamp = re.compile(r"submitit/\d{8}-\d{6}/")
        assert stamp.sub("", out) == stamp.sub("", with_srun)


def estimate_memory(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["estimate-memory", *argv])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_estimate_memory_takes_overrides_after_its_options(capsys):
    code, out, _ = estimate_memory(capsys, str(H / "in1k_640.yaml"), "--nodes", "4", "--gpus-per-node", "8",
                                   "batch_size=8", "data.image_size=512")
    report = json.loads(out)
    assert code == 0 and (report["micro_batch"], report["image_size"], report["devices"]) == (8, 512, 32)


@pytest.mark.parametrize("argv, message", [
    (["batch_size=x"], "batch_size"),
    (["model.chanels=3"], "chanels"),
    (["--nodes", "0"], "--nodes and --gpus-per-node must be > 0"),
    (["data.image_size=600"], "data.image_size (600) must be a multiple of 32"),
])
def test_estimate_memory_refuses_bad_input_in_one_line(capsys, argv, message):
    code, out, err = estimate_memory(capsys, str(H / "in1k_640.yaml"), *argv)
    assert code == 2 and not out and len(err.splitlines()) == 1
    assert err.startswith("pretrain estimate-memory: ") and message in err


def test_an_image_size_h_and_g_cannot_take_is_refused_at_start_up():
    for model in ("internimage_h", "internimage_g"):
        with pytest.raises(ConfigError, match=rf"data.image_size \(400\) must be a multiple of 32 for {model}"):
            load_config(H / "in1k_640.yaml", [f"model.name={model}", "data.image_size=400"])
        assert load_config(H / "in1k_640.yaml", [f"model.name={model}", "data.image_size=416"])
    assert load_config(H / "in1k_640.yaml", ["model.name=internimage_t", "data.image_size=400"])


def test_a_glob_in_a_shard_pattern_says_brace_patterns_are_supported(tmp_path):
    (tmp_path / "0000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"shell globs \(\*, \?, \[...\]\) are not expanded: brace patterns"):
        expand_shards(str(tmp_path / "*.tar"))
    with pytest.raises(FileNotFoundError) as missing:
        expand_shards(str(tmp_path / "{0000..0001}.tar"))
    assert "brace patterns" not in str(missing.value)


def test_max_steps_with_epoch_settings_scales_the_schedule_warm_up_included(capsys):
    pretrain = load_stage_config(H / "pretrain_laion_yfcc_cc12m.yaml", ["max_steps=60"])
    assert (pretrain.max_steps, pretrain.optim.warmup_steps) == (60, 2)  # 1 of 30 epochs
    finetune = load_stage_config(H / "in1k_640.yaml", ["max_steps=100"])
    assert (finetune.max_steps, finetune.optim.warmup_steps) == (100, 10)  # 2 of 20 epochs
    assert load_stage_config(H / "in1k_640.yaml").optim.warmup_steps == 5004  # unchanged without max_steps
    assert run_cli([H_SCHEDULE, "--launcher", "slurm", "--dry-run", "max_steps=100"]) == 0
    out = capsys.readouterr().out
    assert ("stage in1k: 32 ranks x batch 16 x accumulation 1 = global batch 512; 100 steps (51,200 samples) = 20 "
            "epochs scaled to max_steps, warm-up with them; peak lr 2e-05 (optim.lr 2e-05 per 512), warm-up 10 "
            "steps") in out


def test_samples_per_epoch_null_reads_the_stats_files_and_a_wrong_one_is_a_warning_with_both_numbers(tmp_path,
                                                                                                      capsys):
    from pretrain.engine.config_checks import check_config
    from production_data import img2dataset_source

    img2dataset_source(tmp_path / "laion", shards=2, per_shard=3)
    img2dataset_source(tmp_path / "cc12m", shards=1, per_shard=4)
    stage = tmp_path / "stage.yaml"
    stage.write_text((H / "pretrain_laion_yfcc_cc12m.yaml").read_text().split("data:")[0] + f"""data:
  train:
    - {{shards: "{tmp_path}/laion/{{00000..00001}}.tar", weight: 2}}
    - {{shards: "{tmp_path}/cc12m/00000.tar"}}
  samples_per_epoch: null
""")
    cfg = check_config(stage, ["global_batch=2", "batch_size=1"])
    assert cfg.data.samples_per_epoch == 10 and cfg.max_steps == 30 * 5  # 10 // 2 steps per epoch
    assert "warning" not in capsys.readouterr().err
    check_config(stage, ["global_batch=2", "batch_size=1", "data.samples_per_epoch=427000000"])
    assert capsys.readouterr().err.strip() == ("warning: data.samples_per_epoch is 427,000,000 but the shards' "
                                              "sizes.json/*_stats.json count 10 samples")
    (tmp_path / "cc12m/00000_stats.json").unlink()
    with pytest.raises(ConfigError, match=r"epochs and warmup_epochs need the epoch's length: data.samples_per_epoch "
                                          rf"is null and shard {tmp_path}/cc12m/00000.tar has no size"):
        check_config(stage, ["global_batch=2", "batch_size=1"])


def test_a_label_outside_num_classes_stops_at_its_sample_naming_num_classes_shard_and_key(tmp_path):
    from pretrain.data import build_eval_loader
    from production_data import classification_shards

    classification_shards(tmp_path, "val", shards=1, per_shard=4, labels=lambda n: 21838 + n, digits_width=4)
    cfg = load_stage_config(H / "in22k_384.yaml", [f"data.train=[{{shards: {tmp_path}/val-0000.tar}}]",
                                                  f"data.val={tmp_path}/val-0000.tar", "data.workers=0",
                                                  "data.image_size=32"]).data
    assert cfg.num_classes == 21841
    with pytest.raises(ValueError) as error:
        list(build_eval_loader(cfg, rank=0, world_size=1, batch_size=2))
    assert str(error.value) == f"label 21841 is outside num_classes 21841: shard {tmp_path}/val-0000.tar, key val0000_0003"
