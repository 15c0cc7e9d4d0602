"""Write samples into tar shards in img2dataset's layout ({00000..N}.tar, KEY.ext members) plus sizes.json."""
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice

import webdataset as wds


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def write_shards(samples: Iterable[dict], out_dir: str, samples_per_shard: int = 10_000) -> str:
    """Write samples (dicts of extension -> bytes, str, int or dict, without __key__) as numbered shards and
    sizes.json; returns the brace pattern of the shards. Keys are shard id + index, as img2dataset makes them."""
    os.makedirs(out_dir, exist_ok=True)
    index_digits = max(4, len(str(samples_per_shard - 1)))
    sizes = {}
    for shard_id, chunk in enumerate(_chunks(samples, samples_per_shard)):
        name = f"{shard_id:05d}.tar"
        # a fixed mtime makes the shards byte-identical from run to run
        with wds.TarWriter(os.path.join(out_dir, name), mtime=0) as tar:
            for index, sample in enumerate(chunk):
                tar.write({"__key__": f"{shard_id:05d}{index:0{index_digits}d}", **sample})
        sizes[name] = len(chunk)
    if not sizes:
        raise ValueError(f"no samples to write to {out_dir}")
    with open(os.path.join(out_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=0)
    last = len(sizes) - 1
    return os.path.join(out_dir, f"{{00000..{last:05d}}}.tar" if last else "00000.tar")
