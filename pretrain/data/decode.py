"""One raw sample (a dict of member bytes) -> tensors, or a `Skip` naming why it cannot be used.

Only the members named in WANTED_MEMBERS are ever read from a tar, and they are decoded here as images, UTF-8 text or
integers: a shard is untrusted input, so nothing is unpickled (webdataset's default decoders would unpickle .pyd).
Work per sample is bounded by data.limits: a member left unread for its size (None, see tars.py) skips its sample, an
image is measured from its header before it is decoded, and a caption is cut before it is tokenised.
"""
import io
import warnings

import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from pretrain.data import stats
from pretrain.data.config import Limits
from pretrain.data.rng import seeded_global_rngs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # by content, whatever the extension says; no other PIL plugin is tried
WANTED_MEMBERS = frozenset(IMAGE_EXTENSIONS + ("txt", "cls"))
NO_LABEL = -1  # image-text evaluation samples without KEY.cls


class LabelOutOfRange(ValueError):
    """Not a skip: a label past num_classes means the shards and the config disagree, which no skip can mend."""


class Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_wanted_member(name: str) -> bool:
    """Select tar members by extension, case-insensitively, as webdataset groups them."""
    extension = base_plus_ext(name)[1]
    return extension is not None and extension.lower() in WANTED_MEMBERS


def check_member_sizes(sample: dict) -> None:
    """A member that tars.py left unread for its size is None: the sample cannot be used."""
    if any(value is None for key, value in sample.items() if not key.startswith("__")):
        raise Skip(stats.OVERSIZED_MEMBER)


def open_image(data: bytes) -> Image.Image:
    """Read the header only. PIL warns, then raises, past its own pixel limit: both make the image a skip, so its
    warning can never let a bomb through whatever limits.image_pixels says."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise Skip(stats.OVERSIZED_IMAGE) from error
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
        raise Skip(stats.BAD_IMAGE) from error


def read_image(sample: dict, max_pixels: int) -> Image.Image:
    data = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if data is None:
        raise Skip(stats.MISSING_IMAGE)
    with open_image(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise Skip(stats.OVERSIZED_IMAGE)
        try:
            return image.convert("RGB")  # decodes fully, so a truncated file fails here, not in a transform
        except Exception as error:
            raise Skip(stats.BAD_IMAGE) from error


def read_caption(sample: dict, max_chars: int) -> tuple[str, bool]:
    """The caption, cut to max_chars, and whether it was cut."""
    try:
        caption = sample["txt"].decode("utf-8").strip()
    except (KeyError, UnicodeDecodeError) as error:
        raise Skip(stats.MISSING_CAPTION) from error
    if not caption:
        raise Skip(stats.MISSING_CAPTION)
    return caption[:max_chars], len(caption) > max_chars


def read_label(sample: dict, num_classes: int | None = None) -> int:
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (KeyError, UnicodeDecodeError, ValueError) as error:
        raise Skip(stats.BAD_LABEL) from error
    if num_classes is not None and not 0 <= label < num_classes:
        raise LabelOutOfRange(f"label {label} is outside num_classes {num_classes}")
    return label


class SampleDecoder:
    """Decodes and augments one sample; augmentation randomness comes from the seed given with the sample.
    A kept sample that was altered lists why under "__altered__" (reasons from stats.NOT_SKIPS)."""

    def __init__(self, sample_format: str, transform, tokenizer=None, evaluation: bool = False,
                 uses_numpy: bool = False, limits: Limits | None = None, num_classes: int | None = None):
        self.format = sample_format
        self.num_classes = num_classes
        self.transform = transform
        self.tokenizer = tokenizer
        self.evaluation = evaluation  # image-text evaluation: a label or a caption, see eval_targets
        self.uses_numpy = uses_numpy
        self.limits = limits or Limits()

    def __call__(self, sample: dict, seed: int) -> dict:
        check_member_sizes(sample)
        if self.format == "image-text" and self.evaluation:
            out = self.eval_targets(sample)
        elif self.format == "image-text":
            out = self.caption(sample)
        else:
            out = {"label": read_label(sample, self.num_classes)}
        image = read_image(sample, self.limits.image_pixels)
        with seeded_global_rngs(seed, self.uses_numpy):
            out["image"] = self.transform(image)
        return out

    def caption(self, sample: dict) -> dict:
        caption, truncated = read_caption(sample, self.limits.caption_chars)
        out = {"text": self.tokenizer([caption])[0]}
        if truncated:
            out["__altered__"] = (stats.TRUNCATED_CAPTION,)
        return out

    def eval_targets(self, sample: dict) -> dict:
        """What an image-text evaluation scores: zero-shot the label (ImageNet-style val shards have no caption),
        retrieval the caption (LAION-style ones have no label). A sample with neither is skipped; "has_text" tells
        retrieval which rows hold a real caption."""
        label = read_label(sample) if "cls" in sample else NO_LABEL
        try:
            out = {**self.caption(sample), "has_text": True}
        except Skip:
            if label == NO_LABEL:
                raise
            out = {"text": torch.zeros_like(self.tokenizer([""])[0]), "has_text": False}
        return {**out, "label": label}


def collate(samples: list[dict]) -> dict:
    batch = {"image": torch.stack([s["image"] for s in samples])}
    if "text" in samples[0]:
        batch["text"] = torch.stack([s["text"] for s in samples])
    if "has_text" in samples[0]:
        batch["has_text"] = torch.tensor([s["has_text"] for s in samples])
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch
