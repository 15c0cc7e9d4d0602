"""What the data layer reads to resume, to start and to evaluate (docs/benchmarks.md, "Data at scale").

    python tools/bench_resume.py [--shards 40] [--per-shard 100] [--buffer 200]

Prints one JSON line per figure: raw samples read and seconds from a resume's start to its first batch at two
positions of an epoch; the start-up shard check at 44k paths (empty files under a temp folder); the raw samples each
rank reads for one evaluation. Runs in one process (workers=0) so the reads can be counted; on this repository's
previous commits the same script measures the replayed resume and the every-rank evaluation.
"""
import argparse
import collections
import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pretrain.data import DataConfig, build_eval_loader, build_train_loader, tars
from pretrain.data import shards as shard_lists

READS = collections.Counter()


def counting(read):
    def counted(url, max_bytes, counter, *offset):
        for sample in read(url, max_bytes, counter, *offset):
            READS[url] += 1
            yield sample

    return counted


def write_shards(folder: Path, n: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    path = folder / "image.jpg"
    image.save(path)
    jpg = path.read_bytes()
    for shard in range(n):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i in range(per_shard):
                tar.write({"__key__": f"{shard:05d}{i:05d}", "jpg": jpg, "cls": str(i % 10)})
    (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": per_shard for s in range(n)}))
    return str(folder / f"{{00000..{n - 1:05d}}}.tar")


def resume_cost(cfg: DataConfig, step: int) -> dict:
    loader = build_train_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    for _ in itertools.islice(loader, step):
        pass
    state = loader.state_dict()
    READS.clear()
    start = time.perf_counter()
    resumed = build_train_loader(cfg, rank=0, world_size=1, batch_size=8, seed=0)
    resumed.load_state_dict(state)
    next(iter(resumed))
    return {"figure": "resume", "resampled": cfg.resampled, "step": step, "samples_into_epoch": step * 8,
            "raw_samples_read": sum(READS.values()), "seconds": round(time.perf_counter() - start, 3)}


def startup_check(folder: Path, n: int = 44_000) -> dict:
    for i in range(n):
        (folder / f"{i:06d}.tar").touch()
    pattern = str(folder / f"{{000000..{n - 1:06d}}}.tar")
    start = time.perf_counter()
    urls = shard_lists.expand_shards(pattern)
    return {"figure": "start-up check", "shard_paths": len(urls), "seconds": round(time.perf_counter() - start, 3)}


def eval_reads(pattern: str, world_size: int) -> dict:
    cfg = DataConfig(format="classification", train=[{"shards": pattern}], val=pattern, workers=0, image_size=16)
    per_rank = []
    for rank in range(world_size):
        READS.clear()
        for _ in build_eval_loader(cfg, rank=rank, world_size=world_size, batch_size=64):
            pass
        per_rank.append(sum(READS.values()))
    return {"figure": "evaluation", "world_size": world_size, "raw_samples_read_per_rank": per_rank}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--buffer", type=int, default=200)
    args = parser.parse_args()
    tars.shard_samples = counting(tars.shard_samples)
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.shards, args.per_shard)
        for resampled in (True, False):
            cfg = DataConfig(format="classification", train=[{"shards": pattern}], resampled=resampled, workers=0,
                             image_size=16, shuffle_buffer=args.buffer)
            for step in (25, 250):
                print(json.dumps(resume_cost(cfg, step)), flush=True)
        print(json.dumps(eval_reads(pattern, 4)), flush=True)
        (Path(tmp) / "many").mkdir()
        print(json.dumps(startup_check(Path(tmp) / "many")), flush=True)


if __name__ == "__main__":
    main()
