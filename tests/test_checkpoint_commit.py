"""The checkpoint commit protocol (pretrain/engine/checkpoint.py) with a save cut off at each of its points, a full disk
on one rank and a repeated save, all in one pair of processes: two ranks on a gloo group, a small DeepSpeed ZeRO-3
engine and the real CheckpointManager, one episode after another on one checkpoint folder.

A cut-off is an exception raised at that point of the save on both ranks: it leaves the disk as a SIGKILL there would
(tests/test_faults.py kills real ranks end to end). After each, a fresh manager (a restarted run) must choose the newest
complete checkpoint, repair `latest`, and the training step after the load must repeat the uninterrupted run's loss."""
import errno
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.rendezvous import free_port
from pretrain.engine import checkpoint
from pretrain.engine.checkpoint import CheckpointManager, CheckpointNotSaved, tag_for

# Where the save of step CUT_AT ends, what `latest` then names, and the checkpoint the restarted run must choose: once
# its folder is renamed into place a checkpoint is whole, whether or not `latest` names it yet.
CUTS = [("kill_before_rank_state", 4, 2, 2), ("kill_after_rank_files", 4, 2, 2), ("kill_before_latest", 4, 2, 4),
        ("kill_after_latest", 6, 6, 6)]


class Cut(BaseException):
    """The process ends here (not an Exception: nothing in the save may catch it)."""


class FullDisk:
    """A checkpoint engine whose disk fills half-way through a file."""

    def save(self, state_dict, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def small_engine():
    import deepspeed

    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 4,
                                                  "zero_optimization": {"stage": 3}}):
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}, "steps_per_print": 2**31 - 1})
    return engine


def train_step(engine, step: int, rank: int) -> float:
    """One step on a batch fixed by (step, rank): the loss depends only on the weights and the optimizer's state."""
    data = torch.Generator().manual_seed(step * 2 + rank)
    x, y = torch.randn(4, 8, generator=data), torch.randn(4, 1, generator=data)
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    return loss.item()


class Cutter:
    """Patches the save so that it ends at `point` (one of the fault_engine kinds) while `armed`."""

    def __init__(self, rank: int):
        self.rank, self.point, self.full_disk_rank = rank, None, None
        self.writer_save, self.point_latest = checkpoint.RecordingWriter.save, CheckpointManager._point_latest
        checkpoint.RecordingWriter.save = lambda writer, state_dict, path: self._writer_save(writer, state_dict, path)
        CheckpointManager._point_latest = lambda manager, tag: self._point_latest_of(manager, tag)

    def _writer_save(self, writer, state_dict, path):
        own_state = os.path.basename(path) == checkpoint.rank_state_name(self.rank)
        if own_state and self.point == "kill_before_rank_state":
            raise Cut
        if self.full_disk_rank == self.rank and path.endswith("optim_states.pt"):
            inner, writer.inner = writer.inner, FullDisk()
            try:
                return self.writer_save(writer, state_dict, path)
            finally:
                writer.inner = inner
        self.writer_save(writer, state_dict, path)
        if own_state and self.point == "kill_after_rank_files":
            raise Cut

    def _point_latest_of(self, manager, tag):
        if self.point == "kill_before_latest":
            raise Cut
        self.point_latest(manager, tag)
        if self.point == "kill_after_latest":
            raise Cut


def uninterrupted_losses(rank: int, steps: int) -> dict[int, float]:
    engine = small_engine()
    return {step: train_step(engine, step, rank) for step in range(1, steps + 1)}


class Run:
    """An engine and a manager on a checkpoint folder; `restart()` gives it the new ones a restarted run would have."""

    def __init__(self, directory, rank: int, losses: dict[int, float]):
        self.directory, self.rank, self.losses = directory, rank, losses
        self.step = 0
        self.restart()

    def restart(self):
        self.engine = small_engine()  # the initial weights: only the load can bring back the saved state
        self.manager = CheckpointManager(self.directory, 3, self.rank, 2, "backbone.")
        self.manager.attach(self.engine)

    def train_to(self, step: int):
        while self.step < step:
            self.step += 1
            train_step(self.engine, self.step, self.rank)

    def save(self) -> bool:
        return self.manager.save(self.engine, self.step, {"step": self.step, "rank": self.rank})

    def resume(self) -> dict:
        """Restart, choose and load a checkpoint, take two steps (the second's loss shows the optimizer's state): what a
        test needs to see of it."""
        dist.barrier()  # a restarted run starts once every rank of the last one has ended
        latest = (self.directory / "latest").read_text().strip()
        self.restart()
        reports = []
        tag = self.manager.resume_tag(report=reports.append)
        self.step, rank_state = self.manager.load(self.engine, tag)
        steps = [self.step + 1, self.step + 2]
        losses = [train_step(self.engine, step, self.rank) for step in steps]
        self.step = steps[-1]
        return {"latest_before": latest, "tag": tag, "latest_after": (self.directory / "latest").read_text().strip(),
                "reports": reports, "rank_state": rank_state, "losses": losses,
                "expected_losses": [self.losses[step] for step in steps],
                "staging": sorted(p.name for p in self.directory.glob(".staging-*"))}


def episodes(rank: int, port: int, directory, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pretrain.engine.distributed import init_distributed

    init_distributed(timeout_s=60)  # a rank stuck in a collective fails the test instead of hanging it
    cutter = Cutter(rank)
    run = Run(directory, rank, uninterrupted_losses(rank, 8))
    seen = {}
    run.train_to(2)
    assert run.save()
    for point, cut_at, _, _ in CUTS:
        run.train_to(cut_at)
        cutter.point = point
        try:
            run.save()
        except Cut:
            pass
        cutter.point = None
        seen[point] = run.resume()
    run.train_to(8)
    cutter.full_disk_rank = 1
    try:
        run.save()
    except CheckpointNotSaved as error:
        seen["enospc"] = {"error": str(error)}
    cutter.full_disk_rank = None
    seen["enospc"].update(run.resume())
    run.train_to(8)
    assert run.save()
    dist.barrier()  # rank 0 commits after the others return
    mtimes = {p.name: p.stat().st_mtime_ns for p in (directory / tag_for(8)).iterdir()}
    saved = run.save()
    dist.barrier()
    seen["saved_again"] = {"saved": saved, "mtimes_before": mtimes,
                           "mtimes_after": {p.name: p.stat().st_mtime_ns for p in (directory / tag_for(8)).iterdir()}}
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """What each rank saw of each episode (see `episodes`)."""
    work = tmp_path_factory.mktemp("commit")
    mp.spawn(episodes, args=(free_port(), work / "checkpoints", work), nprocs=2, join=True)
    return [json.loads((work / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_resumed(episode: dict, rank: int, tag: str):
    assert episode["tag"] == tag and episode["latest_after"] == tag
    assert episode["rank_state"] == {"step": int(tag[4:]), "rank": rank}
    assert episode["losses"] == pytest.approx(episode["expected_losses"], rel=1e-6)


@pytest.mark.parametrize("point, cut_at, latest, resumed_at", CUTS)
def test_a_save_cut_off_anywhere_commits_whole_or_not_at_all(seen, point, cut_at, latest, resumed_at):
    for rank in range(2):
        assert_resumed(seen[rank][point], rank, tag_for(resumed_at))
    episode = seen[0][point]
    assert episode["latest_before"] == tag_for(latest)
    if resumed_at < cut_at:  # cut off before its manifest: left in staging, reported, removed by the next save
        assert episode["staging"] == [".staging-" + tag_for(cut_at)]
        assert any("interrupted save; ignored" in r for r in episode["reports"])


def test_a_full_disk_on_one_rank_keeps_nothing_of_that_save(seen):
    for rank in range(2):
        episode = seen[rank]["enospc"]
        assert episode["error"].startswith("checkpoint at step 8 was not saved: rank 1: OSError: [Errno 28] No space")
        assert episode["error"].endswith("Nothing of it was kept; the last complete checkpoint is " + tag_for(6) + ".")
        assert episode["staging"] == [] and episode["latest_before"] == tag_for(6)
        assert_resumed(episode, rank, tag_for(6))


def test_a_saved_step_is_not_saved_again(seen):
    """A stop request just after a periodic save: the checkpoint `latest` names is not written into again."""
    for rank in range(2):
        again = seen[rank]["saved_again"]
        assert again["saved"] is False and again["mtimes_after"] == again["mtimes_before"]
