"""Mixup/CutMix for fine-tuning, applied by the trainer on each batch (timm's Mixup, made resumable)."""
import numpy as np
import torch
from timm.data import Mixup

from pretrain.data.config import DataConfig
from pretrain.data.rng import derive_seed


class BatchMixup:
    """`images, soft_targets = mixup(images, labels)`. timm draws from numpy's global RNG; here each call draws from
    a seed derived from (seed, call count), so the mixing is reproducible and resumes from `state_dict()`."""

    def __init__(self, mixup: Mixup, seed: int):
        self.mixup, self.seed, self.calls = mixup, seed, 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        saved = np.random.get_state()
        np.random.seed(derive_seed(self.seed, self.calls) % 2**32)
        try:
            images, targets = self.mixup(images, labels)
        finally:
            np.random.set_state(saved)
        self.calls += 1
        return images, targets

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def build_mixup(cfg: DataConfig, num_classes: int, seed: int = 0) -> BatchMixup | None:
    """None when mixup and cutmix are off: the trainer then uses cross-entropy with cfg.augment.label_smoothing.
    Otherwise the targets are soft (smoothing included): use soft-target cross-entropy. Needs an even batch size."""
    augment = cfg.augment
    if not (augment.mixup or augment.cutmix):
        return None
    mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
                  switch_prob=augment.switch_prob, label_smoothing=augment.label_smoothing, num_classes=num_classes)
    return BatchMixup(mixup, seed)
