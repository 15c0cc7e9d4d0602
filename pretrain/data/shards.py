"""Shard lists: expansion and start-up checks, epoch sizes, and the per-worker shard streams (resampled or split)."""
import json
import os
import random
import re
from collections.abc import Iterator

from braceexpand import UnbalancedBracesError
from webdataset.shardlists import expand_urls

GLOB = re.compile(r"[*?[]")
GLOB_HINT = "; shell globs (*, ?, [...]) are not expanded: brace patterns are supported, e.g. 'train-{0000..1023}.tar'"
REMOTE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # pipe:, http:, s3:, gs: ... but not a local path


def is_local(url: str) -> bool:
    return url.startswith("file:") or not REMOTE.match(url)


def local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


CHECKED_PATHS = 64
"""Local shards stat'ed at start-up per pattern, spread over it (first and last included). A production source has
~44k shards and 1024 ranks start at once: stat'ing all of them on every rank is ~45M metadata calls on a shared file
system. A typo in the pattern misses every shard, so a sample finds it; a shard missing later is met when it is read,
counted as unreadable_shard and named in the log (and by the error that ends a source of failing shards)."""


def spread(items: list, n: int) -> list:
    """At most n items, evenly spaced, the first and the last among them."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a pattern ('::' joins several) and fail fast, naming the path, if a checked local shard is missing
    (CHECKED_PATHS of them). Remote shards (pipe:, http:) cannot be checked without opening them."""
    try:
        urls = expand_urls(pattern)
    except UnbalancedBracesError as error:
        raise ValueError(f"shard pattern {pattern!r} has unbalanced braces") from error
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    for url in spread(urls, CHECKED_PATHS):
        if is_local(url) and not os.path.isfile(local_path(url)):
            hint = GLOB_HINT if GLOB.search(local_path(url)) else ""
            raise FileNotFoundError(f"shard not found: {local_path(url)} (from pattern {pattern!r}){hint}")
    return urls


def shard_size(url: str) -> int | None:
    """Samples in a local shard, from sizes.json ({"00000.tar": n}) beside it, or img2dataset's 00000_stats.json."""
    if not is_local(url):
        return None
    path = local_path(url)
    folder, name = os.path.split(path)
    sizes_file = os.path.join(folder, "sizes.json")
    if os.path.isfile(sizes_file):
        with open(sizes_file) as f:
            sizes = json.load(f)
        if name in sizes:
            return int(sizes[name])
    stats_file = os.path.splitext(path)[0] + "_stats.json"
    if os.path.isfile(stats_file):
        with open(stats_file) as f:
            return int(json.load(f)["successes"])
    return None


def total_size(urls: list[str]) -> int | None:
    """Samples in all the shards, or None if any shard's size is unknown."""
    sizes = [shard_size(url) for url in urls]
    return None if None in sizes else sum(sizes)


def check_enough_shards(urls: list[str], world_size: int, streams: int, pattern: str) -> None:
    """Splitting shards over ranks x workers leaves some of them idle (and the epoch uneven) with too few shards."""
    if len(urls) < world_size * streams:
        raise ValueError(
            f"{pattern!r} has {len(urls)} shards, fewer than ranks x workers = {world_size} x {streams}; "
            "use more shards, fewer workers, or data.resampled: true")


def resampled_shards(urls: list[str], seed: int) -> Iterator[dict]:
    """Shards drawn with replacement, forever: every rank and worker always has data, whatever the shard count."""
    rng = random.Random(seed)
    while True:
        yield {"url": rng.choice(urls)}


def split_shards(urls: list[str], epoch_seed: int, rank: int, world_size: int, stream: int, streams: int,
                 pass_index: int) -> list[str]:
    """This rank's and stream's share of the epoch's shuffled shard list, without replacement. The share is read again
    (pass 1, 2, ...), in another order, if the epoch asks for more samples than it holds."""
    order = list(urls)
    random.Random(epoch_seed).shuffle(order)  # the same on every rank, so the shares are disjoint
    share = order[rank::world_size][stream::streams]
    if pass_index:
        random.Random(epoch_seed + pass_index).shuffle(share)
    return share
