"""Each phase's own allowance: the launcher's watchdog holds a rank to the allowance its last heartbeat states, and the
collectives inside a long phase wait as long, on gloo, on every process group (DeepSpeed's clone of the world group
too), the step's timeout holding again after it."""
import json
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.rendezvous import free_port
from pretrain import progress
from pretrain.config import DistributedConfig
from pretrain.progress import Beat, Progress
from pretrain.typed_config import ConfigError


def beat(rank: int, phase: str, allowance_s: float, silent_s: float, now: float) -> Beat:
    return Beat(rank, "node1", 100 + rank, 7, phase, now - silent_s, allowance_s)


def test_each_rank_is_held_to_its_own_phases_allowance(tmp_path):
    now = 1_000_000.0
    beats = {0: beat(0, "save", 1800, silent_s=900, now=now),  # a long save, within its allowance
             1: beat(1, "step", 600, silent_s=615, now=now),  # past its allowance, within the grace
             2: beat(2, "evaluate", 1800, silent_s=1200, now=now),
             3: beat(3, "convert", math.inf, silent_s=86400, now=now)}  # no peer waits on a conversion
    assert progress.overdue(beats, [0, 1, 2, 3], grace_s=30, now=now) is None
    assert progress.overdue(beats, [0, 1, 2, 3], grace_s=10, now=now).rank == 1
    beats[2] = beat(2, "step", 600, silent_s=1200, now=now)
    assert progress.overdue(beats, [0, 1, 2, 3], grace_s=10, now=now).rank == 2  # the longest silent first
    assert progress.overdue(beats, [0, 1, 3], grace_s=10, now=now).rank == 1  # rank 2 has ended: not watched

    Progress(tmp_path, 0).beat(7, "save", 1800.0)
    Progress(tmp_path, 3).beat(0, "convert", math.inf)
    read = progress.read(tmp_path, since=time.time() - 60)
    assert (read[0].phase, read[0].step, read[0].allowance_s) == ("save", 7, 1800.0)
    assert read[3].allowance_s == math.inf


def test_the_long_phases_have_their_own_allowances():
    cfg = DistributedConfig(timeout_s=60, checkpoint_timeout_s=900, eval_timeout_s=300)
    assert [cfg.allowance_s(p) for p in ("start", "step", "save", "evaluate")] == [900, 60, 900, 300]
    assert DistributedConfig().allowance_s("step") < DistributedConfig().allowance_s("save")
    with pytest.raises(ConfigError, match="distributed.eval_timeout_s must be > 0"):
        DistributedConfig(eval_timeout_s=0)


STEP_S, PHASE_S, LATE_S = 2.0, 15.0, 5.0  # rank 1 comes LATE_S late: past the step's timeout, within the phase's


def late_peer(rank: int, port: int, out: str):
    """Rank 1 joins each collective LATE_S after rank 0, inside a phase and after it; rank 0 records what it saw."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from deepspeed.utils import groups

    from pretrain.engine.distributed import collective_timeout, init_distributed

    init_distributed(timeout_s=STEP_S)
    zero_group = groups._clone_world_group()  # where DeepSpeed runs ZeRO's collectives
    seen = {}

    def wait_for_rank_1(label: str, group):
        if rank == 1:
            time.sleep(LATE_S)
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=group)
            seen[label] = "joined"
        except RuntimeError:
            seen[label] = "timed out"
        seen[label + " after s"] = time.monotonic() - started

    with collective_timeout(PHASE_S, after_s=STEP_S):
        wait_for_rank_1("in the phase, zero group", zero_group)
        wait_for_rank_1("in the phase, default group", None)
    wait_for_rank_1("after the phase, zero group", zero_group)  # the last: a timed-out gloo group is spent
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


def test_a_phases_collectives_wait_its_allowance_and_the_steps_timeout_holds_after_it(tmp_path):
    """Guarded against a hang by the collectives' own timeouts."""
    mp.spawn(late_peer, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = json.loads((tmp_path / "rank0.json").read_text())
    print(f"\nrank 0 waited {seen['in the phase, zero group after s']:.1f} s in the phase, gave up after "
          f"{seen['after the phase, zero group after s']:.1f} s after it")
    assert seen["in the phase, zero group"] == seen["in the phase, default group"] == "joined"
    assert seen["in the phase, zero group after s"] > STEP_S
    assert seen["after the phase, zero group"] == "timed out"
    assert seen["after the phase, zero group after s"] < LATE_S
