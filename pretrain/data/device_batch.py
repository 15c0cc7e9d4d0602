"""The loader's batch -> the model's input, on the engine's device. Workers send uint8 images, a quarter of fp32's
bytes through the DataLoader's shared memory, the pinned copy and the host-to-device copy; the float conversion, the
normalisation and (training only) random erasing run here, on the device, as timm's PrefetchLoader does them.

    prepare = DeviceBatch(cfg.data, device, training=True)
    batch = prepare(batch)                     # every tensor on the device; "image" float (B, 3, H, W), normalised
    loader = DeviceLoader(eval_loader, DeviceBatch(cfg.data, device, training=False))  # evaluation batches, prepared
"""
import torch
from timm.data.random_erasing import RandomErasing

from pretrain.data.config import DataConfig


class DeviceBatch:
    def __init__(self, cfg: DataConfig, device: torch.device, training: bool):
        augment = cfg.augment
        self.device = device
        # (x - 255 mean) / (255 std) on the uint8 values: the 1/255 scaling folded in, as the workers did it before
        self.mean = torch.tensor([255 * m for m in augment.mean], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in augment.std], device=device).view(1, 3, 1, 1)
        # The release's AUG.REMODE "pixel" and AUG.RECOUNT 1; its draws come from the global RNGs (python's, torch's
        # on the device), which the checkpoint saves per rank, as it does for drop path.
        erasing = augment.random_erasing if training else 0.0
        self.erasing = RandomErasing(erasing, mode="pixel", device=device) if erasing else None

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the host -> normalised float32 on the device."""
        images = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return self.erasing(images) if self.erasing is not None else images

    def __call__(self, batch: dict) -> dict:
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) and k != "image" else v
                 for k, v in batch.items()}
        return {**moved, "image": self.images(batch["image"])}  # the image copied once, by images()


class DeviceLoader:
    """An evaluation loader (see loader.EvalLoader) whose batches and placeholder come with their images prepared;
    the other tensors stay on the host, where the tasks count their metrics."""

    def __init__(self, loader, prepare: DeviceBatch):
        self.loader, self.prepare = loader, prepare

    def __iter__(self):
        return (self._prepared(batch) for batch in self.loader)

    def placeholder(self) -> dict:
        return self._prepared(self.loader.placeholder())

    def _prepared(self, batch: dict) -> dict:
        return {**batch, "image": self.prepare.images(batch["image"])}
