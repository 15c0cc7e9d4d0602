"""The `data:` section of a stage config: a plain dataclass tree. The stage config builds it through
pretrain.typed_config (the one validator); built directly, `DataConfig(train=[{...}], augment={...})`, its sections go
through the same validator."""
from dataclasses import dataclass, field
from typing import ClassVar

from pretrain.typed_config import from_dict

IMAGE_TEXT, CLASSIFICATION = "image-text", "classification"
SAMPLE_FORMATS = (IMAGE_TEXT, CLASSIFICATION)
"""The shard layouts decode.py reads (data.format); each task of the engine trains on one of them."""
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""timm's IMAGENET_DEFAULT_MEAN/STD (tests/test_data_pipeline.py keeps them equal), written out because importing
timm.data imports torch, and the stage config is read without it."""


def _section(cls, value, where: str):
    return value if isinstance(value, cls) else from_dict(cls, value, where)


@dataclass
class Source:
    """One set of training shards."""

    shards: str
    """Brace pattern, '::'-joined list, local path or URL (`pipe:aws s3 cp s3://b/{00000..00999}.tar -`, http://)."""
    weight: float = 1.0
    """Relative sampling weight when several sources are mixed; normalised over the sources."""

    def __post_init__(self):
        if not self.shards:
            raise ValueError("data.train: a source needs `shards`")
        if not self.weight > 0:
            raise ValueError(f"data.train: weight of {self.shards!r} must be > 0, got {self.weight}")


@dataclass
class Augment:
    """Image augmentation. Pretraining uses the crop and flip; fine-tuning may add timm's RandAugment, random erasing and
    mixup/cutmix."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of RandomResizedCrop, as a fraction of the image."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    randaugment: str | None = None
    """timm RandAugment config string, e.g. "rand-m9-mstd0.5-inc1" (classification only)."""
    mixup: float = 0.0
    """Mixup alpha; > 0 enables mixup (classification only, applied on batches by the trainer, see build_mixup)."""
    cutmix: float = 0.0
    """CutMix alpha; > 0 enables cutmix (classification only)."""
    mix_prob: float = 1.0
    """Probability of applying mixup or cutmix to a batch."""
    switch_prob: float = 0.5
    """Probability of cutmix instead of mixup when both are enabled."""
    random_erasing: float = 0.0
    """Probability that timm's RandomErasing erases a box of an image (classification only): on the device, after the
    normalisation, in training only (device_batch.py), with the release's mode (per-pixel normal noise) and count (1)."""
    label_smoothing: float = 0.0
    """Label smoothing; folded into the soft targets when mixup/cutmix is on, else the trainer's cross-entropy uses it."""
    eval_crop_pct: float = 0.875
    """Evaluation resizes the short side to image_size / eval_crop_pct, then centre-crops image_size."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        self.crop_scale, self.mean, self.std = tuple(self.crop_scale), tuple(self.mean), tuple(self.std)
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("hflip", "mix_prob", "switch_prob", "random_erasing"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"data.augment.{name} is a probability, got {getattr(self, name)}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError("data.augment.mixup and cutmix are Beta alphas and must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"data.augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.randaugment is not None and not self.randaugment.startswith("rand"):
            raise ValueError(f"data.augment.randaugment must be a timm 'rand-...' string, got {self.randaugment!r}")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"data.augment.eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("data.augment.mean and std need three values (RGB)")


@dataclass
class Limits:
    """Bounds on the work one shard or sample can cause, so that a broken or hostile shard costs a counted skip and
    never a rank's memory or time. Samples over a limit are skipped, and counted by reason, like bad samples."""

    shard_failures: int = 16
    """Training stops, naming the source, when this many of its shards in a row give no readable sample (cannot be
    opened, are not tars, hold nothing usable). Evaluation and `pretrain data check` read each shard once anyway."""
    member_bytes: int = 32 * 2**20
    """Largest tar member read, in bytes, judged from its header: a bigger one is left unread and its sample skipped.
    32 MiB holds any web image (an 8K JPEG is ~10 MB) and any caption."""
    image_pixels: int = 2**25
    """Largest image decoded, in pixels (width x height from its header): 2**25 = 33.5 Mpx, an 8K x 4K image, ~100 MB
    once decoded. PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS) applies too and also skips."""
    caption_chars: int = 4096
    """Captions are cut to this many characters before tokenising (counted as truncated_caption; the sample is kept).
    4096 > 128 tokens of the vocabulary's longest (28 characters), so no realistic caption within context_length
    tokens loses any; raise it for a context_length above 128."""

    def __post_init__(self):
        for name in ("shard_failures", "member_bytes", "image_pixels", "caption_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"data.limits.{name} must be a positive integer, got {value!r}")


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches. Every random stream derives from the run seed."""

    RENAMED: ClassVar[dict[str, str]] = {"task": "format"}  # data.task named the format beside the stage's task

    format: str = "image-text"
    """The sample format the shards hold: "image-text" (KEY.jpg/png/webp + KEY.txt, img2dataset's layout) or
    "classification" (KEY.jpg + KEY.cls)."""
    train: list[Source] = field(default_factory=list)
    """Training sources, mixed per sample by weight."""
    val: str | None = None
    """Evaluation shards (pattern or URL); each sample is seen once across ranks."""
    demo_root: str | None = None
    """If set, the digits demo shards are built there on first use and fill `train`/`val` when those are empty."""
    samples_per_epoch: int | None = None
    """Samples per epoch over all ranks; None reads sizes.json or img2dataset's *_stats.json next to local shards."""
    resampled: bool = True
    """Draw shards with replacement (pretraining); False splits a shuffled shard list over ranks and workers."""
    workers: int = 4
    """DataLoader worker processes per rank."""
    image_size: int = 224
    num_classes: int | None = None
    """Labels must be below it (classification; the stage sets it from its num_classes): a label outside stops the
    run at its first sample, naming the shard and key, rather than a device-side assert."""
    context_length: int = 77
    """Caption length in tokens (CLIP BPE)."""
    shuffle_buffer: int = 5000
    """Samples held by the shuffle buffer of each source in each worker."""
    augment: Augment = field(default_factory=Augment)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        self.train = [_section(Source, s, f"data.train[{i}]") for i, s in enumerate(self.train)]
        self.augment = _section(Augment, self.augment, "data.augment")
        self.limits = _section(Limits, self.limits, "data.limits")
        if self.format not in SAMPLE_FORMATS:
            raise ValueError(f"data.format must be one of {SAMPLE_FORMATS}, got {self.format!r}")
        if not self.train and self.demo_root is None:
            raise ValueError("data.train needs at least one source (or set data.demo_root)")
        if self.samples_per_epoch is not None and self.samples_per_epoch <= 0:
            raise ValueError(f"data.samples_per_epoch must be > 0, got {self.samples_per_epoch}")
        if self.workers < 0 or self.image_size <= 0 or self.context_length <= 0 or self.shuffle_buffer <= 0:
            raise ValueError("data.workers must be >= 0; image_size, context_length, shuffle_buffer must be > 0")
        augment = self.augment
        if self.format == "image-text" and (augment.randaugment or augment.mixup or augment.cutmix
                                            or augment.random_erasing):
            raise ValueError("data.augment.randaugment/mixup/cutmix/random_erasing apply to classification only")


def data_config_from_dict(section: dict) -> DataConfig:
    """Build the config from the YAML `data:` mapping, naming any unknown key."""
    return from_dict(DataConfig, section, "data")
