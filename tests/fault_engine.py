"""The real engine with one fault injected, for the fault-tolerance tests: an engine module for the launchers' `--engine`
seam (and for tests/scripts/run_stage.py), named by PRETRAIN_FAULT="KIND:STEP:RANK" in the rank's environment.

KIND is what happens on rank RANK at optimizer step STEP:
  raise  the training step raises
  kill   the rank SIGKILLs itself as the step starts
  hold   the step waits until a stop is requested (records "hold"), then the save it leads to sleeps SLOW_SAVE_S
         before the rank's state file (records "save"): time for a test to signal mid-save
  slow-save  the save after the step sleeps distributed.timeout_s + OVERTIME_S before the rank's state file
         (records "slow-save"): longer than a step may last, the launcher's grace included, yet within the save's own
         allowance (distributed.checkpoint_timeout_s)
When the fault fires, RUN_DIR/fault.json records it with the time, so a test can time fault -> exit. A save cut off
part-way is tested in-process (tests/test_checkpoint_commit.py).
"""
import json
import os
import signal
import time
from pathlib import Path

from launch.local import FAILURE_GRACE_S
from pretrain.engine import check_config, consolidate, request_stop  # noqa: F401 - the engine's interface
from pretrain.engine import run_stage as real_run_stage
from pretrain.engine import checkpoint, preemption, trainer

SLOW_SAVE_S = 60.0
OVERTIME_S = FAILURE_GRACE_S + 5.0


def parse(spec: str) -> tuple[str, int, int]:
    kind, step, rank = spec.split(":")
    return kind, int(step), int(rank)


def fired(run_dir: Path, kind: str, step: int):
    rank = int(os.environ["RANK"])
    (Path(run_dir) / "fault.json").write_text(json.dumps({"kind": kind, "step": step, "rank": rank,
                                                          "time": time.time()}))


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str):
    kind, at_step, at_rank = parse(spec)
    if int(os.environ.get("RANK", 0)) != at_rank:
        return
    current = {"step": 0, "run_dir": Path("."), "timeout_s": 0.0}
    train_step, writer_save = trainer.Trainer._train_step, checkpoint.RecordingWriter.save

    def patched_train_step(self, batches):
        current.update(step=self.step + 1, run_dir=self.run_dir, timeout_s=self.cfg.distributed.timeout_s)
        if current["step"] == at_step and kind == "hold":
            fired(self.run_dir, "hold", at_step)
            while not preemption.stop_requested():
                time.sleep(0.05)
        if current["step"] == at_step and kind in ("raise", "kill"):
            fired(self.run_dir, kind, at_step)
            if kind == "raise":
                raise RuntimeError(f"injected fault: rank {at_rank} raises at step {at_step}")
            kill_self()
        return train_step(self, batches)

    def patched_writer_save(self, state_dict, path):
        if current["step"] == at_step and Path(path).name == checkpoint.rank_state_name(at_rank):
            if kind == "hold":
                fired(current["run_dir"], "save", at_step)
                time.sleep(SLOW_SAVE_S)
            elif kind == "slow-save":
                fired(current["run_dir"], kind, at_step)
                time.sleep(current["timeout_s"] + OVERTIME_S)
        writer_save(self, state_dict, path)

    trainer.Trainer._train_step = patched_train_step
    checkpoint.RecordingWriter.save = patched_writer_save


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
