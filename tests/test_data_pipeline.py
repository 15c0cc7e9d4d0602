"""Data pipeline: bad data, untrusted members, shard splitting, resampling, resumption, start-up errors."""
import collections
import io
import itertools
import json
import pathlib
import os
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pretrain.data import DataConfig, build_eval_loader, build_mixup, build_train_loader, data_config_from_dict
from pretrain.data.check import check_shards


def jpeg(rng: np.random.Generator) -> bytes:
    """A small JPEG of uneven size, as web images are."""
    height, width = rng.integers(12, 40, size=2)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class Touch:
    """Unpickling this creates a file: proof that a member was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def write_shards(folder: pathlib.Path, n_shards: int, per_shard: int, *, sample_format: str = "classification",
                 sizes: bool = True, first_label: int = 0) -> str:
    """Shards in img2dataset's layout with keys of varying length; labels (and captions) number the samples."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(n_shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i in range(per_shard):
                label = first_label + shard * per_shard + i
                key = f"{shard:05d}{i:0{4 + shard % 3}d}"  # key length differs from shard to shard
                sample = {"__key__": key, "jpg": jpeg(rng), "cls": str(label)}
                if sample_format == "image-text":
                    sample.update(txt=f"sample number {label}", json=json.dumps({"key": key, "status": "success"}))
                tar.write(sample)
    if sizes:
        (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(n_shards)}))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def broken_shards(tmp_path_factory):
    """Two good image-text shards of 6, and a third with one good sample beside every kind of bad one."""
    folder = tmp_path_factory.mktemp("broken")
    write_shards(folder, 2, 6, sample_format="image-text", sizes=False)
    rng = np.random.default_rng(1)
    good = jpeg(rng)
    marker = folder / "unpickled"
    evil = pickle.dumps(Touch(marker))
    with wds.TarWriter(str(folder / "00002.tar")) as tar:
        tar.write({"__key__": "a1", "jpg": good[: len(good) // 2], "txt": "truncated jpeg"})
        tar.write({"__key__": "a22", "jpg": b"<html>not an image</html>", "txt": "html saved as jpg"})
        tar.write({"__key__": "a333", "jpg": good})  # no caption
        tar.write({"__key__": "a4444", "jpg": good, "txt": "with pickles", "pyd": evil, "pickle": evil})
        tar.write({"__key__": "a55555", "txt": "no image"})
    (folder / "00003.tar").write_bytes(b"this is not a tar file" * 100)
    return {"pattern": str(folder / "{00000..00003}.tar"), "marker": marker, "good": 13}


def classification_cfg(pattern: str, **overrides) -> DataConfig:
    settings = dict(format="classification", train=[{"shards": pattern}], val=pattern, workers=2, image_size=16,
                    shuffle_buffer=8)
    return DataConfig(**{**settings, **overrides})


def labels(batches) -> list[int]:
    return [int(x) for batch in batches for x in batch["label"]]


def test_bad_samples_are_skipped_counted_and_never_unpickled(broken_shards):
    report = check_shards(broken_shards["pattern"], "image-text", workers=2, image_size=16)
    assert report["samples"] == broken_shards["good"]
    assert report["skipped_by_reason"] == {"bad_image": 2, "missing_caption": 1, "missing_image": 1,
                                           "unreadable_shard": 1}
    assert not broken_shards["marker"].exists()


def test_skip_counts_reach_the_main_process(broken_shards):
    cfg = DataConfig(format="image-text", train=[{"shards": broken_shards["pattern"]}], samples_per_epoch=64,
                     workers=2, image_size=16, shuffle_buffer=8)
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    batches = list(itertools.islice(loader, loader.steps_per_epoch))
    assert batches[0]["image"].shape == (4, 3, 16, 16) and batches[0]["text"].shape == (4, 77)
    skipped = sum((collections.Counter(b["skipped"]) for b in batches), collections.Counter())
    assert set(skipped) == {"bad_image", "missing_caption", "missing_image", "unreadable_shard"}
    assert not broken_shards["marker"].exists()


def test_missing_shard_fails_fast_naming_the_path(tmp_path):
    pattern = write_shards(tmp_path, 2, 2)
    for typo, error in ((pattern.replace("00001", "00002"), FileNotFoundError), (pattern.replace("{", ""), ValueError)):
        with pytest.raises(error, match=str(tmp_path)):
            build_train_loader(classification_cfg(typo), rank=0, world_size=1, batch_size=2, seed=0)
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        build_eval_loader(classification_cfg(pattern, val=pattern.replace("00001", "00002")), rank=0, world_size=1,
                          batch_size=2)


def test_true_epochs_read_each_sample_once_even_with_fewer_shards_than_streams(tmp_path):
    cfg = classification_cfg(write_shards(tmp_path, 3, 4), resampled=False, workers=2)  # 3 shards for 2 x 2 streams
    loaders = [build_train_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=0) for rank in range(2)]
    assert loaders[0].steps_per_epoch == 2
    epochs = [labels(itertools.islice(loader, 4)) for loader in loaders]
    for epoch in range(2):
        assert sorted(epochs[0][epoch * 6:][:6] + epochs[1][epoch * 6:][:6]) == list(range(12))
    assert epochs[0][:6] != epochs[0][6:]
    with pytest.raises(ValueError, match="true epochs of one source"):
        build_train_loader(classification_cfg(cfg.train[0].shards, resampled=False,
                                              train=[cfg.train[0], cfg.train[0]]), rank=0, world_size=1,
                           batch_size=2, seed=0)


@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("eight"), 8, 6)  # labels 0..47


def test_split_by_rank_and_worker_covers_every_sample_once(eight_shards):
    cfg = classification_cfg(eight_shards, resampled=False)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, batch_size=4, seed=3)
        assert loader.steps_per_epoch == 6
        per_rank.append(labels(itertools.islice(loader, 6)))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))

    seen = [labels(build_eval_loader(cfg, rank=rank, world_size=3, batch_size=5)) for rank in range(3)]
    assert sorted(sum(seen, [])) == list(range(48))
    assert [len(s) for s in seen] == [18, 18, 12]  # split by shard: 3, 3 and 2 of the 8


def test_resampling_is_deterministic_per_seed_epoch_and_rank(eight_shards):
    cfg = classification_cfg(eight_shards)

    def epochs(seed, rank, n=2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, batch_size=4, seed=seed)
        steps = loader.steps_per_epoch
        stream = labels(itertools.islice(loader, n * steps))
        return [stream[e * steps * 4:(e + 1) * steps * 4] for e in range(n)]

    reference = epochs(seed=0, rank=0)
    assert epochs(seed=0, rank=0) == reference
    assert reference[0] != reference[1]  # a new epoch draws anew
    assert epochs(seed=0, rank=1)[0] != reference[0]
    assert epochs(seed=1, rank=0)[0] != reference[0]


@pytest.mark.parametrize("resampled", [True, False])
def test_resumed_loader_continues_the_stream_exactly(tmp_path, resampled):
    good = write_shards(tmp_path, 4, 5)
    broken = tmp_path / "broken.tar"
    image = jpeg(np.random.default_rng(2))
    with wds.TarWriter(str(broken)) as tar:
        tar.write({"__key__": "b1", "jpg": image, "cls": "100"})
        tar.write({"__key__": "b2", "jpg": image[:100], "cls": "101"})
        tar.write({"__key__": "b3", "jpg": image, "cls": "one hundred and two"})
        tar.write({"__key__": "b4", "jpg": image})
    (tmp_path / "sizes.json").write_text(json.dumps({**json.loads((tmp_path / "sizes.json").read_text()),
                                                     "broken.tar": 4}))
    # worker streams with bad samples and augmentation (crop, flip, RandAugment) drawing from every global RNG
    cfg = classification_cfg(f"{good}::{broken}", resampled=resampled, samples_per_epoch=12, workers=2,
                             augment={"randaugment": "rand-m9-mstd0.5"})

    def fresh():
        return build_train_loader(cfg, rank=0, world_size=1, batch_size=3, seed=7)

    uninterrupted = fresh()
    assert uninterrupted.steps_per_epoch == 4
    head = list(itertools.islice(uninterrupted, 3))  # stop mid-epoch, on a batch from the second worker
    state = uninterrupted.state_dict()
    tail = list(itertools.islice(uninterrupted, 7))  # into the next epochs

    resumed = fresh()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives a JSON round trip
    replay = list(itertools.islice(resumed, 7))
    assert head and len(replay) == len(tail) and any(batch["skipped"] for batch in tail)
    for expected, got in zip(tail, replay):
        assert torch.equal(expected["image"], got["image"])
        assert torch.equal(expected["label"], got["label"])
        assert expected["skipped"] == got["skipped"]
    assert resumed.epoch == uninterrupted.epoch == 2


def test_resume_under_other_settings_is_refused(eight_shards):
    state = build_train_loader(classification_cfg(eight_shards), rank=0, world_size=1, batch_size=4,
                               seed=0).state_dict()
    other = build_train_loader(classification_cfg(eight_shards), rank=0, world_size=1, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_sources_mix_by_weight_and_pipe_urls_work(tmp_path):
    first = write_shards(tmp_path / "a", 2, 4)  # labels 0..7
    second = write_shards(tmp_path / "b", 2, 4, first_label=100)  # labels 100..107, read through `cat`
    cfg = classification_cfg(first, workers=0, samples_per_epoch=400,
                             train=[{"shards": first, "weight": 3}, {"shards": f"pipe:cat {second}", "weight": 1}])
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0)
    seen = labels(itertools.islice(loader, loader.steps_per_epoch))
    assert len(seen) == 400 and set(seen) == set(range(8)) | set(range(100, 108))
    assert 0.15 < sum(label >= 100 for label in seen) / len(seen) < 0.35


def test_epoch_size_from_img2dataset_stats(tmp_path):
    pattern = write_shards(tmp_path, 2, 5, sizes=False)
    for shard in range(2):
        (tmp_path / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 6, "successes": 5}))
    loader = build_train_loader(classification_cfg(pattern), rank=0, world_size=1, batch_size=2, seed=0)
    assert loader.steps_per_epoch == 5
    (tmp_path / "00001_stats.json").unlink()
    with pytest.raises(ValueError, match="samples_per_epoch"):
        build_train_loader(classification_cfg(pattern), rank=0, world_size=1, batch_size=2, seed=0)


def test_config_from_a_plain_dict():
    cfg = data_config_from_dict({"format": "classification", "train": [{"shards": "a/{0..3}.tar", "weight": 2}],
                                 "augment": {"mixup": 0.8, "crop_scale": [0.5, 1.0]}})
    assert cfg.train[0].weight == 2 and cfg.augment.crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="shuffle_bufer"):
        data_config_from_dict({"train": [{"shards": "x.tar"}], "shuffle_bufer": 10})
    with pytest.raises(ValueError, match="wieght"):
        DataConfig(train=[{"shards": "x.tar", "wieght": 1}])
    with pytest.raises(ValueError, match="classification only"):
        DataConfig(train=[{"shards": "x.tar"}], augment={"mixup": 0.8})



def test_the_default_normalisation_is_timm_s_imagenet_one():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    augment = DataConfig(train=[{"shards": "x.tar"}]).augment
    assert (augment.mean, augment.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

def test_mixup_is_reproducible_and_resumable():
    cfg = DataConfig(format="classification", train=[{"shards": "x.tar"}],
                     augment={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1})
    images, targets = torch.randn(4, 3, 8, 8), torch.arange(4)
    first = build_mixup(cfg, num_classes=10, seed=1)
    first(images.clone(), targets)
    state = first.state_dict()
    expected = first(images.clone(), targets)
    second = build_mixup(cfg, num_classes=10, seed=1)
    second.load_state_dict(state)
    got = second(images.clone(), targets)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert got[1].shape == (4, 10)
    assert build_mixup(DataConfig(format="classification", train=[{"shards": "x.tar"}]), num_classes=10) is None


def test_a_stream_of_nothing_but_bad_samples_is_an_error(broken_shards, monkeypatch):
    monkeypatch.setattr("pretrain.data.pipeline.MAX_SKIPS_IN_A_ROW", 5)
    no_labels = classification_cfg(broken_shards["pattern"].replace("{00000..00003}", "00002"), workers=0,
                                   samples_per_epoch=8)
    with pytest.raises(RuntimeError, match="unusable"):
        next(iter(build_train_loader(no_labels, rank=0, world_size=1, batch_size=2, seed=0)))


def test_start_up_stats_a_bounded_spread_of_the_shards(tmp_path, monkeypatch):
    for i in range(1000):
        (tmp_path / f"{i:04d}.tar").touch()
    checked = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda path: checked.append(path) or real_isfile(path))
    from pretrain.data.shards import expand_shards

    assert len(expand_shards(str(tmp_path / "{0000..0999}.tar"))) == 1000
    assert len(checked) == 64 and checked[0].endswith("0000.tar") and checked[-1].endswith("0999.tar")
    with pytest.raises(FileNotFoundError, match="1000.tar"):
        expand_shards(str(tmp_path / "{0000..1000}.tar"))  # a pattern past the last shard: its last path is checked
