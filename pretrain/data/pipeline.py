"""The webdataset stage lists. Each is built inside the worker that runs it, for one (epoch, rank, stream)."""
import collections
import functools
from collections.abc import Iterable, Iterator

import webdataset as wds

from pretrain.data.decode import LabelOutOfRange, Skip, SampleDecoder, collate
from pretrain.data.resumable import Stream
from pretrain.data.rng import derive_seed
from pretrain.data.stats import SkipCounter
from pretrain.data.tars import read_tars

MAX_SKIPS_IN_A_ROW = 10_000


def decode(samples: Iterable[dict], decoder: SampleDecoder, seed: int, counter: SkipCounter,
           names: list[str] | None = None) -> Iterator[dict]:
    """Decoded samples; bad ones are counted and dropped. Endless streams of nothing but bad samples (a wrong task, or
    shards without a usable sample) would spin forever, so a long run of them is an error. The run is counted per
    source (`__source__`, named by `names`): a source that yields nothing fails even while the others yield plenty."""
    in_a_row = collections.Counter()
    for sample in samples:
        source = sample.get("__source__", 0)
        try:
            decoded = decoder(sample, derive_seed(seed, sample.get("__index__", 0)))
        except LabelOutOfRange as error:
            raise ValueError(f"{error}: shard {sample['__url__']}, key {sample['__key__']}") from None
        except Skip as skip:
            counter.skip(skip.reason, f"{sample['__url__']}:{sample['__key__']}", skip.__cause__)
            in_a_row[source] += 1
            if in_a_row[source] == MAX_SKIPS_IN_A_ROW:
                named = f"data source {names[source]!r}: " if names else ""
                raise RuntimeError(f"{named}{MAX_SKIPS_IN_A_ROW} samples in a row were unusable (last: {skip.reason} "
                                   f"in {sample['__url__']}); check data.format and the shards") from None
            continue
        in_a_row[source] = 0
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


def batch_with_state(samples: list[dict], stream: Stream, counter: SkipCounter) -> dict:
    """A batch, the stream's state after it (to resume from), and the skips since the previous batch."""
    return {**collate(samples), "state": stream.state_dict(), "skipped": counter.drain()}


def batch_with_skips(samples: list[dict], counter: SkipCounter) -> dict:
    return {**collate(samples), "skipped": counter.drain()}


def train_pipeline(*, stream: Stream, names: list[str], decoder: SampleDecoder, batch_size: int, seed: int,
                   counter: SkipCounter) -> wds.DataPipeline:
    """Endless batches of one stream; `names` are the sources' patterns, for the errors that end a failing source."""
    return wds.DataPipeline(
        stream.samples,
        functools.partial(decode, decoder=decoder, seed=seed, counter=counter, names=names),
        functools.partial(batches, size=batch_size, collation_fn=functools.partial(batch_with_state, stream=stream,
                                                                                   counter=counter)),
    )


def eval_pipeline(*, urls: list[str], member_bytes: int, decoder: SampleDecoder, batch_size: int,
                  counter: SkipCounter) -> wds.DataPipeline:
    """This worker's shards in order, every sample of them, and a partial last batch."""
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        read_tars(counter, member_bytes),
        functools.partial(decode, decoder=decoder, seed=0, counter=counter),
        functools.partial(batches, size=batch_size, collation_fn=functools.partial(batch_with_skips, counter=counter),
                          keep_partial=True),
    )
