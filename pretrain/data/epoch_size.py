"""The epoch's length in samples, from the config or counted from the shards' sizes.json / img2dataset *_stats.json,
the comparison of the two, and the shard sizes true epochs need; all run before any rank starts."""
from pretrain.data.config import DataConfig
from pretrain.data.shards import expand_shards, shard_sizes


def counted_samples(cfg: DataConfig) -> tuple[int | None, str | None]:
    """Samples in every training shard, or None and the first shard without a size (a remote one has none)."""
    total = 0
    for source in cfg.train:
        urls = expand_shards(source.shards)
        for url, size in zip(urls, shard_sizes(urls)):
            if size is None:
                return None, url
            total += size
    return total, None


def epoch_samples(cfg: DataConfig) -> int:
    """data.samples_per_epoch, or when it is null the shards' count; an error naming a shard without a size."""
    if cfg.samples_per_epoch:
        return cfg.samples_per_epoch
    total, unsized = counted_samples(cfg)
    if total is None:
        raise ValueError(f"data.samples_per_epoch is null and shard {unsized} has no size in sizes.json or a "
                         "*_stats.json beside it; set data.samples_per_epoch")
    return total


def disagreement(cfg: DataConfig) -> str | None:
    """A warning when data.samples_per_epoch is not what the shards' stats files count (None if they agree or cannot
    count)."""
    if not cfg.samples_per_epoch or not cfg.train:
        return None
    total, _ = counted_samples(cfg)
    if total is None or total == cfg.samples_per_epoch:
        return None
    return (f"data.samples_per_epoch is {cfg.samples_per_epoch:,} but the shards' sizes.json/*_stats.json count "
            f"{total:,} samples")


def epoch_sizes(cfg: DataConfig, sources: list[list[str]]) -> list[int] | None:
    """The shards' sizes, which true epochs (resampled: false) cut into segments; None when resampling."""
    if cfg.resampled:
        return None
    if len(sources) != 1:
        raise ValueError("data.resampled: false reads true epochs of one source; mix sources with resampled: true")
    sizes = shard_sizes(sources[0])
    unknown = [url for url, size in zip(sources[0], sizes) if size is None]
    if unknown:
        raise ValueError(f"data.resampled: false needs every shard's size (sizes.json or *_stats.json beside it); "
                         f"{len(unknown)} have none, e.g. {unknown[0]}")
    return sizes
