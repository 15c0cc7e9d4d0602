"""Launchers for `pretrain run`: a stage or a schedule of stages, on this machine or on SLURM through submitit.

One concern per module:
  schedule.py    schedule/stage YAML -> an ordered list of stage plans; exports between stages; summary.json
  rendezvous.py  MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from SLURM's environment (or for local ranks)
  worker.py      what every rank process runs: the engine's run_stage, behind a small seam for tests
  failures.py    what a failed stage tells its user: each rank's record, the culprit's traceback last
  base.py        the Launcher interface `pretrain run` drives
  local.py       stages in sequence, N rank processes each, on this machine
  slurm.py       one submitit job per stage, chained with afterok; preemption/requeue; waiting and cancelling
  commands/      the `pretrain run` and `pretrain rehearse` commands; cli.py, the `pretrain` command line
"""


def launchers() -> dict:
    """The launchers `pretrain run --launcher` offers, by name. A new one: a Launcher in a file of its own, and a line
    here."""
    from launch.local import LocalLauncher
    from launch.slurm import SlurmLauncher

    return {launcher.name: launcher for launcher in (LocalLauncher, SlurmLauncher)}
