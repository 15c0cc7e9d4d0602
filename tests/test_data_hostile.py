"""Hostile shards stay bounded (data.limits), and DataLoader workers come from the forkserver, never a fork of the rank.

Real tar shards written here, real PIL images; each hostile input is small on disk and would be costly if obeyed."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
import tracemalloc

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from launch import cli
from pretrain.config import load_stage_config
from pretrain.data import DataConfig, build_eval_loader, build_train_loader, get_tokenizer
from pretrain.data.check import check_shards
from pretrain.data.loader import make_loader
from pretrain.data.stats import SkipCounter, skipped_total
from pretrain.data.tars import read_tars
from pretrain.typed_config import ConfigError

MiB = 2**20
DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "pretrain.yaml")


def image_bytes(format: str = "JPEG", size: tuple[int, int] = (20, 16)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=format)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def gzip_shard_with_a_huge_member(tmp_path_factory):
    """A .tar.gz of under 1 MB: a good sample, one whose image is 128 MiB of zeros, another good sample."""
    path = tmp_path_factory.mktemp("huge") / "00000.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=9) as tar, open("/dev/zero", "rb") as zeros:
        add_member(tar, "a.jpg", image_bytes())
        add_member(tar, "a.txt", b"a good one")
        huge = tarfile.TarInfo("b.jpg")
        huge.size = 128 * MiB
        tar.addfile(huge, zeros)
        add_member(tar, "b.txt", b"a bomb")
        add_member(tar, "c.jpg", image_bytes())
        add_member(tar, "c.txt", b"another good one")
    assert path.stat().st_size < MiB
    return path


def test_an_oversized_member_is_skipped_from_its_header_unread(gzip_shard_with_a_huge_member):
    read = read_tars(SkipCounter(), max_bytes=32 * MiB)
    tracemalloc.start()
    try:
        samples = list(read([{"url": str(gzip_shard_with_a_huge_member)}]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["a", "b", "c"]
    assert samples[1]["jpg"] is None and samples[1]["txt"] == b"a bomb"
    assert peak < 4 * MiB  # the member is 128 MiB

    report = check_shards(str(gzip_shard_with_a_huge_member), "image-text", image_size=16)
    assert report["samples"] == 2 and report["skipped_by_reason"] == {"oversized_member": 1}


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_shards_are_read_compressed_or_not(tmp_path, mode):
    path = tmp_path / "00000.tar"
    image = image_bytes()
    with tarfile.open(path, mode) as tar:
        for key in ("a", "b"):
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.txt", f"caption {key}".encode())
    samples = list(read_tars(SkipCounter(), max_bytes=MiB)([{"url": str(path)}]))
    assert [(s["__key__"], s["jpg"], s["txt"]) for s in samples] == [("a", image, b"caption a"),
                                                                     ("b", image, b"caption b")]


def test_an_oversized_extended_header_ends_the_shard_unread(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        add_member(tar, "a.jpg", image_bytes())
        add_member(tar, "a.txt", b"kept")
        add_member(tar, "b" * (2 * MiB) + ".txt", b"a 2 MiB name, stored in a PAX header")
    report = check_shards(str(tmp_path / "00000.tar"), "image-text", image_size=16)
    assert report["samples"] == 1 and report["skipped_by_reason"] == {"unreadable_shard": 1}


@pytest.fixture(scope="module")
def pixel_bomb() -> bytes:
    """A valid 121 Mpx PNG of about 15 KB: 363 MB once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (11_000, 11_000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert Image.open(buffer).size == (11_000, 11_000)
    return buffer.getvalue()


def image_text_shard(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as tar:
        for i, sample in enumerate(samples):
            tar.write({"__key__": f"{i:06d}", **sample})
    return str(path)


@pytest.mark.parametrize("image_pixels", [2**25, 2**40])
def test_a_pixel_bomb_is_skipped_before_decoding(tmp_path, pixel_bomb, image_pixels):
    """Over limits.image_pixels; and, with a limit above PIL's own, by PIL's warning, which would otherwise let it be
    decoded (it is a valid PNG: decoded, it would count as a good sample)."""
    shard = image_text_shard(tmp_path / "00000.tar", [
        {"png": pixel_bomb, "txt": "a bomb"},
        {"jpg": image_bytes("PNG"), "txt": "a PNG saved as .jpg: judged by its content"},
        {"jpg": image_bytes("GIF"), "txt": "a GIF saved as .jpg: not a format we accept"},
    ])
    report = check_shards(shard, "image-text", image_size=16, limits={"image_pixels": image_pixels})
    assert report["samples"] == 1
    assert report["skipped_by_reason"] == {"oversized_image": 1, "bad_image": 1}


def test_a_huge_caption_is_truncated_before_tokenising(tmp_path):
    words = np.array("a photo of the small red dog sitting beside an old wooden house near river".split())
    rng = np.random.default_rng(0)
    caption = " ".join(rng.choice(words, 700_000))  # 3.4 MB, seconds to tokenise whole
    assert len(caption) > 3_000_000
    shard = image_text_shard(tmp_path / "00000.tar", [{"jpg": image_bytes(), "txt": caption},
                                                      {"jpg": image_bytes(), "txt": "a short one"}])
    cfg = DataConfig(format="image-text", train=[{"shards": shard}], val=shard, workers=0, image_size=16)
    (batch,) = build_eval_loader(cfg, rank=0, world_size=1, batch_size=2)
    assert batch["skipped"] == {"truncated_caption": 1} and skipped_total(batch["skipped"]) == 0
    tokenizer = get_tokenizer(77)
    expected = tokenizer([caption[:1000], "a short one"])  # 1000 characters already hold more than 77 tokens
    assert torch.equal(batch["text"], expected)
    assert int((batch["text"][0] != 0).sum()) == 77  # none lost

    report = check_shards(shard, "image-text", image_size=16, limits={"caption_chars": 5})
    assert report["skipped"] == 0 and report["altered_by_reason"] == {"truncated_caption": 2}


@pytest.fixture
def unreadable_shards(tmp_path) -> str:
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"not a tar " * 100)
    return str(tmp_path / "{00000..00002}.tar")


@pytest.mark.parametrize("resampled, workers", [(True, 0), (True, 1)])  # true epochs: test_data_resume.py
def test_a_source_of_unreadable_shards_raises_naming_it(unreadable_shards, tmp_path, resampled, workers):
    good = image_text_shard(tmp_path / "good.tar", [{"jpg": image_bytes(), "txt": "fine"}] * 4)
    cfg = DataConfig(format="image-text", train=[{"shards": good}, {"shards": unreadable_shards}], resampled=resampled,
                     samples_per_epoch=8, workers=workers, image_size=16, shuffle_buffer=2,
                     limits={"shard_failures": 5})
    message = f"data source '{unreadable_shards}': 5 shards in a row gave no readable sample"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        next(iter(build_train_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0)))


def test_limits_are_validated_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.limits.member_bytes must be a positive integer"):
        DataConfig(train=[{"shards": "x.tar"}], limits={"member_bytes": 0})
    with pytest.raises(ValueError, match="image_pixel"):
        DataConfig(train=[{"shards": "x.tar"}], limits={"image_pixel": 10})
    with pytest.raises(ConfigError, match="data.limits.caption_chars"):
        load_stage_config(DEMO_CONFIG, ["data.limits.caption_chars=-1"])
    assert load_stage_config(DEMO_CONFIG, ["data.limits.shard_failures=3"]).data.limits.shard_failures == 3


def test_data_check_takes_the_limits(tmp_path, capsys):
    shard = image_text_shard(tmp_path / "00000.tar", [{"jpg": image_bytes(size=(20, 16)), "txt": "twenty by sixteen"}])

    def data_check(*flags: str) -> tuple[int, dict]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["data", "check", shard, "--format", "image-text", "--image-size", "16", *flags])
        return exit_info.value.code, json.loads(capsys.readouterr().out)

    code, report = data_check("--image-pixels", "320")
    assert code == 0 and report["samples"] == 1
    code, report = data_check("--image-pixels", "319")
    assert code == 1 and report["skipped_by_reason"] == {"oversized_image": 1}
    code, report = data_check("--member-bytes", "0")
    assert code == 2 and "data.limits.member_bytes" in report["error"]


class ParentPid(IterableDataset):
    def __iter__(self):
        yield torch.tensor([os.getppid()])


def test_workers_start_from_the_forkserver(tmp_path):
    """A forked worker's parent would be this process: these come from the forkserver, which has no threads."""
    (ppid,) = make_loader(ParentPid(), workers=1)
    assert int(ppid) != os.getpid()
    with open(f"/proc/{int(ppid)}/status") as status:
        assert "Threads:\t1\n" in status.read()
    shard = image_text_shard(tmp_path / "00000.tar", [{"jpg": image_bytes(), "txt": "one"}])
    cfg = DataConfig(format="image-text", train=[{"shards": shard}], val=shard, workers=1, image_size=16)
    loader = build_eval_loader(cfg, rank=0, world_size=1, batch_size=1)
    assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
    (batch,) = loader
    assert batch["text"].shape == (1, 77)


RANK_SCRIPT = """
import os, sys, time, torch
from torch.utils.data import IterableDataset

class Pids(IterableDataset):
    def __iter__(self):
        while True:
            yield torch.tensor([os.getpid(), os.getppid()])

if __name__ == "__main__":
    from pretrain.data.loader import make_loader
    batches = iter(make_loader(Pids(), workers=2))
    print(sorted({tuple(next(batches).tolist()) for _ in range(8)}), flush=True)
    time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_and_their_forkserver_end_with_a_killed_rank(tmp_path):
    """The forkserver outlives the rank (its workers hold it open): the workers must notice the rank's death."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    rank = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        workers = json.loads(rank.stdout.readline().replace("(", "[").replace(")", "]"))
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    pids = {pid for worker in workers for pid in worker}
    assert len(pids) == 3 and rank.pid not in pids  # two workers and the forkserver, their parent
    deadline = time.monotonic() + 30
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if running(pid)]
