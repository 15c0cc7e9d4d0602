"""Input is checked before any rank starts: a bad value, an unknown key or a missing file is one line naming it and exit
status 2; numbers read as people write them; stage names and SLURM options never reach an sbatch script unchecked."""
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from conftest import CONFIG, REPO
from pretrain.config import load_stage_config
from pretrain.typed_config import ConfigError
from test_launch_units import run_cli, write_schedule


OVERRIDE = re.compile(r"[a-z_]+(\.[a-z_]+)*=[^=\s`]+")


def readme_overrides() -> list[str]:
    """Every `key=value` override the README shows: on `pretrain run` command lines, and in inline code made of
    overrides only."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```.*?```", text, re.S)
    commands = [line for block in blocks for line in block.splitlines() if "pretrain run" in line]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [span for span in re.findall(r"`([^`]+)`", prose) if all(OVERRIDE.fullmatch(t) for t in span.split())]
    tokens = {token for line in commands + spans for token in line.split("#")[0].split()}
    return sorted(t for t in tokens if OVERRIDE.fullmatch(t))


@pytest.mark.parametrize("override", readme_overrides())
def test_every_override_in_the_readme_works_as_written(override):
    key, value = override.split("=", 1)
    cfg = load_stage_config(CONFIG, [override]).to_dict()
    for part in key.split("."):
        cfg = cfg[part]
    assert str(cfg) == value or cfg == pytest.approx(float(value))


def test_the_readme_shows_overrides():
    assert {"optim.lr=1e-5", "max_steps=8", "checkpoint.every=4"} <= set(readme_overrides())


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=3e-4", ("optim", "lr", 3e-4)), ("optim.lr=1e-5", ("optim", "lr", 1e-5)),
    ("max_steps=1_000", ("max_steps", None, 1000)), ("max_steps=1e5", ("max_steps", None, 100000)),
    ("optim.eps=1.0e-8", ("optim", "eps", 1e-8)),
])
def test_numbers_as_people_write_them(override, expected):
    section, key, value = expected
    cfg = load_stage_config(CONFIG, [override]).to_dict()
    got = cfg[section] if key is None else cfg[section][key]
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("override, message", [
    ("logging.every=0", "logging.every must be > 0"),
    ("optim.lr=.nan", "optim.lr: expected a finite float"),
    ("optim.lr=.inf", "optim.lr: expected a finite float"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("text.heads=0", "text.heads must be > 0"),
    ("text.heads=3", "multiple of text.heads"),
    ("max_steps=2.5", "expected int"),
    ("eval.every=-1", "eval.every must be > 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("checkpoint.pause_at=0", "checkpoint.pause_at must be > 0"),
    ("checkpoint.pause_at=1000000", "checkpoint.pause_at (1000000) must be below max_steps"),
])
def test_values_that_make_no_sense_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_stage_config(CONFIG, [override])


@pytest.mark.parametrize("args, culprit", [
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["optimm.lr=1"], "unknown key(s) ['optimm']"),
    (["model.pretrained=/nonexistent/backbone.pth"], "model.pretrained: file not found: /nonexistent/backbone.pth"),
    (["data.train=[{shards: '/nonexistent/{00000..00003}.tar'}]"], "data.train[0].shards: shard not found"),
    (["max_steps=ten"], "max_steps: expected int"),
])
def test_pretrain_run_with_a_bad_config_says_one_line_and_starts_no_rank(tmp_path, capsys, args, culprit):
    assert run_cli([CONFIG, "--launcher", "local", "--nproc", "2", f"run_dir={tmp_path}", *args]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and culprit in err and not out
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("old, new, value", [("data.task", "data.format", "image-text"),
                                            ("optim.offset_lr_scale", "optim.dcn_lr_mul", 0.1)])
def test_an_old_config_with_a_renamed_key_is_refused_with_the_new_name(tmp_path, capsys, old, new, value):
    section, old_key = old.split(".")
    written_before = yaml.safe_load(pathlib.Path(CONFIG).read_text())
    written_before[section][old_key] = value
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(written_before))
    assert run_cli([str(tmp_path / "old.yaml"), f"run_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert not out and err.count("\n") == 1 and err.endswith(f"{old} is now {new}: rename it in the config\n")
    assert load_stage_config(CONFIG, [f"{new}={value}"]).to_dict()[section][new.split(".")[1]] == value


def test_the_command_line_says_it_in_one_line_with_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch", "run", CONFIG, "--nproc", "2", f"run_dir={tmp_path}",
                           "logging.every=0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr == f"pretrain run: stage 'pretrain' ({CONFIG}): logging.every must be > 0, got 0\n"


def test_every_stage_of_a_schedule_is_checked_first(tmp_path, capsys):
    schedule = write_schedule(tmp_path)
    (tmp_path / "finetune.yaml").write_text((REPO / "configs/demo/finetune.yaml").read_text())
    (tmp_path / "pretrain.yaml").write_text((REPO / "configs/demo/pretrain.yaml").read_text())
    assert run_cli([str(schedule), "finetune:optim.warmup_steps=-3"]) == 2
    err = capsys.readouterr().err
    assert "stage 'finetune'" in err and "optim.warmup_steps must be >= 0" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["pre train", "pretrain\nrm -rf /", "../up", "x;y"])
def test_stage_names_are_checked(tmp_path, capsys, name):
    schedule = write_schedule(tmp_path)
    schedule.write_text(schedule.read_text().replace("name: pretrain", f"name: {name!r}"))
    assert run_cli([str(schedule), "--dry-run", "--engine", "test_launch_fake_engine"]) == 2
    assert "stage name" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--partition", "gpu\nrm -rf /"), ("--account", "a;b"), ("--qos", "$(id)"),
                                         ("--constraint", "a100`id`"), ("--nodes", "0")])
def test_slurm_options_are_checked_before_an_sbatch_script(tmp_path, capsys, flag, value):
    code = run_cli([str(write_schedule(tmp_path)), "--launcher", "slurm", "--dry-run", flag, value,
                    "--engine", "test_launch_fake_engine"])
    assert code == 2
    err = capsys.readouterr().err
    assert "slurm option" in err and "#SBATCH" not in err


def test_slurm_constraint_syntax_passes(tmp_path, capsys):
    code = run_cli([str(write_schedule(tmp_path)), "--launcher", "slurm", "--dry-run", "--constraint", "[a100&ib|h100]",
                    "--partition", "gpu,debug", "--engine", "test_launch_fake_engine"])
    assert code == 0
    assert "#SBATCH --constraint='[a100&ib|h100]'" in capsys.readouterr().out


def test_the_config_s_table_of_tasks_is_the_engine_s():
    from pretrain.config import TASK_FORMATS
    from pretrain.data.config import SAMPLE_FORMATS
    from pretrain.engine.tasks import TASKS

    assert set(TASK_FORMATS) == set(TASKS) and set(TASK_FORMATS.values()) <= set(SAMPLE_FORMATS)
    with pytest.raises(ConfigError, match=re.escape("task: unknown task 'masked-image'; choose from")):
        load_stage_config(CONFIG, ["task=masked-image"])


def test_model_args_mirror_the_release_constructor():
    import dataclasses
    import inspect

    from pretrain.config import ModelArgs
    from pretrain.models.internimage import InternImage

    constructor = set(inspect.signature(InternImage.__init__).parameters)
    assert {f.name for f in dataclasses.fields(ModelArgs)} == constructor - {"self", "num_classes", "with_cp", "device",
                                                                            "dtype"}


def test_a_typo_in_model_args_is_an_error_not_a_default():
    with pytest.raises(ConfigError, match=re.escape("model.args: unknown key(s) ['chanels']")):
        load_stage_config(CONFIG, ["model.args.chanels=32"])
    assert load_stage_config(CONFIG, ["model.args.channels=32"]).model.arguments()["channels"] == 32


def test_a_dry_run_shows_each_stage_s_batch_steps_and_lr_even_without_the_data(capsys):
    assert run_cli(["configs/schedules/internimage_h.yaml", "--launcher", "slurm", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert ("stage pretrain: 128 ranks x batch 256 x accumulation 1 = global batch 32,768; 390,930 steps "
            "(12,809,994,240 samples); peak lr 0.0005 (optim.lr 0.0005 per 32768), warm-up 13,031 steps") in out
    assert "stage in1k: 32 ranks x batch 16 x accumulation 1 = global batch 512; 50,040 steps" in out
    assert err.count("(a real run stops here)") == 3 and "shard not found: /datasets/laion400m/00000.tar" in err


def test_nodes_that_do_not_give_the_declared_global_batch_are_refused_before_anything_is_queued(capsys):
    code = run_cli(["configs/schedules/internimage_h.yaml", "--launcher", "slurm", "--nodes", "2", "--dry-run"])
    assert code == 2
    out, err = capsys.readouterr()
    assert not out and err.splitlines()[-1] == (
        "pretrain run: stage 'pretrain' on 16 ranks: global_batch is 32768, but batch_size 256 x 16 ranks x "
        "optim.grad_accumulation 1 = 4096; change the number of nodes, batch_size or optim.grad_accumulation")
