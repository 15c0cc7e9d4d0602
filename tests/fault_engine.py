"""The real engine with one fault injected, for the fault-tolerance tests: an engine module for the launchers' `--engine`
seam (and for tests/scripts/run_stage.py), named by PRETRAIN_FAULT="KIND:STEP:RANK" in the rank's environment.

KIND is what happens on rank RANK at optimizer step STEP:
  raise                   the training step raises
  kill                    the rank SIGKILLs itself as the step starts
  kill_before_rank_state  SIGKILL in the save, after DeepSpeed's shards, before the rank's own state file
  kill_after_rank_files   SIGKILL in the save, once all of this rank's files are written (before the agreement)
  kill_before_latest      SIGKILL after the checkpoint folder is renamed into place, before `latest` is written
  kill_after_latest       SIGKILL just after `latest` is written
  enospc                  the rank's optimizer shard fails to write with ENOSPC
  sigterm_after_save      SIGTERM to the rank itself just after the periodic save
  hold                    the step waits until a stop is requested (records "hold"), then the save it leads to sleeps
                          SLOW_SAVE_S before the rank's state file (records "save"): time for a test to signal mid-save
  stop_at                 the engine is asked to stop (save and return "preempted") as the step starts
When the fault fires, RUN_DIR/fault.json records it with the time, so a test can time fault -> exit.
"""
import errno
import json
import os
import signal
import time
from pathlib import Path

from pretrain.engine import check_config, consolidate, request_stop  # noqa: F401 - the engine's interface
from pretrain.engine import run_stage as real_run_stage
from pretrain.engine import checkpoint, preemption, trainer

SLOW_SAVE_S = 60.0


def parse(spec: str) -> tuple[str, int, int]:
    kind, step, rank = spec.split(":")
    return kind, int(step), int(rank)


def fired(run_dir: Path, kind: str, step: int):
    rank = int(os.environ["RANK"])
    (Path(run_dir) / "fault.json").write_text(json.dumps({"kind": kind, "step": step, "rank": rank,
                                                          "time": time.time()}))


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


class FullDisk:
    """A checkpoint engine whose disk fills half-way through a file, as a real one does."""

    def save(self, state_dict, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def install(spec: str):
    kind, at_step, at_rank = parse(spec)
    if int(os.environ.get("RANK", 0)) != at_rank:
        return
    current = {"step": 0, "run_dir": Path(".")}
    train_step, save, writer_save = trainer.Trainer._train_step, checkpoint.CheckpointManager.save, \
        checkpoint.RecordingWriter.save
    point_latest = checkpoint.CheckpointManager._point_latest

    def patched_train_step(self, batches):
        current.update(step=self.step + 1, run_dir=self.run_dir)
        if current["step"] == at_step and kind == "hold":
            fired(self.run_dir, "hold", at_step)
            while not preemption.stop_requested():
                time.sleep(0.05)
        if current["step"] == at_step and kind in ("raise", "kill", "stop_at"):
            fired(self.run_dir, kind, at_step)
            if kind == "raise":
                raise RuntimeError(f"injected fault: rank {at_rank} raises at step {at_step}")
            if kind == "kill":
                kill_self()
            preemption.request_stop()
        return train_step(self, batches)

    def patched_save(self, engine, step, rank_state):
        saved = save(self, engine, step, rank_state)
        if kind == "sigterm_after_save" and step == at_step:
            fired(current["run_dir"], kind, step)
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    def patched_writer_save(self, state_dict, path):
        name = Path(path).name
        here = current["step"] == at_step
        if here and kind == "hold" and name == checkpoint.rank_state_name(at_rank):
            fired(current["run_dir"], "save", at_step)
            time.sleep(SLOW_SAVE_S)
        if here and kind == "kill_before_rank_state" and name == checkpoint.rank_state_name(at_rank):
            fired(current["run_dir"], kind, at_step)
            kill_self()
        if here and kind == "enospc" and name.endswith("optim_states.pt"):
            fired(current["run_dir"], kind, at_step)
            inner, self.inner = self.inner, FullDisk()
            try:
                return writer_save(self, state_dict, path)
            finally:
                self.inner = inner
        writer_save(self, state_dict, path)
        if here and kind == "kill_after_rank_files" and name == checkpoint.rank_state_name(at_rank):
            fired(current["run_dir"], kind, at_step)
            kill_self()

    def patched_point_latest(self, tag):
        here = current["step"] == at_step
        if here and kind == "kill_before_latest":
            fired(current["run_dir"], kind, at_step)
            kill_self()
        point_latest(self, tag)
        if here and kind == "kill_after_latest":
            fired(current["run_dir"], kind, at_step)
            kill_self()

    trainer.Trainer._train_step = patched_train_step
    checkpoint.CheckpointManager.save = patched_save
    checkpoint.RecordingWriter.save = patched_writer_save
    checkpoint.CheckpointManager._point_latest = patched_point_latest


def record_pid(config_path: str, overrides: list[str]):
    """RUN_DIR/pids/rankN: for tests that signal a rank or look for what it left behind."""
    from pretrain.config import load_stage_config

    pids = Path(load_stage_config(config_path, overrides).run_dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))


def run_stage(config_path: str, overrides: list[str] = ()) -> dict:
    record_pid(config_path, overrides)
    if os.environ.get("PRETRAIN_FAULT"):
        install(os.environ["PRETRAIN_FAULT"])
    return real_run_stage(config_path, overrides)
