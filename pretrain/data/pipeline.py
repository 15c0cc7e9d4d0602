"""The webdataset stage lists. Each is built inside the worker that runs it, for one (epoch, rank, stream)."""
import functools
import itertools
import random
from collections.abc import Callable, Iterable, Iterator

import webdataset as wds

from pretrain.data import shards
from pretrain.data.config import Limits
from pretrain.data.decode import LabelOutOfRange, Skip, SampleDecoder, collate
from pretrain.data.rng import derive_seed
from pretrain.data.stats import SkipCounter
from pretrain.data.tars import ShardFailures, read_tars


def mix(sources: list[Iterable[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    """Interleave endless sample streams, picking the source of each sample by weight."""
    iterators = [iter(source) for source in sources]
    while True:
        (chosen,) = rng.choices(iterators, weights)
        yield next(chosen)


def fast_forward(samples: Iterable[dict], start: int, counter: SkipCounter) -> Iterator[dict]:
    """Number the (shuffled) raw samples and drop the first `start` undecoded: the cheap way back to a resume point.
    Skips counted while replaying were reported before the interruption, so they are discarded at the resume point:
    just after pulling sample start-1, exactly where the interrupted run drained its counts into its last batch."""
    for index, sample in enumerate(samples):
        if index < start:
            if index == start - 1:
                counter.discard()
            continue
        sample["__index__"] = index
        yield sample


MAX_SKIPS_IN_A_ROW = 10_000


def decode(samples: Iterable[dict], decoder: SampleDecoder, seed: int, counter: SkipCounter) -> Iterator[dict]:
    """Decoded samples; bad ones are counted and dropped. Endless streams of nothing but bad samples (a wrong task, or
    shards without a usable sample) would spin forever, so a long run of them is an error."""
    in_a_row = 0
    for sample in samples:
        try:
            decoded = decoder(sample, derive_seed(seed, sample.get("__index__", 0)))
        except LabelOutOfRange as error:
            raise ValueError(f"{error}: shard {sample['__url__']}, key {sample['__key__']}") from None
        except Skip as skip:
            counter.skip(skip.reason, f"{sample['__url__']}:{sample['__key__']}", skip.__cause__)
            in_a_row += 1
            if in_a_row == MAX_SKIPS_IN_A_ROW:
                raise RuntimeError(f"{in_a_row} samples in a row were unusable (last: {skip.reason} in "
                                   f"{sample['__url__']}); check data.task and the shards") from None
            continue
        in_a_row = 0
        for reason in decoded.pop("__altered__", ()):
            counter.note(reason, f"{sample['__url__']}:{sample['__key__']}")
        decoded["__index__"] = sample.get("__index__")
        yield decoded


def batches(samples: Iterable[dict], size: int, collation_fn, keep_partial: bool = False) -> Iterator[dict]:
    """Collate as soon as a batch is full. (wds.batched collates when the next sample arrives, which would move the
    skips met on the way into the earlier batch and make them depend on where a resumed run starts.)"""
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield collation_fn(batch)
            batch = []
    if batch and keep_partial:
        yield collation_fn(batch)


def batch_with_position(samples: list[dict], counter: SkipCounter) -> dict:
    """A batch, the raw-sample position after it (to resume from), and the skips since the previous batch."""
    return {**collate(samples), "position": samples[-1]["__index__"] + 1, "skipped": counter.drain()}


def batch_with_skips(samples: list[dict], counter: SkipCounter) -> dict:
    return {**collate(samples), "skipped": counter.drain()}


def take(items: Iterable, n: int) -> Iterator:
    return itertools.islice(items, n)


def source_samples(urls: list[str], *, read: Callable[[Iterable[dict]], Iterator[dict]], resampled: bool, seed: int,
                   epoch_seed: int, rank: int, world_size: int, stream: int, streams: int,
                   shuffle_buffer: int) -> Iterator[dict]:
    """Endless shuffled raw samples of one source for one stream: shards drawn with replacement (seeded per rank and
    stream), or passes over this rank's and stream's share of the epoch's shuffled shard list; a pass is shuffled on
    its own, so one pass over the shares of all ranks and streams holds every sample once. `read` (tars.read_tars)
    raises once too many shards in a row fail, which ends either loop on a source of broken shards."""
    # a fifth of the buffer fills before the first sample leaves, trading start-up time for early mixing
    shuffle = wds.shuffle(shuffle_buffer, initial=max(1, shuffle_buffer // 5), rng=random.Random(seed))
    if resampled:
        yield from wds.DataPipeline(functools.partial(shards.resampled_shards, urls, seed), read, shuffle)
        return
    for pass_index in itertools.count():
        share = shards.split_shards(urls, epoch_seed, rank, world_size, stream, streams, pass_index)
        yield from wds.DataPipeline(wds.SimpleShardList(share), read, shuffle)


def train_pipeline(*, sources: list[list[str]], names: list[str], weights: list[float], resampled: bool,
                   shuffle_buffer: int, limits: Limits, decoder: SampleDecoder, batch_size: int, n_batches: int,
                   start: int, seed: int, epoch: int, rank: int, world_size: int, stream: int, streams: int,
                   counter: SkipCounter) -> wds.DataPipeline:
    """`n_batches` batches of one stream of one epoch, from raw sample `start` on: a pure function of its arguments.
    `names` are the sources' patterns, for the error that ends a source of broken shards."""
    stream_seed = derive_seed(seed, epoch, rank, stream)
    per_source = [
        source_samples(urls, read=read_tars(counter, limits.member_bytes, ShardFailures(name, limits.shard_failures)),
                       resampled=resampled, seed=derive_seed(stream_seed, i), epoch_seed=derive_seed(seed, epoch),
                       rank=rank, world_size=world_size, stream=stream, streams=streams, shuffle_buffer=shuffle_buffer)
        for i, (urls, name) in enumerate(zip(sources, names))
    ]
    return wds.DataPipeline(
        functools.partial(mix, per_source, weights, random.Random(stream_seed)),
        functools.partial(fast_forward, start=start, counter=counter),
        functools.partial(decode, decoder=decoder, seed=stream_seed, counter=counter),
        functools.partial(batches, size=batch_size, collation_fn=functools.partial(batch_with_position, counter=counter)),
        functools.partial(take, n=n_batches),
    )


def every_nth_per_shard(samples: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Each rank keeps every world_size-th sample of each shard: every sample is seen once across ranks, and ranks
    stay balanced whatever the number of shards."""
    seen = {}
    for sample in samples:
        index = seen.get(sample["__url__"], 0)
        seen[sample["__url__"]] = index + 1
        if index % world_size == rank:
            yield sample


def eval_pipeline(*, urls: list[str], member_bytes: int, decoder: SampleDecoder, batch_size: int, rank: int,
                  world_size: int, counter: SkipCounter) -> wds.DataPipeline:
    """This worker's shards in order, this rank's samples of them, and a partial last batch."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        read_tars(counter, member_bytes),
        functools.partial(every_nth_per_shard, rank=rank, world_size=world_size),
        functools.partial(decode, decoder=decoder, seed=0, counter=counter),
        functools.partial(batches, size=batch_size, collation_fn=functools.partial(batch_with_skips, counter=counter),
                          keep_partial=True),
    )
