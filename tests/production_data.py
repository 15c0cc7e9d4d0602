"""Data in the production formats, written by the tests: img2dataset-style image-text sources ({00000..N}.tar of
KEY.jpg + KEY.txt + KEY.json, with 0000N_stats.json beside each shard), ImageNet-22K- and ImageNet-1K-style
classification shards (KEY.jpg + KEY.cls). The images are real photographs' stand-ins: scikit-learn's bundled
handwritten digits, upscaled and saved as JPEGs (no download)."""
import io
import json
import re
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image


def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images


def jpeg(pixels: np.ndarray, size: int = 48) -> bytes:
    image = Image.fromarray(np.uint8(pixels * (255 / 16))).resize((size, size), Image.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as tar:
        for sample in samples:
            tar.write(sample)


def img2dataset_source(folder: Path, shards: int, per_shard: int, captions: bool = True, offset: int = 0,
                       name_digits: int = 5) -> None:
    """{00000..}.tar with img2dataset's members and 0000N_stats.json (its "successes" is the shard's sample count)."""
    digits = _digits()
    for shard in range(shards):
        samples = []
        for index in range(per_shard):
            n = offset + shard * per_shard + index
            key = f"{shard:05d}{index:04d}"
            sample = {"__key__": key, "jpg": jpeg(digits[n % len(digits)]),
                      "json": json.dumps({"key": key, "status": "success"}).encode()}
            if captions:
                sample["txt"] = f"a handwritten digit, picture {n}".encode()
            samples.append(sample)
        name = f"{shard:0{name_digits}d}"
        _write_tar(folder / f"{name}.tar", samples)
        stats = {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats))


def classification_shards(folder: Path, prefix: str, shards: int, per_shard: int, labels, digits_width: int) -> None:
    """PREFIX-{0..0}.tar (digits_width digits) of KEY.jpg + KEY.cls, with their counts in the folder's sizes.json
    (as `pretrain shards make` writes it; true epochs need it); labels(n) gives sample n's class."""
    digits = _digits()
    sizes_file = folder / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    for shard in range(shards):
        samples = []
        for index in range(per_shard):
            n = shard * per_shard + index
            samples.append({"__key__": f"{prefix}{shard:04d}_{index:04d}", "jpg": jpeg(digits[n % len(digits)]),
                            "cls": str(labels(n)).encode()})
        name = f"{prefix}-{shard:0{digits_width}d}.tar"
        _write_tar(folder / name, samples)
        sizes[name] = per_shard
    sizes_file.write_text(json.dumps(sizes))


RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def few_shards(pattern: str, count: int) -> str:
    """The pattern with its brace range cut to its first `count` shards, digits kept."""
    def cut(match):
        first = match.group(1)
        return f"{{{first}..{int(first) + count - 1:0{len(first)}d}}}"
    return RANGE.sub(cut, pattern)


def write_production_data(root: Path) -> None:
    """What the H and G schedules read, in their layouts and names, a few shards of each, under ROOT (for
    /datasets): laion400m, yfcc15m and cc12m (img2dataset), imagenet22k-wds (labels up to 21840), imagenet1k-wds."""
    img2dataset_source(root / "laion400m", shards=3, per_shard=6)
    img2dataset_source(root / "yfcc15m", shards=3, per_shard=6, name_digits=4, offset=100)
    img2dataset_source(root / "cc12m", shards=3, per_shard=6, name_digits=4, offset=200)
    classification_shards(root / "imagenet22k-wds", "train", 2, 8, lambda n: (n * 2731) % 21841 if n else 21840, 5)
    classification_shards(root / "imagenet22k-wds", "val", 2, 8, lambda n: (n * 2731) % 21841, 4)
    classification_shards(root / "imagenet1k-wds", "train", 2, 8, lambda n: (n * 379) % 1000 if n else 999, 4)
    classification_shards(root / "imagenet1k-wds", "val", 2, 8, lambda n: (n * 379) % 1000, 4)


def production_configs(out: Path, data_root: Path, shards: int = 2) -> Path:
    """A copy of configs/ in which only the data paths are replaced: /datasets -> data_root, each shard range cut to
    its first `shards`. Returns the copy's folder (out/configs)."""
    repo = Path(__file__).resolve().parent.parent
    for source in (repo / "configs").rglob("*.yaml"):
        target = out / "configs" / source.relative_to(repo / "configs")
        target.parent.mkdir(parents=True, exist_ok=True)
        text = source.read_text()
        text = re.sub(r'"/datasets/([^"]+)"', lambda m: f'"{data_root}/{few_shards(m.group(1), shards)}"', text)
        target.write_text(text)
    return out / "configs"
