"""Training and evaluation loaders: the stage lists of pipeline.py run in DataLoader workers, with a resumable position.

Resumption. Within an epoch, batch i of a rank comes from logical stream i % streams, and each stream is a pure
function of (seed, epoch, rank, stream) (pipeline.train_pipeline). The position is (epoch, batches done, and per stream
the raw samples consumed); a resumed loader rebuilds each stream, drops the consumed raw samples undecoded, and hands
the streams to DataLoader workers rotated so that worker 0 serves the next batch. PyTorch reads workers round-robin,
so the batches come in exactly the uninterrupted order. Each epoch starts fresh workers with the epoch's position.

Workers. A rank has gloo, DeepSpeed and TensorBoard threads running by the time it starts workers, and on CPython
before 3.12 (before 3.11.10, 3.10.15...) a child forked while another thread holds the interpreter's HEAD_LOCK hangs
in PyOS_AfterFork_Child (gh-112275). Workers therefore come from a forkserver: a single-threaded process started once
per rank (by fork+exec, which is safe) that has imported the workers' modules and loaded the vocabulary before it
forks any, so a start costs a fork of a thread-free process and the unpickling of a few KB of dataset; only the first
start waits for the server's imports.
"""
import dataclasses
import functools
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data import shards
from pretrain.data.config import DataConfig
from pretrain.data.decode import SampleDecoder
from pretrain.data.pipeline import eval_pipeline, train_pipeline
from pretrain.data.stats import SkipCounter
from pretrain.data.tokenizer import get_tokenizer
from pretrain.data.transforms import eval_transform, train_transform


def resolve_demo(cfg: DataConfig) -> DataConfig:
    """Fill empty train/val from the demo shards (building them on first use) when data.demo_root is set."""
    if cfg.demo_root is None:
        return cfg
    from pretrain.data.demo import ensure_demo_shards

    paths = ensure_demo_shards(cfg.demo_root)[cfg.task]
    return dataclasses.replace(cfg, train=cfg.train or [{"shards": paths["train"]}], val=cfg.val or paths["val"])


def make_decoder(cfg: DataConfig, train: bool) -> SampleDecoder:
    tokenizer = get_tokenizer(cfg.context_length) if cfg.task == "image-text" else None
    if train:
        return SampleDecoder(cfg.task, train_transform(cfg), tokenizer, uses_numpy=bool(cfg.augment.randaugment),
                             limits=cfg.limits, num_classes=cfg.num_classes)
    return SampleDecoder(cfg.task, eval_transform(cfg), tokenizer, optional_label=True, limits=cfg.limits,
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
    offsets: list[int]  # per logical stream: raw samples consumed this epoch


class TrainStream(IterableDataset):
    """The batches of one epoch for one rank, from `position` on; each DataLoader worker runs one logical stream."""

    def __init__(self, cfg: DataConfig, sources: list[list[str]], *, rank: int, world_size: int, batch_size: int,
                 seed: int, steps_per_epoch: int):
        self.cfg, self.sources = cfg, sources
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.steps_per_epoch = steps_per_epoch
        self.streams = max(1, cfg.workers)
        self.decoder = make_decoder(cfg, train=True)  # built once, pickled to each worker
        self.position = Position(0, 0, [0] * self.streams)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        first = self.position.step + (info.id if info else 0)
        stream = first % self.streams
        n_batches = len(range(first, self.steps_per_epoch, self.streams))
        if n_batches == 0:
            return iter(())
        return iter(train_pipeline(
            sources=self.sources, names=[s.shards for s in self.cfg.train], weights=[s.weight for s in self.cfg.train],
            resampled=self.cfg.resampled, shuffle_buffer=self.cfg.shuffle_buffer, limits=self.cfg.limits,
            decoder=self.decoder, batch_size=self.batch_size,
            n_batches=n_batches, start=self.position.offsets[stream], seed=self.seed, epoch=self.position.epoch,
            rank=self.rank, world_size=self.world_size, stream=stream, streams=self.streams, counter=SkipCounter()))


class TrainLoader:
    """Endless batches, epoch after epoch. Each batch: {"image": (B,3,H,W) float, "text": (B,L) long | "label": (B,)
    long, "skipped": {reason: count since the previous batch}}. `state_dict()` is the position after the last batch
    yielded; it is per rank (bad samples differ between ranks), so every rank saves and loads its own."""

    def __init__(self, dataset: TrainStream):
        self.dataset = dataset
        self.steps_per_epoch = dataset.steps_per_epoch
        self.position = Position(0, 0, [0] * dataset.streams)

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.position.step >= self.steps_per_epoch:
                self.position = Position(self.position.epoch + 1, 0, [0] * self.dataset.streams)
            self.dataset.position = dataclasses.replace(self.position, offsets=list(self.position.offsets))
            for batch in make_loader(self.dataset, self.dataset.cfg.workers):
                self.position.offsets[self.position.step % self.dataset.streams] = batch.pop("position")
                self.position.step += 1
                yield batch

    def _identity(self) -> dict:
        d = self.dataset
        return {"rank": d.rank, "world_size": d.world_size, "batch_size": d.batch_size, "seed": d.seed,
                "streams": d.streams, "steps_per_epoch": d.steps_per_epoch}

    def state_dict(self) -> dict:
        return {**dataclasses.asdict(self.position), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the stream cannot be replayed under other settings."""
        mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"data loader state does not match this run (saved, now): {mismatched}")
        self.position = Position(state["epoch"], state["step"], list(state["offsets"]))


def train_sources(cfg: DataConfig, world_size: int) -> tuple[list[list[str]], int]:
    """Expanded (and checked) shard lists of the sources, and the samples in an epoch."""
    sources = [shards.expand_shards(source.shards) for source in cfg.train]
    if not cfg.resampled:
        for source, urls in zip(cfg.train, sources):
            shards.check_enough_shards(urls, world_size, max(1, cfg.workers), source.shards)
    samples = cfg.samples_per_epoch or shards.total_size([url for urls in sources for url in urls])
    if samples is None:
        raise ValueError("data.samples_per_epoch is not set and not every shard has a size in sizes.json or "
                         "*_stats.json beside it; set data.samples_per_epoch")
    return sources, samples


def build_train_loader(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int, seed: int) -> TrainLoader:
    """Fails fast, naming the path, on a missing local shard; see TrainLoader for the batches."""
    cfg = resolve_demo(cfg)
    sources, samples = train_sources(cfg, world_size)
    steps_per_epoch = samples // (world_size * batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{samples} samples per epoch is less than one global batch ({world_size} x {batch_size})")
    return TrainLoader(TrainStream(cfg, sources, rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                                   steps_per_epoch=steps_per_epoch))


class EvalStream(IterableDataset):
    """Each worker reads its share of the shards, in order, keeping this rank's samples of each shard."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, rank: int, world_size: int, batch_size: int):
        self.urls, self.rank, self.world_size, self.batch_size = urls, rank, world_size, batch_size
        self.member_bytes = cfg.limits.member_bytes
        self.decoder = make_decoder(cfg, train=False)

    def batches(self, counter: SkipCounter) -> Iterator[dict]:
        info = get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        if not urls:
            return iter(())
        return iter(eval_pipeline(urls=urls, member_bytes=self.member_bytes, decoder=self.decoder,
                                  batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
                                  counter=counter))

    def __iter__(self) -> Iterator[dict]:
        return self.batches(SkipCounter())


def build_eval_loader(cfg: DataConfig, *, rank: int, world_size: int, batch_size: int) -> DataLoader:
    """Finite batches over the val shards; every sample is seen exactly once across ranks (sum metrics over ranks).
    Batches as in training, the last one partial; image-text batches also carry "label" (-1 where a sample has no
    KEY.cls), so zero-shot accuracy can be measured on shards that have labels."""
    cfg = resolve_demo(cfg)
    if cfg.val is None:
        raise ValueError("data.val is not set")
    urls = shards.expand_shards(cfg.val)
    dataset = EvalStream(cfg, urls, rank=rank, world_size=world_size, batch_size=batch_size)
    return make_loader(dataset, min(cfg.workers, len(urls)))
