"""Two-rank ZeRO-3 runs on CPU through DeepSpeed itself: crash resume, preemption, consolidation, world-size change."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, REPO, SCRIPTS, free_port, losses, records, run, stage_command, wait_for
from pretrain.config import load_stage_config
from pretrain.engine.config_checks import load_config
from pretrain.engine.optim import warmup_cosine
from pretrain.typed_config import ConfigError


def test_uninterrupted_run_learns_and_reports(reference_run):
    run_dir, result = reference_run
    assert result["status"] == "completed" and result["metrics"]["step"] == 12
    logged = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 13))
    assert logged[-1]["loss"] < logged[0]["loss"]
    for key in ("lr_peak", "samples_per_s", "skipped", "peak_memory_mb", "tflops_per_device"):
        assert key in logged[0]
    assert len(logged[0]["peak_memory_mb"]) == 2
    assert (Path(run_dir) / "checkpoints/latest").read_text() == "step00000012"
    assert sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step*")) == ["step00000008", "step00000012"]
    evaluation = json.loads((Path(run_dir) / "result.json").read_text())
    # Every held-out image of the ten digits scored; the figures themselves are checked against independent
    # evaluations of the weights (open_clip's in test_export.py, the one-rank resume's below).
    assert (evaluation["zero_shot_classes"], evaluation["eval_samples"]) == (10, 359)
    assert list((Path(run_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_kill_9_then_resume_reproduces_the_losses(reference_run, tmp_path):
    reference_dir, _ = reference_run
    latest = tmp_path / "checkpoints/latest"
    proc = subprocess.Popen(stage_command(tmp_path, "max_steps=12", "checkpoint.every=4"), cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: latest.is_file() and latest.read_text() == "step00000008")
    for pid_file in (tmp_path / "pids").iterdir():  # torchrun's workers live in sessions of their own
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = run(tmp_path, "max_steps=12", "checkpoint.every=4")
    assert result["status"] == "completed"
    resumes = [r for r in records(tmp_path) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [8]
    expected, resumed = losses(reference_dir), losses(tmp_path)
    assert [resumed[s] for s in range(9, 13)] == pytest.approx([expected[s] for s in range(9, 13)], rel=1e-6)


def test_sigterm_saves_a_complete_checkpoint_on_every_rank(tmp_path):
    proc = subprocess.Popen(stage_command(tmp_path, "max_steps=1000", "checkpoint.every=1000"), cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)
    for pid_file in (tmp_path / "pids").iterdir():
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    assert result["status"] == "preempted"
    tag = (tmp_path / "checkpoints/latest").read_text()
    assert tag == f"step{result['metrics']['step']:08d}"
    files = {p.name for p in (tmp_path / "checkpoints" / tag).iterdir()}
    assert {"manifest.json", "rank00000_state.pt", "rank00001_state.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert records(tmp_path)[-1]["event"] == "preempted"


def test_consolidation_equals_an_independent_reading_of_the_shards(reference_run, reference_weights, tmp_path):
    from safetensors.torch import load_file

    from pretrain.models import create_model, load_official_checkpoint

    run_dir, _ = reference_run
    out = subprocess.run([sys.executable, "-m", "launch", "consolidate", str(run_dir / "checkpoints"),
                          "--out", str(tmp_path), "--dtype", "fp16"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    backbone = load_file(str(tmp_path / "backbone.safetensors"))
    expected = {k[len("visual."):]: v.half() for k, v in reference_weights.items()
                if k.startswith("visual.") and not k.startswith("visual.head.")}
    assert backbone.keys() == expected.keys()
    assert all(backbone[k].dtype == torch.float16 and torch.equal(backbone[k], expected[k]) for k in expected)
    pth = torch.load(tmp_path / "backbone.pth", weights_only=True)["model"]
    assert all(torch.equal(pth[k], backbone[k]) for k in backbone)
    # The release's key names: a fresh model loads it, missing only its classifier.
    cfg = load_stage_config(CONFIG)
    model = create_model(cfg.model.name, **cfg.model.arguments(), num_classes=10)
    result = load_official_checkpoint(model, {k: v.float() for k, v in backbone.items()}, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys


def test_two_rank_checkpoint_resumes_on_one_rank(reference_run, tmp_path):
    import shutil

    reference_dir, _ = reference_run
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference_dir / "checkpoints", checkpoints)
    # What a conversion killed half-way leaves: a staging folder, and (from older versions) a target without manifest.
    (checkpoints / ".staging-step00000012_universal/zero").mkdir(parents=True)
    (checkpoints / "step00000012_universal/zero").mkdir(parents=True)
    # At max_steps=12 there is nothing left to train: the one rank loads the converted weights and evaluates them,
    # on the same val shards as the two ranks that saved them.
    evaluated = run(tmp_path, "max_steps=12", "checkpoint.every=4", nproc=1)
    resume = next(r for r in records(tmp_path) if r.get("event") == "resume")
    assert resume["step"] == 12 and resume["world_size"] == 1 and resume["checkpoint"].endswith("_universal")
    assert "continues at step 24 on 1 ranks" in resume["data"]  # 12 steps x 2 ranks of the epoch, not step 0 again
    assert (checkpoints / "step00000012_universal/manifest.json").is_file()  # converted anew, then committed
    reference = json.loads((reference_dir / "result.json").read_text())
    assert evaluated["metrics"] == reference
    # And it trains on from the converted optimizer state (the conversion is kept, not redone).
    converted = (checkpoints / "step00000012_universal/manifest.json").stat().st_mtime_ns
    result = run(tmp_path, "max_steps=14", "checkpoint.every=4", nproc=1)
    assert (checkpoints / "step00000012_universal/manifest.json").stat().st_mtime_ns == converted
    assert result["status"] == "completed" and result["metrics"]["step"] == 14
    trained = losses(tmp_path)
    assert sorted(trained) == [13, 14] and all(math.isfinite(loss) for loss in trained.values())


@pytest.mark.parametrize("override,message", [
    ("optimm.lr=1", "unknown key"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("precision=fp8", "not one of"),
    ("zero.stage=4", "not one of"),
    ("max_steps=ten", "expected int"),
    ("model.name=resnet50", "unknown model"),
    ("checkpoint.every=0", "checkpoint.every"),
])
def test_bad_config_values_are_clear_errors(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(CONFIG, [override])


def test_overrides_with_the_documented_names():
    cfg = load_stage_config(CONFIG, ["max_steps=8", "checkpoint.every=4", "run_dir=/tmp/x", "seed=3"])
    assert (cfg.max_steps, cfg.checkpoint.every, cfg.run_dir, cfg.seed) == (8, 4, "/tmp/x", 3)


def test_finetune_from_export_with_mixup_reports_the_ema_it_exports(reference_run, tmp_path):
    """The EMA's metric (eval.ema) is the exported EMA's: evaluating the file `consolidate --weights ema` writes, in a
    fresh model, on the same val shards, gives the reported figures. ZeRO-3 keeps small parameters (norms, biases)
    gathered as persistent; an EMA written only to their shards would leave those live and the figures would differ."""
    from pretrain.engine import consolidate
    from safetensors.torch import load_file

    reference_dir, _ = reference_run
    export = consolidate(reference_dir / "checkpoints", tmp_path / "export")["backbone_safetensors"]
    run_dir, finetune = tmp_path / "finetune", str(REPO / "configs/demo/finetune.yaml")

    def run_finetune(nproc):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(SCRIPTS / "run_stage.py"), finetune, f"run_dir={run_dir}",
               f"model.pretrained={export}", "max_steps=4", "checkpoint.every=4", "batch_size=16", "logging.every=2",
               "logging.progress_bar=false", "data.augment.mixup=0.8", "data.augment.cutmix=1.0", "eval.ema=true",
               "ema_decay=0.5"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-6000:]
        return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))[7:])["metrics"]

    reported = run_finetune(nproc=2)
    assert records(run_dir)[0] == {**records(run_dir)[0], "event": "pretrained", "path": str(Path(export).resolve())}
    # lr_peak is the schedule's lr after the step (the head's group), not group 0's: the stem's 0.9^(depth + 1) of it
    base_lr = 1e-3 * 32 / 128  # optim.lr scaled from lr_batch 128 to 2 x 16
    logged = {r["step"]: r["lr_peak"] for r in records(run_dir) if "lr_peak" in r}
    assert logged == pytest.approx({s: base_lr * warmup_cosine(s, 10, 4, 1e-5 / base_lr) for s in (2, 4)}, rel=1e-6)

    exported = {}
    for weights in ("ema", "live"):
        out = consolidate(run_dir / "checkpoints", tmp_path / weights, dtype="fp32", full_model=True, weights=weights)
        assert json.loads((tmp_path / weights / "export.json").read_text())["weights"] == weights
        exported[weights] = out["model_safetensors"]
    ema, live = load_file(exported["ema"]), load_file(exported["live"])
    norms = [k for k in ema if ".norm" in k and k.endswith(".weight")]
    assert norms and all(not torch.equal(ema[k], live[k]) for k in norms)  # ZeRO-3's persistent ones averaged too
    assert sum(not torch.equal(ema[k], live[k]) for k in ema) > len(ema) // 2

    evaluated = json.loads(subprocess.run(
        [sys.executable, str(SCRIPTS / "evaluate_weights.py"), finetune, exported["ema"], str(tmp_path / "pg")],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=True).stdout)
    assert evaluated["eval_samples"] == reported["eval_samples"] > 0
    assert (evaluated["top1"], evaluated["top5"]) == (reported["top1"], reported["top5"])
    assert evaluated["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-5)

    # On one rank (the step-4 checkpoint, nothing left to train: it evaluates), the EMA is put together from the two
    # ranks' parts and split anew, not restarted from the live weights.
    resumed = run_finetune(nproc=1)
    assert next(r for r in records(run_dir) if r.get("event") == "resume")["world_size"] == 1
    assert (resumed["top1"], resumed["top5"]) == (reported["top1"], reported["top5"])
    assert resumed["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-5)


def test_bad_and_hostile_samples_are_skipped_and_reported_without_stopping_the_run(tmp_path):
    import io
    import tarfile

    from PIL import Image

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="JPEG")
    good = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("1", (11_000, 11_000)).save(buffer, format="PNG")  # 121 Mpx in ~15 KB
    bomb = buffer.getvalue()
    # Small on disk (gzip), though it holds 64 MiB members, which must never be read whole.
    with tarfile.open(tmp_path / "hostile.tar.gz", "w:gz") as tar, open("/dev/zero", "rb") as zeros:
        for i in range(20):
            member(tar, f"t{i}.jpg", good[: len(good) // 2])
            member(tar, f"t{i}.txt", b"a truncated jpeg")
            member(tar, f"h{i}.jpg", b"<html>not an image</html>")
            member(tar, f"h{i}.txt", b"html saved as .jpg")
            member(tar, f"c{i}.jpg", good)  # no caption
            member(tar, f"p{i}.png", bomb)
            member(tar, f"p{i}.txt", b"a pixel bomb")
            member(tar, f"l{i}.jpg", good)
            member(tar, f"l{i}.txt", b"a caption of a megabyte " * 40_000)
            if i < 3:  # skipping one still inflates it: a few are enough
                huge = tarfile.TarInfo(f"o{i}.jpg")
                huge.size = 64 * 2**20
                tar.addfile(huge, zeros)
                member(tar, f"o{i}.txt", b"an oversized member")
    demo = REPO / "data/demo/image-text/train/{00000..00007}.tar"
    train = f'[{{shards: "{demo}"}}, {{shards: "{tmp_path / "hostile.tar.gz"}", weight: 0.5}}]'
    result = run(tmp_path / "run", "max_steps=4", f"data.train={train}", "data.samples_per_epoch=1000")
    assert result["status"] == "completed"
    logged = [r for r in records(tmp_path / "run") if "loss" in r]
    totals = {k: sum(r.get(k, 0) for r in logged) for k in {k for r in logged for k in r}
              if k.startswith("skipped/") or k == "truncated_caption"}
    assert {"skipped/bad_image", "skipped/missing_caption", "skipped/oversized_image", "skipped/oversized_member",
            "truncated_caption"} <= {k for k, v in totals.items() if v > 0}, totals
    assert sum(r["skipped"] for r in logged) == sum(v for k, v in totals.items() if k.startswith("skipped/"))


def test_the_loop_waits_for_the_device_only_on_log_checkpoint_and_stop_steps(torchrun, tmp_path):
    proc = torchrun("count_syncs.py", CONFIG, f"run_dir={tmp_path}", "batch_size=16", "logging.progress_bar=false",
                    "data.demo_root=" + str(REPO / "data/demo"), "max_steps=8", "logging.every=4",
                    "checkpoint.every=100", "checkpoint.stop_check_every=4")
    seen = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SYNCS "))[6:])
    assert seen["inside"] == []  # no .item(), .cpu() or collective of ours inside a training step
    assert seen["outside"] and {step for step, _, _ in seen["outside"]} <= {0, 4, 8}, seen["outside"]
