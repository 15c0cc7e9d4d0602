"""What a launcher is to `pretrain run`: its own command-line options, a check of them for every stage, what it would
run (--dry-run), and running a plan to its end. `pretrain run` knows no launcher by name; a new one is a Launcher
subclass in a file of its own and a line in launch/__init__.py's launchers()."""
from __future__ import annotations

import argparse
from typing import Callable, ClassVar

from launch.schedule import Plan, StagePlan


class Launcher:
    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, args: argparse.Namespace, log: Callable[[str], None]):
        self.engine, self.log = args.engine, log

    @classmethod
    def add_arguments(cls, group) -> None:
        """Add this launcher's options to `pretrain run`'s parser (an argument group of its own)."""

    def ranks(self, stage: StagePlan) -> int:
        """How many rank processes the stage gets: what its global batch and peak lr follow from."""
        raise NotImplementedError

    def check(self, plan: Plan) -> None:
        """Raise ValueError, naming the stage and the option, on anything this launcher could not run."""

    def dry_run(self, plan: Plan) -> str:
        raise NotImplementedError

    def run(self, plan: Plan) -> int:
        """Run the plan's unfinished stages in order; the exit status for `pretrain run`."""
        raise NotImplementedError
