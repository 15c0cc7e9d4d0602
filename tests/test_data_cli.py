"""`pretrain data check`, `pretrain shards make` / tools/make_shards.py, and the digits demo shards."""
import csv
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from launch import cli
from pretrain.data import DataConfig, build_eval_loader, ensure_demo_shards, zero_shot_classes
from pretrain.data.check import check_shards

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def data_check(pattern: str, sample_format: str) -> tuple[int, dict]:
    proc = run("-m", "launch", "data", "check", pattern, "--format", sample_format, "--workers", "2",
               "--image-size", "16")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout + proc.stderr
    return proc.returncode, json.loads(lines[0])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three classes of small PNGs and JPEGs, and a caption table over the same files."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    rows = []
    for name in ("cat", "dog", "fish"):
        (root / name).mkdir()
        for i in range(4):
            file = f"{name}/{i}.{'png' if i % 2 else 'jpg'}"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / file)
            rows.append({"path": file, "caption": f"a {name}, number {i}"})
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def make_shards(argv: list[str], capsys, script: bool = False) -> dict:
    """`pretrain shards make ...` or `tools/make_shards.py ...`, in this process to save interpreter start-ups."""
    with pytest.raises(SystemExit) as exit_info:
        if script:
            sys.argv = ["tools/make_shards.py", *argv]
            runpy.run_path(str(REPO / "tools" / "make_shards.py"), run_name="__main__")
        else:
            cli.main(["shards", "make", *argv])
    assert exit_info.value.code == 0
    return json.loads(capsys.readouterr().out)


def test_shards_make_from_a_folder_and_a_table(image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    result = make_shards(["--from-folder", str(image_folder), str(tmp_path / "cls"), "--samples-per-shard", "5"],
                         capsys)
    assert result["classes"] == ["cat", "dog", "fish"]
    assert json.loads((tmp_path / "cls" / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5,
                                                                         "00002.tar": 2}
    report = check_shards(result["shards"], "classification", image_size=16)
    assert report["samples"] == 12 and report["skipped"] == 0

    result = make_shards(["--from-table", str(image_folder / "captions.csv"), str(tmp_path / "text")], capsys,
                         script=True)
    report = check_shards(result["shards"], "image-text", image_size=16)
    assert report["samples"] == 12 and report["skipped"] == 0


def test_data_check_counts_bad_samples_and_fails_on_unreadable_shards(tmp_path):
    image = (REPO / "tests" / "test_data_cli.py").read_bytes()  # not an image
    with wds.TarWriter(str(tmp_path / "00000.tar")) as tar:
        tar.write({"__key__": "000000000", "jpg": image, "txt": "text saved as jpg"})
        tar.write({"__key__": "000000001", "png": _png(), "txt": "a good one"})
        tar.write({"__key__": "000000002", "png": _png()})
    (tmp_path / "00001.tar").write_bytes(b"\0" * 10)
    code, report = data_check(str(tmp_path / "{00000..00001}.tar"), "image-text")
    assert code == 1
    assert report["samples"] == 1 and report["skipped"] == 3
    assert report["skipped_by_reason"] == {"bad_image": 1, "missing_caption": 1, "unreadable_shard": 1}

    code, report = data_check(str(tmp_path / "{00000..00002}.tar"), "image-text")
    assert code == 2 and "00002.tar" in report["error"]


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 12), "white").save(buffer, format="PNG")
    return buffer.getvalue()


def test_demo_shards(tmp_path):
    paths = ensure_demo_shards(str(tmp_path / "demo"))
    assert ensure_demo_shards(str(tmp_path / "demo")) == paths  # built once
    sizes = {split: sum(json.loads((tmp_path / "demo" / "image-text" / split / "sizes.json").read_text()).values())
             for split in ("train", "val")}
    assert sizes == {"train": 1438, "val": 359}
    with pytest.raises(ValueError, match="image_size"):
        ensure_demo_shards(str(tmp_path / "demo"), image_size=64)

    cfg = DataConfig(format="image-text", demo_root=str(tmp_path / "demo"), workers=0, image_size=32)
    batch = next(iter(build_eval_loader(cfg, rank=0, world_size=1, batch_size=8)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["text"].shape == (8, 77)
    assert set(batch["label"].tolist()) <= set(range(10))
    names, templates = zero_shot_classes()
    assert names[7] == "seven" and all("{}" in t for t in templates)
