"""Shard lists: expansion and a bounded start-up check, and shard sizes."""
import json
import os
import re

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


def shard_sizes(urls: list[str]) -> list[int | None]:
    """Samples in each shard (None: unknown), from sizes.json ({"00000.tar": n}) beside local shards, read once per
    folder, or from img2dataset's 00000_stats.json."""
    folders: dict[str, dict] = {}
    return [shard_size(url, folders) for url in urls]


def shard_size(url: str, folders: dict[str, dict]) -> int | None:
    if not is_local(url):
        return None
    folder, name = os.path.split(local_path(url))
    if folder not in folders:
        sizes_file = os.path.join(folder, "sizes.json")
        folders[folder] = json.loads(open(sizes_file).read()) if os.path.isfile(sizes_file) else {}
    if name in folders[folder]:
        return int(folders[folder][name])
    stats_file = os.path.splitext(local_path(url))[0] + "_stats.json"
    if os.path.isfile(stats_file):
        with open(stats_file) as f:
            return int(json.load(f)["successes"])
    return None
