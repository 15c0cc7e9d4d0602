"""PIL image -> uint8 CHW tensor, with torchvision transforms v2 (and timm's RandAugment for fine-tuning). Every step
works on the uint8 pixels; the float conversion and normalisation run on the device (device_batch.py)."""
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torchvision.transforms import v2

from pretrain.data.config import DataConfig


def train_transform(cfg: DataConfig) -> v2.Compose:
    """RandomResizedCrop + flip for pretraining; classification adds RandAugment when configured."""
    augment = cfg.augment
    steps = [
        v2.RandomResizedCrop(cfg.image_size, scale=augment.crop_scale, interpolation=v2.InterpolationMode.BICUBIC),
        v2.RandomHorizontalFlip(augment.hflip),
    ]
    if augment.randaugment:
        hparams = dict(
            translate_const=int(cfg.image_size * 0.45),  # timm's defaults, so "rand-m9-..." means what it does there
            img_mean=tuple(min(255, round(255 * m)) for m in augment.mean),
            interpolation=Image.BICUBIC,
        )
        steps.append(rand_augment_transform(augment.randaugment, hparams))
    return v2.Compose([*steps, v2.PILToTensor()])


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """Resize the short side to image_size / eval_crop_pct, then centre-crop image_size."""
    resize = int(cfg.image_size / cfg.augment.eval_crop_pct)
    return v2.Compose([
        v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC),
        v2.CenterCrop(cfg.image_size),
        v2.PILToTensor(),
    ])
