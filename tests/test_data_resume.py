"""The data layer at scale: a resume costs the same wherever it lands, true epochs, evaluation split by shard, a
world-size change continues the epoch, and a source that yields nothing fails naming it."""
import collections
import itertools
import json
import re

import pytest
import torch

from pretrain.data import DataConfig, build_eval_loader, build_train_loader
from pretrain.data import tars
from test_data_pipeline import classification_cfg, jpeg, labels, write_shards

import numpy as np
import webdataset as wds


@pytest.fixture
def raw_reads(monkeypatch):
    """Raw samples read from tars in this process (workers=0), by shard url."""
    counts = collections.Counter()
    read = tars.shard_samples

    def counted(url, max_bytes, counter, *offset):
        for sample in read(url, max_bytes, counter, *offset):
            counts[url] += 1
            yield sample

    monkeypatch.setattr(tars, "shard_samples", counted)
    return counts


@pytest.fixture(scope="module")
def forty_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("forty"), 40, 10)  # labels 0..399


@pytest.mark.parametrize("resampled, through", [(True, ""), (False, ""), (True, "pipe:cat ")])
def test_a_resume_reads_the_same_few_samples_early_or_late_and_continues_exactly(forty_shards, raw_reads,
                                                                                 resampled, through):
    """Local tars are seeked to each buffered sample; shards through a pipe are read up to the samples referenced."""
    cfg = classification_cfg(through + forty_shards, resampled=resampled, workers=0, shuffle_buffer=20,
                             samples_per_epoch=400)
    reads = {}
    for step in (4, 40):  # 16 and 160 raw samples into the epoch
        uninterrupted = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=5)
        batches = iter(uninterrupted)
        for _ in range(step):
            next(batches)
        state = json.loads(json.dumps(uninterrupted.state_dict()))
        expected = [next(batches) for _ in range(3)]
        raw_reads.clear()
        resumed = build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=5)
        resumed.load_state_dict(state)
        replay = iter(resumed)
        got = [next(replay)]
        reads[step] = sum(raw_reads.values())  # restore + the first new batch
        got += [next(replay) for _ in range(2)]
        for want, have in zip(expected, got):
            assert torch.equal(want["label"], have["label"]) and torch.equal(want["image"], have["image"])
    # a buffer of 20 from shards of 10: a few shards' worth, far below the 160 samples a replay of step 40 reads
    # local: the 19 buffered samples, the current shard's last one, the first batch's 4; a replay of step 40 reads 160
    bound = 19 + 1 + 4 if not through else 100
    assert reads[4] <= bound and reads[40] <= bound, reads


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """Five shards of 7, 5, 6, 4 and 8 samples: 30, which 2 ranks x 2 workers x batches of 3 cannot split by shard."""
    folder = tmp_path_factory.mktemp("uneven")
    rng, sizes, label = np.random.default_rng(0), [7, 5, 6, 4, 8], 0
    for shard, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for i in range(size):
                tar.write({"__key__": f"{shard}-{i}", "jpg": jpeg(rng), "cls": str(label)})
                label += 1
    (folder / "sizes.json").write_text(json.dumps({f"{s:05d}.tar": n for s, n in enumerate(sizes)}))
    return str(folder / "{00000..00004}.tar")


def test_true_epochs_read_every_sample_once_per_epoch_over_ranks_and_workers(uneven_shards):
    cfg = classification_cfg(uneven_shards, resampled=False, workers=2, shuffle_buffer=4)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=1)
        assert loader.steps_per_epoch == 5
        per_rank.append(labels(itertools.islice(loader, 10)))  # two epochs
    for epoch in range(2):
        seen = per_rank[0][epoch * 15:(epoch + 1) * 15] + per_rank[1][epoch * 15:(epoch + 1) * 15]
        assert sorted(seen) == list(range(30)), f"epoch {epoch}"
    assert per_rank[0][:15] != per_rank[0][15:]  # each epoch in its own order


def test_the_workers_run_on_into_the_next_epoch_never_restarted(uneven_shards, monkeypatch):
    """One DataLoader iterator for the whole run, its workers rolling over into each next epoch themselves: what
    persistent_workers gives a loader that is iterated anew every epoch, here by construction."""
    from torch.utils.data import DataLoader

    iterators = []
    start = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: iterators.append(start(self)) or iterators[-1])
    loader = build_train_loader(classification_cfg(uneven_shards, resampled=False, workers=2, shuffle_buffer=4),
                                rank=0, world_size=2, batch_size=3, seed=1)
    assert len(labels(itertools.islice(loader, 3 * loader.steps_per_epoch + 1))) == 48
    assert loader.epoch == 3 and len(iterators) == 1
    assert all(worker.is_alive() for worker in iterators[0]._workers)


def test_evaluation_reads_each_val_sample_on_one_rank_only(uneven_shards, raw_reads):
    cfg = classification_cfg(uneven_shards, workers=0)
    seen, reads = [], []
    for rank in range(3):
        raw_reads.clear()
        seen.append(labels(build_eval_loader(cfg, rank=rank, world_size=3, batch_size=4)))
        reads.append(sum(raw_reads.values()))
    assert sorted(sum(seen, [])) == list(range(30))
    assert reads == [len(s) for s in seen] and sum(reads) == 30  # not 30 per rank
    # more ranks than shards: the ranks past the last shard read nothing, and have a batch to run in lockstep
    idle = build_eval_loader(cfg, rank=6, world_size=7, batch_size=4)
    raw_reads.clear()
    assert list(idle) == [] and not raw_reads
    assert idle.placeholder()["image"].shape == (1, 3, 16, 16)


def test_a_world_size_change_continues_the_true_epoch(tmp_path):
    cfg = classification_cfg(write_shards(tmp_path, 6, 12), resampled=False, workers=2, shuffle_buffer=6)  # 72
    old = [build_train_loader(cfg, rank=rank, world_size=2, batch_size=3, seed=2) for rank in range(2)]
    delivered, states = [], []
    for loader in old:
        delivered += labels(itertools.islice(loader, 6))  # 36 of the epoch's 72 samples
        states.append(json.loads(json.dumps(loader.state_dict())))
    new = [build_train_loader(cfg, rank=rank, world_size=3, batch_size=3, seed=2) for rank in range(3)]
    rest = []
    for loader in new:
        message = loader.reshard(states)
        assert loader.position.step == 4 and loader.epoch == 0  # 36 samples = 4 steps of 3 ranks x 3
        rest += labels(itertools.islice(loader, loader.steps_per_epoch - 4))
        assert loader.epoch == 1
    assert "continues at step 4 on 3 ranks" in message and "36 samples" in message
    assert sorted(delivered + rest) == list(range(72))


def test_a_world_size_change_continues_a_resampled_stream(forty_shards):
    cfg = classification_cfg(forty_shards, workers=0)
    old = build_train_loader(cfg, rank=0, world_size=2, batch_size=4, seed=3)
    list(itertools.islice(old, 20))
    new = build_train_loader(cfg, rank=0, world_size=4, batch_size=4, seed=3)
    message = new.reshard([old.state_dict(), {**old.state_dict(), "rank": 1}])
    assert new.position.step == 10 and "shards drawn afresh" in message
    fresh = build_train_loader(cfg, rank=0, world_size=4, batch_size=4, seed=3)
    assert labels(itertools.islice(new, 3)) != labels(itertools.islice(fresh, 3))  # not the step-0 samples again


def test_a_source_that_yields_nothing_fails_naming_it_while_others_yield(tmp_path, monkeypatch):
    monkeypatch.setattr("pretrain.data.pipeline.MAX_SKIPS_IN_A_ROW", 20)
    good = write_shards(tmp_path / "good", 2, 10, sample_format="image-text")
    no_captions = write_shards(tmp_path / "yfcc", 2, 10)  # classification shards: no KEY.txt
    cfg = DataConfig(format="image-text", train=[{"shards": good}, {"shards": no_captions}], samples_per_epoch=400,
                     workers=0, image_size=16, shuffle_buffer=4)
    message = f"data source {no_captions!r}: 20 samples in a row were unusable (last: missing_caption"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        list(itertools.islice(build_train_loader(cfg, rank=0, world_size=1, batch_size=4, seed=0), 100))


def test_a_true_epoch_source_of_unreadable_shards_fails_naming_it(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"not a tar " * 100)
    (tmp_path / "sizes.json").write_text(json.dumps({f"{i:05d}.tar": 4 for i in range(3)}))
    pattern = str(tmp_path / "{00000..00002}.tar")
    cfg = classification_cfg(pattern, resampled=False, workers=0)
    with pytest.raises(RuntimeError, match=re.escape(f"data source {pattern!r}: a whole pass over this stream's")):
        next(iter(build_train_loader(cfg, rank=0, world_size=1, batch_size=2, seed=0)))
