"""The rehearsal's data checks: a bounded read spread over each source's shards (the first, middle and last few),
run before any rank starts. Each problem is one line naming the stage, the shard pattern and the reason."""
import collections
import itertools

from pretrain.data import stats
from pretrain.data.decode import NO_LABEL, LabelOutOfRange, Skip
from pretrain.data.loader import make_decoder
from pretrain.data.shards import expand_shards
from pretrain.data.tars import shard_samples

SHARDS_PER_SOURCE = 3
SAMPLES_PER_SHARD = 8


def spread(urls: list[str], count: int = SHARDS_PER_SOURCE) -> list[str]:
    """`count` shards evenly spaced over the list, first and last included."""
    if len(urls) <= count:
        return urls
    return [urls[round(i * (len(urls) - 1) / (count - 1))] for i in range(count)]


def read_pattern(pattern: str, data, train: bool) -> tuple[list[int | None], collections.Counter]:
    """(label, captioned) of each usable sample read (label None for image-text training samples; captioned False
    for an image-text val sample with a label and no caption) and the skips by reason; a label outside num_classes
    raises ValueError naming the shard and key."""
    decoder = make_decoder(data, train)
    usable, skips, counter = [], collections.Counter(), stats.SkipCounter()
    for url in spread(expand_shards(pattern)):
        for sample in itertools.islice(shard_samples(url, data.limits.member_bytes, counter), SAMPLES_PER_SHARD):
            try:
                decoded = decoder(sample, seed=0)
            except LabelOutOfRange as error:
                raise ValueError(f"{error}: shard {url}, key {sample['__key__']}") from None
            except Skip as skip:
                skips[skip.reason] += 1
                continue
            usable.append((decoded.get("label"), decoded.get("has_text", "text" in decoded)))
        skips.update(counter.drain())
    return usable, skips


def _skips(skips: collections.Counter) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skips.items())) or "nothing read"


def check_stage(name: str, cfg, zero_shot_classes: int | None) -> list[str]:
    """The problems found in the data the stage names (empty: none). zero_shot_classes: how many classes the
    image-text stage's zero-shot evaluation scores (None for classification, or an image-text stage's retrieval)."""
    problems = []
    data = cfg.data
    for source in data.train:
        try:
            usable, skips = read_pattern(source.shards, data, train=True)
        except (OSError, ValueError) as error:
            problems.append(f"stage {name}: source {source.shards}: {error}")
            continue
        if not usable:
            problems.append(f"stage {name}: source {source.shards}: no usable {data.format} sample in "
                            f"{len(spread(expand_shards(source.shards)))} shards read ({_skips(skips)})")
    if data.val:
        problems += _check_val(name, cfg, zero_shot_classes)
    return problems


def _check_val(name: str, cfg, zero_shot_classes: int | None) -> list[str]:
    where = f"stage {name}: val {cfg.data.val}"
    try:
        usable, skips = read_pattern(cfg.data.val, cfg.data, train=False)
    except (OSError, ValueError) as error:
        return [f"{where}: {error}"]
    if cfg.task == "image-text" and zero_shot_classes is None:  # retrieval: captions, no labels
        captioned = [label for label, has_text in usable if has_text]
        return [] if captioned else [f"{where}: no captioned image-text sample to evaluate on ({_skips(skips)})"]
    labels = [label for label, _ in usable if label is not None and label != NO_LABEL]
    if not labels:
        return [f"{where}: no labelled sample to evaluate on ({len(usable)} usable without a label; "
                f"{_skips(skips)})"]
    if zero_shot_classes is not None and max(labels) >= zero_shot_classes:
        return [f"{where}: label {max(labels)} is not among the zero-shot evaluation's {zero_shot_classes} classes"]
    return []
