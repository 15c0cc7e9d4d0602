"""Workers send uint8 images; DeviceBatch converts, normalises and (training only) randomly erases them on the device.
The values are those the workers produced when they normalised (the old path, rebuilt here as it was)."""
import itertools
import random

import pytest
import torch
from torchvision.transforms import v2

from pretrain.data import DataConfig, DeviceBatch, DeviceLoader, build_eval_loader, build_train_loader
from pretrain.data import transforms
from test_data_pipeline import classification_cfg, write_shards

CPU = torch.device("cpu")


def normalising(make_transform):
    """The old workers' transform: the same steps on uint8, then ToDtype(float32) and Normalize(255 mean, 255 std)."""
    def old(cfg):
        mean, std = [255 * m for m in cfg.augment.mean], [255 * s for s in cfg.augment.std]
        return v2.Compose([*make_transform(cfg).transforms, v2.ToDtype(torch.float32), v2.Normalize(mean, std)])
    return old


@pytest.fixture
def pattern(tmp_path):
    return write_shards(tmp_path, 2, 6)


def test_the_device_batch_equals_what_the_workers_normalised(pattern, monkeypatch):
    cfg = classification_cfg(pattern, workers=0, samples_per_epoch=12, augment={"randaugment": "rand-m9-mstd0.5"})

    def train_batches():
        return list(itertools.islice(build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=3), 3))

    def eval_batches():
        return list(build_eval_loader(cfg, rank=0, world_size=1, batch_size=4))

    new_train, new_eval = train_batches(), eval_batches()
    monkeypatch.setattr("pretrain.data.loader.train_transform", normalising(transforms.train_transform))
    monkeypatch.setattr("pretrain.data.loader.eval_transform", normalising(transforms.eval_transform))
    old_train, old_eval = train_batches(), eval_batches()

    prepare = DeviceBatch(cfg, CPU, training=True)
    for new, old in zip(new_train + new_eval, old_train + old_eval, strict=True):
        assert new["image"].dtype == torch.uint8 and old["image"].dtype == torch.float32
        # a 16 px image: 3 * 16 * 16 bytes through shared memory and the copy to the device, a quarter of fp32's
        assert new["image"][0].nbytes == 3 * 16 * 16 == old["image"][0].nbytes / 4
        assert torch.equal(prepare(new)["image"], old["image"]) and torch.equal(new["label"], old["label"])
        # torchvision's usual x / 255 then (x - mean) / std differs from the folded scaling by float rounding only
        usual = v2.Normalize(cfg.augment.mean, cfg.augment.std)(v2.ToDtype(torch.float32, scale=True)(new["image"]))
        assert (usual - old["image"]).abs().max() < 1e-5


def grey_batch(n: int = 200, size: int = 32) -> dict:
    return {"image": torch.full((n, 3, size, size), 128, dtype=torch.uint8), "label": torch.zeros(n, dtype=torch.long)}


def erased_rows(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (images != reference).flatten(1).any(1)


def test_random_erasing_on_the_normalised_device_tensor_in_training_only():
    cfg = DataConfig(format="classification", train=[{"shards": "x.tar"}], augment={"random_erasing": 0.25})
    plain = DeviceBatch(cfg, CPU, training=False)(grey_batch())["image"]
    assert torch.allclose(plain[:, :, 0, 0], torch.tensor([(128 / 255 - m) / s for m, s in
                                                           zip(cfg.augment.mean, cfg.augment.std)]))
    random.seed(0), torch.manual_seed(0)
    erased = DeviceBatch(cfg, CPU, training=True)(grey_batch())["image"]
    rows = erased_rows(erased, plain)
    assert 0.15 < rows.float().mean() < 0.35  # 200 draws of p = 0.25: 3 standard deviations either side
    boxes = erased != plain
    assert abs(erased[boxes].mean()) < 0.1 and 0.9 < erased[boxes].std() < 1.1  # N(0, 1) noise in normalised units
    random.seed(0), torch.manual_seed(0)  # the draws come from the global RNGs, which checkpoints save per rank
    assert torch.equal(DeviceBatch(cfg, CPU, training=True)(grey_batch())["image"], erased)

    off = DataConfig(format="classification", train=[{"shards": "x.tar"}])
    assert torch.equal(DeviceBatch(off, CPU, training=True)(grey_batch())["image"], plain)
    with pytest.raises(ValueError, match="classification only"):
        DataConfig(train=[{"shards": "x.tar"}], augment={"random_erasing": 0.25})


def test_evaluation_batches_and_the_placeholder_come_prepared(pattern):
    cfg = classification_cfg(pattern, workers=0, augment={"random_erasing": 1.0})
    prepare = DeviceBatch(cfg, CPU, training=False)
    loader = build_eval_loader(cfg, rank=0, world_size=1, batch_size=4)
    for raw, prepared in zip(loader, DeviceLoader(loader, prepare), strict=True):
        assert torch.equal(prepared["image"], prepare.images(raw["image"])) and prepared["image"].dtype == torch.float32
    placeholder = DeviceLoader(loader, prepare).placeholder()["image"]
    assert placeholder.dtype == torch.float32 and placeholder.shape == (1, 3, 16, 16)
