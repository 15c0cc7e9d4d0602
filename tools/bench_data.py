"""Data pipeline throughput, ours beside open_clip's own webdataset pipeline, on the same shards.

Both read the same img2dataset-layout shards of 256x256 JPEGs with captions, in resampled (pretraining) mode, and do
decode + RandomResizedCrop(224, scale 0.9-1, bicubic) + CLIP BPE tokenise + batch. Ours is built with flips off and
open_clip's crop scale; open_clip's workers also normalise to fp32, ours send uint8 and leave the normalisation to the
device (pretrain/data/device_batch.py), so ours does that much less per sample. open_clip's pipeline is `open_clip_train.data.
get_wds_dataset`'s stage list rebuilt from its own pieces (see open_clip_pipeline for the one swap), with its
preprocess `open_clip.image_transform(224, is_train=True)` and the same tokenizer.

Per core: `--workers 0` runs each pipeline in this process with one torch thread, so samples/s is per CPU core.
Images: smooth random colour fields (8x8 noise, bicubic-upscaled) with film grain, JPEG quality 90; ~20 KB each,
about what img2dataset stores at 256 px. Captions: 5-25 words drawn from a fixed vocabulary.

    python tools/bench_data.py --samples 3000 --repeats 3
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time
import types

import numpy as np
import torch
from PIL import Image

WORDS = ("a photo of the small large red blue green old new dog cat car tree house river mountain city street man "
         "woman child playing sitting standing on in with near beside under over wooden metal bright dark sunny "
         "rainy evening morning beautiful view portrait close-up landscape vintage modern black white").split()


def natural_image(rng: np.random.Generator, size: int = 256) -> bytes:
    field = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    pixels = np.clip(np.asarray(field, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_shards(folder: str, samples: int, per_shard: int = 500) -> str:
    from pretrain.data.writer import write_shards

    rng = np.random.default_rng(0)

    def generate():
        for i in range(samples):
            caption = " ".join(rng.choice(WORDS, rng.integers(5, 26)))
            yield {"jpg": natural_image(rng), "txt": caption, "json": {"caption": caption, "status": "success"}}

    return write_shards(generate(), folder, per_shard)


def time_batches(loader, n_batches: int, batch_size: int) -> float:
    """Samples/s after the first batch (which pays for start-up: worker fork, shuffle-buffer fill)."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(n_batches - 1):
        next(iterator)
    return (n_batches - 1) * batch_size / (time.perf_counter() - start)


def ours(pattern: str, samples: int, batch_size: int, workers: int) -> float:
    from pretrain.data import DataConfig, build_train_loader

    cfg = DataConfig(format="image-text", train=[{"shards": pattern}], samples_per_epoch=samples, workers=workers,
                     image_size=224, augment={"crop_scale": (0.9, 1.0), "hflip": 0.0})
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=batch_size, seed=0)
    return time_batches(loader, loader.steps_per_epoch, batch_size)


def import_open_clip_train_data():
    """open_clip_train.data imports pandas for its CSV dataset only; pandas is no dependency here, so an empty module
    stands in while it is imported, and is removed again (torch probes for pandas, and must not find the stand-in)."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        sys.modules["pandas"] = types.ModuleType("pandas")
        try:
            from open_clip_train import data
        finally:
            del sys.modules["pandas"]
        return data
    from open_clip_train import data
    return data


def open_clip_pipeline(pattern: str, samples: int, batch_size: int, workers: int) -> float:
    """open_clip_train.data.get_wds_dataset's training pipeline, resampled, stage for stage, from its own pieces; only
    its tarfile_to_samples_nothrow is swapped for webdataset's tarfile_to_samples (open_clip's own comment names it
    as the equivalent): it fails on the end-of-shard marker webdataset 1.0 yields (KeyError: 'fname')."""
    import open_clip
    import webdataset as wds

    from pretrain.data import get_tokenizer

    oc = import_open_clip_train_data()

    preprocess, tokenizer = open_clip.image_transform(224, is_train=True), get_tokenizer(77)
    dataset = wds.DataPipeline(
        oc.ResampledShards2(pattern, deterministic=True, epoch=oc.SharedEpoch(0)),
        wds.tarfile_to_samples(handler=oc.log_and_continue),
        wds.shuffle(bufsize=oc._SAMPLE_SHUFFLE_SIZE, initial=oc._SAMPLE_SHUFFLE_INITIAL),
        wds.select(oc.filter_no_caption_or_no_image),
        wds.decode("pilrgb", handler=oc.log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    )
    n_batches = samples // batch_size // max(1, workers)  # per worker, as get_wds_dataset(floor=True) computes it
    loader = wds.WebLoader(dataset.with_epoch(n_batches), batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    return time_batches(loader, n_batches * max(1, workers), batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3000, help="samples per timed epoch, and in the shards")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=0, help="0: one core, in this process")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best is reported")
    parser.add_argument("--shards", help="existing shard pattern (default: generate them in a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        pattern = args.shards or make_shards(folder, args.samples)
        runs = {"ours": [], "open_clip": []}
        for _ in range(args.repeats):  # alternate, so load from elsewhere on the machine hits both alike
            runs["ours"].append(ours(pattern, args.samples, args.batch_size, args.workers))
            runs["open_clip"].append(open_clip_pipeline(pattern, args.samples, args.batch_size, args.workers))
    cores = max(1, args.workers)
    result = {name: {"best_samples_per_s": round(max(r), 1), "per_core": round(max(r) / cores, 1),
                     "runs": [round(x, 1) for x in r]} for name, r in runs.items()}
    print(json.dumps({"workers": args.workers, "samples": args.samples, "batch_size": args.batch_size,
                      "cpu": os.cpu_count(), "torch": torch.__version__, **result}))


if __name__ == "__main__":
    main()
