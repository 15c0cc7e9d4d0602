"""Training and evaluation loaders: the stage lists of pipeline.py run in DataLoader workers, with a resumable position.

Resumption. Within an epoch, batch i of a rank comes from logical stream i % streams, and each stream starts as a pure
function of (seed, epoch, rank, stream). The position is (epoch, batches done, and per stream its state after its last
batch, see resumable.py); a resumed loader restores each stream from its state and hands the streams to DataLoader
workers rotated so that worker 0 serves the next batch. PyTorch reads workers round-robin, so the batches come in
exactly the uninterrupted order. The workers live for the whole run: each goes on into the next epoch by itself (a
worker serves every streams-th batch of the run, so within an epoch always the same logical stream).

Sampling. `data.resampled: true` draws shards with replacement (pretraining). `false` reads true epochs: the shards'
samples (their sizes are needed) in an order shuffled per epoch, cut into one contiguous segment per rank and stream,
sized to the batches that stream serves, so each sample is read once per epoch across ranks and workers (a sample
skipped as bad is made up for by reading the stream's segment again, as a sampler pads a short rank).

A world-size change continues the epoch (`TrainLoader.reshard`): with true epochs, what the old ranks had not yet
handed out (their buffers, the rest of their shards) is cut into segments for the new ranks; resampled streams are
drawn afresh under a new seed from the step the old ranks had reached.

Workers. A rank has gloo, DeepSpeed and TensorBoard threads running by the time it starts workers, and on CPython
before 3.12 (before 3.11.10, 3.10.15...) a child forked while another thread holds the interpreter's HEAD_LOCK hangs
in PyOS_AfterFork_Child (gh-112275). Workers therefore come from a forkserver: a single-threaded process started once
per rank (by fork+exec, which is safe) that has imported the workers' modules and loaded the vocabulary before it
forks any, so a start costs a fork of a thread-free process and the unpickling of a few KB of dataset; only the first
start waits for the server's imports.
"""
import atexit
import copy
import dataclasses
import functools
import itertools
import multiprocessing
import multiprocessing.util  # its exit handler is registered before ours below, so ours runs first
import os
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.data.decode import SampleDecoder
from pretrain.data.epoch_size import epoch_samples, epoch_sizes
from pretrain.data.pipeline import eval_pipeline, train_pipeline
from pretrain.data.resumable import (FORMAT, Piece, Pieces, Resampled, SourceStream, Stream, epoch_sequence,
                                     piece_length, segment)
from pretrain.data.rng import derive_seed
from pretrain.data.stats import SkipCounter
from pretrain.data.tars import ShardFailures, read_tars
from pretrain.data.tokenizer import get_tokenizer
from pretrain.data.transforms import eval_transform, train_transform


def resolve_demo(cfg: DataConfig) -> DataConfig:
    """Fill empty train/val from the demo shards (building them on first use) when data.demo_root is set."""
    if cfg.demo_root is None:
        return cfg
    from pretrain.data.demo import ensure_demo_shards

    paths = ensure_demo_shards(cfg.demo_root)[cfg.format]
    return dataclasses.replace(cfg, train=cfg.train or [{"shards": paths["train"]}], val=cfg.val or paths["val"])


def make_decoder(cfg: DataConfig, train: bool) -> SampleDecoder:
    tokenizer = get_tokenizer(cfg.context_length) if cfg.format == "image-text" else None
    if train:
        return SampleDecoder(cfg.format, train_transform(cfg), tokenizer, uses_numpy=bool(cfg.augment.randaugment),
                             limits=cfg.limits, num_classes=cfg.num_classes)
    return SampleDecoder(cfg.format, eval_transform(cfg), tokenizer, evaluation=True, limits=cfg.limits,
                         num_classes=cfg.num_classes)


def ignore_stop_signals(_worker_id: int):
    """SLURM signals every process of a job step on preemption or requeue. A worker that dies of it takes the rank
    down before the rank can save; the rank alone handles those signals, and its workers exit with it."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def exit_with_rank() -> None:
    """A worker's parent process is the forkserver, which outlives a rank killed by SIGKILL (its workers hold it open),
    so PyTorch's check that the worker's parent lives never fails and the workers would wait for ever: each watches
    the rank itself instead."""
    rank = multiprocessing.parent_process()

    def watch():
        rank.join()
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-rank").start()


@atexit.register
def kill_data_workers() -> None:
    """At exit multiprocessing sends its daemonic children SIGTERM and joins them; data workers ignore SIGTERM
    (ignore_stop_signals), so a process leaving with a persistent loader still open would wait for them for ever."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def init_worker(worker_id: int) -> None:
    ignore_stop_signals(worker_id)
    exit_with_rank()


@functools.cache
def worker_context() -> multiprocessing.context.BaseContext:
    """The forkserver context; its server starts with the first worker and lives as long as the rank, having loaded
    what the workers need (forkserver_preload)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pretrain.data.forkserver_preload"])
    return context


def make_loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader of ready-made batches, its workers (if any) started from the forkserver."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=init_worker, multiprocessing_context=worker_context() if workers else None)


@dataclasses.dataclass
class Position:
    epoch: int
    step: int  # batches of this epoch already delivered
    stream_states: list[dict | None]  # per logical stream: its state after its last batch; None: not started this epoch
    generation: int = 0  # samples the old ranks had delivered this epoch when it was resharded; 0: never resharded

    @classmethod
    def start_of(cls, epoch: int, streams: int) -> "Position":
        return cls(epoch, 0, [None] * streams)


def stream_range(rank: int, stream: int, streams: int, steps_per_epoch: int, step: int, batch_size: int,
                 ) -> tuple[int, int]:
    """Where a stream's samples lie in the sequence that the batches step..steps_per_epoch-1 of every rank consume:
    rank after rank, and within a rank stream after stream, each stream serving every streams-th batch."""
    batches = [len(range(step + (s - step) % streams, steps_per_epoch, streams)) for s in range(streams)]
    begin = (rank * sum(batches) + sum(batches[:stream])) * batch_size
    return begin, begin + batches[stream] * batch_size


class TrainStream(IterableDataset):
    """The batches of one rank from `position` on, epoch after epoch; each DataLoader worker runs one logical stream
    per epoch."""

    def __init__(self, cfg: DataConfig, sources: list[list[str]], sizes: list[int] | None, *, rank: int,
                 world_size: int, batch_size: int, seed: int, steps_per_epoch: int):
        self.cfg, self.sources, self.sizes = cfg, sources, sizes  # sizes: the shards' samples, for true epochs
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.steps_per_epoch = steps_per_epoch
        self.streams = max(1, cfg.workers)
        self.decoder = make_decoder(cfg, train=True)  # built once, pickled to each worker
        self.position = Position.start_of(0, self.streams)

    def epoch_pieces(self, epoch: int, stream: int) -> list[Piece]:
        """A stream's segment of a fresh epoch (true epochs)."""
        begin, end = stream_range(self.rank, stream, self.streams, self.steps_per_epoch, 0, self.batch_size)
        return segment(epoch_sequence(self.sizes, derive_seed(self.seed, epoch)), begin, end)

    def build_stream(self, epoch: int, stream: int, state: dict | None, generation: int,
                     counter: SkipCounter) -> tuple[Stream, int]:
        """A stream, restored from its state if it has one; and its seed."""
        cfg, limits = self.cfg, self.cfg.limits
        seed = derive_seed(self.seed, epoch, self.rank, stream, generation)
        sources = []
        for i, (urls, source) in enumerate(zip(self.sources, cfg.train)):
            if cfg.resampled:
                order = Resampled(len(urls), derive_seed(seed, i, 0))
            else:
                order = Pieces(state["pieces"] if state and "pieces" in state else self.epoch_pieces(epoch, stream))
            read = read_tars(counter, limits.member_bytes, ShardFailures(source.shards, limits.shard_failures))
            sources.append(SourceStream(source.shards, urls, order, cfg.shuffle_buffer, derive_seed(seed, i, 1), read))
        built = Stream(sources, [s.weight for s in cfg.train], seed)
        if state and "pieces" not in state:
            built.load_state_dict(state)
            counter.discard()  # skips met while restoring were reported before the interruption
        return built, seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        position, counter = self.position, SkipCounter()
        first = position.epoch * self.steps_per_epoch + position.step + worker
        batches, built_for = None, None
        for index in itertools.count(first, workers):
            epoch, step = divmod(index, self.steps_per_epoch)
            stream = step % self.streams
            if built_for != epoch:
                resumed = epoch == position.epoch
                state = position.stream_states[stream] if resumed else None
                built, seed = self.build_stream(epoch, stream, state, position.generation if resumed else 0, counter)
                batches = iter(train_pipeline(stream=built, names=[s.shards for s in self.cfg.train],
                                              decoder=self.decoder, batch_size=self.batch_size, seed=seed,
                                              counter=counter))
                built_for = epoch
            yield {**next(batches), "stream": stream}


class TrainLoader:
    """Endless batches, epoch after epoch. Each batch: {"image": (B,3,H,W) float, "text": (B,L) long | "label": (B,)
    long, "skipped": {reason: count since the previous batch}}. `state_dict()` is the position after the last batch
    yielded; it is per rank (bad samples differ between ranks), so every rank saves and loads its own."""

    def __init__(self, dataset: TrainStream):
        self.dataset = dataset
        self.steps_per_epoch = dataset.steps_per_epoch
        self.position = Position.start_of(0, dataset.streams)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def __iter__(self) -> Iterator[dict]:
        self.dataset.position = copy.deepcopy(self.position)
        for batch in make_loader(self.dataset, self.dataset.cfg.workers):
            self.position.stream_states[batch.pop("stream")] = batch.pop("state")
            self.position.step += 1
            if self.position.step == self.steps_per_epoch:
                self.position = Position.start_of(self.position.epoch + 1, self.dataset.streams)
            yield batch

    def _identity(self) -> dict:
        d = self.dataset
        return {"rank": d.rank, "world_size": d.world_size, "batch_size": d.batch_size, "seed": d.seed,
                "streams": d.streams, "steps_per_epoch": d.steps_per_epoch, "resampled": d.cfg.resampled}

    def state_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self.position), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the stream cannot be replayed under other settings."""
        check_format(state)
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"data loader state does not match this run (saved, now): {mismatched}")
        self.position = Position(state["epoch"], state["step"], list(state["stream_states"]), state["generation"])

    def reshard(self, states: list[dict]) -> str:
        """Continue the epoch that the old ranks' states (all of them, in rank order) stood in, on this world size;
        returns what was done, for the resume event."""
        for state in states:
            check_format(state)
        old = states[0]
        same = ("batch_size", "seed", "resampled")
        mismatched = {k: (old[k], v) for k, v in self._identity().items() if k in same and old[k] != v}
        if mismatched:
            raise ValueError(f"data loader state does not match this run (saved, now): {mismatched}")
        d = self.dataset
        delivered = old["step"] * old["world_size"] * d.batch_size
        step = delivered // (d.world_size * d.batch_size)
        where = f"epoch {old['epoch']} at sample {delivered} (step {old['step']} on {old['world_size']} ranks)"
        if step >= self.steps_per_epoch:
            self.position = Position.start_of(old["epoch"] + 1, d.streams)
            return f"data: {where} was the epoch's end; epoch {old['epoch'] + 1} starts on {d.world_size} ranks"
        if delivered == 0:
            self.position = Position.start_of(old["epoch"], d.streams)
            return f"data: {where} starts afresh on {d.world_size} ranks"
        plans = [None] * d.streams
        if not d.cfg.resampled:
            rest = [piece for rank_state in states for piece in undelivered(rank_state, d)]
            plans = [{"pieces": segment(rest, *stream_range(d.rank, s, d.streams, self.steps_per_epoch, step,
                                                             d.batch_size))} for s in range(d.streams)]
        self.position = Position(old["epoch"], step, plans, generation=delivered)
        if d.cfg.resampled:
            return (f"data: {where} continues at step {step} on {d.world_size} ranks, shards drawn afresh under a "
                    "new seed")
        return (f"data: {where} continues at step {step} on {d.world_size} ranks with the "
                f"{sum(piece_length(p) for p in rest)} samples the old ranks had not delivered; none delivered "
                "is read again this epoch")


def check_format(state: dict) -> None:
    if state.get("format") != FORMAT:
        raise ValueError(f"data loader state of format {state.get('format', 1)} (this version reads format {FORMAT}: "
                         "saved by an older version, whose position was a replay offset); resume with that version")


def undelivered(state: dict, dataset: TrainStream) -> list[Piece]:
    """The samples of an old rank's epoch that it had not handed out yet, as pieces (true epochs, one source): for each
    stream its shuffle buffer, the rest of its current shard piece and the pieces it had not opened."""
    pieces = []
    for stream, stream_state in enumerate(state["stream_states"]):
        if stream_state is None:
            begin, end = stream_range(state["rank"], stream, state["streams"], state["steps_per_epoch"], 0,
                                      state["batch_size"])
            pieces += segment(epoch_sequence(dataset.sizes, derive_seed(dataset.seed, state["epoch"])), begin, end)
            continue
        if "pieces" in stream_state:
            pieces += stream_state["pieces"]
            continue
        (source,) = stream_state["sources"]
        buffered = defaultdict(list)
        for shard, index, _ in source["buffer"]:
            buffered[shard].append(index)
        pieces += [[shard, min(ix), max(ix) + 1, sorted(ix)] for shard, ix in buffered.items()]
        current, order = source["current"], source["order"]
        if current is not None:
            shard, start, stop, picks = current
            if picks is not None:
                picks = [i for i in picks if i >= start]
            if (stop is None or start < stop) and picks != []:
                pieces.append([shard, start, stop, picks])
        pieces += order["pieces"][order["next"]:]
    return pieces


def train_sources(cfg: DataConfig) -> tuple[list[list[str]], int]:
    """Expanded (and checked) shard lists of the sources, and the samples in an epoch."""
    return [shards.expand_shards(source.shards) for source in cfg.train], epoch_samples(cfg)


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int) -> TrainLoader:
    """Fails fast, naming the path, on a missing local shard; see TrainLoader for the batches."""
    cfg = resolve_demo(cfg)
    sources, samples = train_sources(cfg)
    sizes = epoch_sizes(cfg, sources)
    steps_per_epoch = samples // (world_size * batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{samples} samples per epoch is less than one global batch ({world_size} x {batch_size})")
    return TrainLoader(TrainStream(cfg, sources, sizes, rank=rank, world_size=world_size, batch_size=batch_size,
                                   seed=seed, steps_per_epoch=steps_per_epoch))


class EvalStream(IterableDataset):
    """Each worker reads its share of this rank's shards, in order, every sample of them."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, batch_size: int):
        self.urls, self.batch_size = urls, batch_size
        self.member_bytes = cfg.limits.member_bytes
        self.decoder = make_decoder(cfg, train=False)

    def batches(self, counter: SkipCounter) -> Iterator[dict]:
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        if not urls:
            return iter(())
        return iter(eval_pipeline(urls=urls, member_bytes=self.member_bytes, decoder=self.decoder,
                                  batch_size=self.batch_size, counter=counter))

    def __iter__(self) -> Iterator[dict]:
        return self.batches(SkipCounter())


class EvalLoader:
    """This rank's evaluation batches, and a stand-in batch for a rank that has none left (ranks evaluate in lockstep,
    see tasks.lockstep) or none at all (fewer shards than ranks)."""

    def __init__(self, cfg: DataConfig, urls: list[str], batch_size: int):
        self.cfg, self.urls = cfg, urls
        self.loader = make_loader(EvalStream(cfg, urls, batch_size=batch_size), min(cfg.workers, len(urls)))

    def __iter__(self) -> Iterator[dict]:
        return iter(self.loader) if self.urls else iter(())

    def placeholder(self) -> dict:
        """One sample of zeros, shaped as a real batch."""
        size = self.cfg.image_size
        batch = {"image": torch.zeros(1, 3, size, size, dtype=torch.uint8), "label": torch.zeros(1, dtype=torch.long), "skipped": {}}
        if self.cfg.format == "image-text":
            batch["text"] = torch.zeros(1, self.cfg.context_length, dtype=torch.long)
            batch["has_text"] = torch.zeros(1, dtype=torch.bool)
        return batch


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int) -> EvalLoader:
    """Finite batches over the val shards, split by shard: rank r reads shards r, r + world_size, ..., so each sample
    is read by one rank only (with fewer shards than ranks, the ranks past the last shard read nothing). Sum metrics
    over ranks. Batches as in training, the last one partial; image-text batches also carry "label" (-1 where a sample
    has no KEY.cls) and "has_text" (False where it has no KEY.txt), so zero-shot accuracy is measured on labelled
    shards (ImageNet-style, no captions) and retrieval on captioned ones."""
    cfg = resolve_demo(cfg)
    if cfg.val is None:
        raise ValueError("data.val is not set")
    urls = shards.expand_shards(cfg.val)
    return EvalLoader(cfg, urls[rank::world_size], batch_size)
