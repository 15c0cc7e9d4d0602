"""`pretrain data check`: run shards once through reading, decoding, transforms, tokenisation and batching, and count."""
import collections
import time
from collections.abc import Iterator

from pretrain.data import shards
from pretrain.data.config import DataConfig, Limits
from pretrain.data.loader import EvalStream, make_loader
from pretrain.data.stats import NOT_SKIPS, UNREADABLE_SHARD, SkipCounter, skipped_total


class CheckStream(EvalStream):
    """Per batch only the counts; then a last record, so skips after a worker's last batch are counted too."""

    def __iter__(self) -> Iterator[dict]:
        counter = SkipCounter()
        for batch in self.batches(counter):
            yield {"samples": len(batch["image"]), "skipped": batch["skipped"]}
        yield {"samples": 0, "skipped": counter.drain()}


def check_shards(pattern: str, sample_format: str, *, workers: int = 0, batch_size: int = 64, image_size: int = 224,
                 limits: Limits | dict | None = None) -> dict:
    """Counts for one pass over the shards (one rank), under the training's data.limits (defaults unless given).
    Samples kept but altered (a truncated caption) are counted apart from the skips. Raises FileNotFoundError or
    ValueError if the shards cannot be listed or a limit is invalid."""
    cfg = DataConfig(format=sample_format, train=[{"shards": pattern}], val=pattern, workers=workers,
                     image_size=image_size, limits=limits or {})
    urls = shards.expand_shards(pattern)
    dataset = CheckStream(cfg, urls, batch_size=batch_size)
    samples, reasons = 0, collections.Counter()
    start = time.perf_counter()
    for record in make_loader(dataset, min(workers, len(urls))):
        samples += record["samples"]
        reasons.update(record["skipped"])
    seconds = time.perf_counter() - start
    by_reason = dict(sorted(reasons.items()))
    return {"shards": len(urls), "samples": samples, "skipped": skipped_total(by_reason),
            "skipped_by_reason": {k: v for k, v in by_reason.items() if k not in NOT_SKIPS},
            "altered_by_reason": {k: v for k, v in by_reason.items() if k in NOT_SKIPS},
            "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1) if seconds else None}


def is_healthy(report: dict) -> bool:
    """Every shard could be read, and some sample survived."""
    return report["samples"] > 0 and report["skipped_by_reason"].get(UNREADABLE_SHARD, 0) == 0
