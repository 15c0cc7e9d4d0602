"""What every rank process runs, under either launcher: export the previous stage if needed, then the engine's stage.

The engine is a module offering `run_stage(config_path, overrides) -> {"status", "metrics"}`, `request_stop()` and
`consolidate(checkpoint_dir, out_dir, dtype)`; `pretrain.engine` unless a test names another (the seam).
Run as `python -m launch.worker --engine MODULE --stage JSON` by the local launcher; exit status 0 completed,
75 (EX_TEMPFAIL) preempted (a checkpoint was saved; run again to resume), 76 stopped because a peer rank ended, 1 failed.
A rank that ends with an error prints one line and leaves its traceback to the launcher (see failures.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from launch import failures
from launch.lifetime import PARENT_PID_ENV, bind_rank_to_parent
from launch.rendezvous import Rendezvous
from launch.schedule import StagePlan, ensure_export, export_stage

DEFAULT_ENGINE = "pretrain.engine"
EXIT_FAILED = 1
EXIT_PREEMPTED = 75
EXIT_STOPPED = 76


def load_engine(name: str = DEFAULT_ENGINE) -> ModuleType:
    engine = importlib.import_module(name)
    missing = [f for f in ("run_stage", "request_stop", "consolidate") if not hasattr(engine, f)]
    if missing:
        raise ImportError(f"engine module {name!r} lacks {', '.join(missing)}")
    return engine


def run_rank(stage: StagePlan, rdzv: Rendezvous, engine_name: str = DEFAULT_ENGINE) -> dict[str, Any]:
    """Set the env:// rendezvous, export the previous stage's backbone (rank 0; the others wait), run the stage."""
    rdzv.export()
    engine = load_engine(engine_name)
    ensure_export(stage, engine.consolidate, is_leader=rdzv.rank == 0)
    result = engine.run_stage(stage.config, list(stage.overrides))
    if not isinstance(result, dict) or result.get("status") not in ("completed", "preempted"):
        raise RuntimeError(f"run_stage returned {result!r}; expected status completed or preempted")
    if result["status"] == "completed" and rdzv.rank == 0:
        export_stage(Path(stage.run_dir), engine.consolidate)  # every stage's deliverable, the last one's included
    return result


def end_with_error(stage: StagePlan, rank: int, error: BaseException) -> int:
    """Record `error` for the launcher, say it in one line, end this rank's own child processes (data workers and the
    `pipe:` commands they run, which could outlive it), and return the exit status to leave with."""
    from pretrain.engine.distributed import end_child_processes

    rec = failures.record(stage.run_dir, rank, error)
    print(rec.line(stage.name), file=sys.stderr, flush=True)
    end_child_processes()
    return EXIT_FAILED if rec.kind == failures.FAILED else EXIT_STOPPED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a stage (started by launch.local)")
    parser.add_argument("--engine", default=DEFAULT_ENGINE)
    parser.add_argument("--stage", required=True, help="the StagePlan as JSON")
    args = parser.parse_args(argv)
    bind_rank_to_parent(int(os.environ.get(PARENT_PID_ENV) or os.getppid()))
    stage = StagePlan(**json.loads(args.stage))
    rdzv = Rendezvous(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
    )
    try:
        result = run_rank(stage, rdzv, args.engine)
    except Exception as error:  # noqa: BLE001 - every error ends the rank the same way; the launcher reports it
        code = end_with_error(stage, rdzv.rank, error)
        sys.stdout.flush()
        os._exit(code)  # not sys.exit: interpreter teardown may block on threads stuck in a dead collective
    return 0 if result["status"] == "completed" else EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
