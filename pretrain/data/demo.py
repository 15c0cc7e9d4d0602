"""The demo data set: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), upscaled to RGB
PNGs, as image-text shards with templated captions and as classification shards, with a fixed held-out split."""
import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from pretrain.data.writer import write_shards

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {} written by hand",
                     "a small blurry picture of a {}")
ZERO_SHOT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.", "a picture of the number {}.")
VAL_FRACTION = 0.2
SAMPLES_PER_SHARD = 180  # 8 train shards: enough for 2 ranks x 4 workers without resampling
SPLIT_SEED = 0
FORMAT_VERSION = 1


def zero_shot_classes() -> tuple[list[str], list[str]]:
    """Class names in label order and the prompt templates ("...{}...") for zero-shot evaluation on the demo set."""
    return list(DIGIT_NAMES), list(ZERO_SHOT_TEMPLATES)


def _png(pixels: np.ndarray, image_size: int) -> bytes:
    grey = Image.fromarray(np.uint8(pixels * (255 / 16)))  # digits are 0..16 intensities
    buffer = io.BytesIO()
    grey.resize((image_size, image_size), Image.BILINEAR).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def split_indices(n: int) -> dict[str, np.ndarray]:
    """A fixed permutation: the first VAL_FRACTION is held out for evaluation."""
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_val = round(n * VAL_FRACTION)
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val])}


def demo_samples(image_size: int) -> dict[str, dict[str, list[dict]]]:
    """{sample_format: {split: samples}}; image-text samples carry KEY.cls too, for zero-shot accuracy."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {"image-text": {}, "classification": {}}
    for split, indices in split_indices(len(digits.target)).items():
        text_samples, cls_samples = [], []
        for i in indices:
            label = int(digits.target[i])
            png = _png(digits.images[i], image_size)
            caption = CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(DIGIT_NAMES[label])
            meta = {"url": f"sklearn://digits/{i}", "caption": caption, "status": "success", "width": image_size,
                    "height": image_size, "original_width": 8, "original_height": 8}
            text_samples.append({"png": png, "txt": caption, "json": meta, "cls": label})
            cls_samples.append({"png": png, "cls": label})
        out["image-text"][split], out["classification"][split] = text_samples, cls_samples
    return out


def _write_all(root: str, image_size: int) -> dict[str, dict[str, str]]:
    return {
        sample_format: {split: write_shards(samples, os.path.join(root, sample_format, split), SAMPLES_PER_SHARD)
               for split, samples in splits.items()}
        for sample_format, splits in demo_samples(image_size).items()
    }


def _patterns(root: str, meta: dict) -> dict[str, dict[str, str]]:
    return {sample_format: {split: os.path.join(root, pattern) for split, pattern in splits.items()}
            for sample_format, splits in meta["patterns"].items()}


def ensure_demo_shards(root: str, image_size: int = 32) -> dict[str, dict[str, str]]:
    """Build the demo shards under `root` unless there already; returns {sample_format: {"train"|"val": shard pattern}}.

    Several ranks may call this at once: each builds in a temporary folder and the first to rename it into place wins.
    """
    meta_file = os.path.join(root, "demo.json")
    wanted = {"version": FORMAT_VERSION, "image_size": image_size}
    if not os.path.isfile(meta_file):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".demo-", dir=parent)
        patterns = _write_all(scratch, image_size)
        relative = {sample_format: {split: os.path.relpath(p, scratch) for split, p in splits.items()}
                    for sample_format, splits in patterns.items()}
        with open(os.path.join(scratch, "demo.json"), "w") as f:
            json.dump({**wanted, "patterns": relative}, f, indent=1)
        try:
            os.rename(scratch, root)
        except OSError:  # another rank got there first (or root is a non-empty folder, reported below)
            shutil.rmtree(scratch)
    if not os.path.isfile(meta_file):
        raise FileExistsError(f"{root} exists but holds no demo shards (no demo.json); remove it or use another root")
    with open(meta_file) as f:
        meta = json.load(f)
    if {k: meta.get(k) for k in wanted} != wanted:
        raise ValueError(f"demo shards in {root} were built with {meta}; wanted {wanted}: remove {root} to rebuild")
    return _patterns(root, meta)
