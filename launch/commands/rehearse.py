"""`pretrain rehearse SCHEDULE_OR_STAGE [KEY=VALUE ...] [--nproc N] [--steps N]`: see launch/rehearsal.py."""
import argparse

from pretrain.commands.overrides import accept_late_overrides


def add_arguments(parser):
    parser.add_argument("source", metavar="SCHEDULE_OR_STAGE", help="a schedule YAML (with `stages:`) or a stage config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides for every stage, STAGE:KEY=VALUE for one; run_dir=DIR (default: the "
                             "schedule's run_dir with -rehearsal appended)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks per stage (default 2)")
    parser.add_argument("--steps", type=int, default=4,
                        help="optimizer steps per stage (>= 2), paused with a save half-way and resumed")
    parser.add_argument("--engine", default="pretrain.engine", help=argparse.SUPPRESS)  # test seam
    accept_late_overrides(parser)


def main(args) -> int:
    import sys

    from launch.rehearsal import rehearse

    if args.nproc <= 0 or args.steps < 2:
        print(f"pretrain rehearse: --nproc must be > 0 and --steps >= 2 (a pause and a resume), got {args.nproc} and "
              f"{args.steps}", file=sys.stderr)
        return 2
    try:
        return rehearse(args.source, args.overrides, args.nproc, args.steps, args.engine,
                        log=lambda message: print(message, flush=True))
    except (OSError, ValueError) as error:
        print(f"pretrain rehearse: {error}", file=sys.stderr)
        return 2
