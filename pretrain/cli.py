"""`pretrain` command line: one sub-command per module under pretrain/commands/.

Each command module defines `add_arguments(parser)` and `main(args) -> int`, and imports torch, DeepSpeed and the like
inside `main`, so `pretrain --help` stays fast.
"""
import argparse
import importlib
import sys

# (command, module, one-line help). Nested groups ("data check") are their own tables in their modules.
COMMANDS = [
    ("run", "pretrain.commands.run", "run a stage config or a schedule, locally or on SLURM; resumes from run_dir"),
    ("consolidate", "pretrain.commands.consolidate", "turn a DeepSpeed checkpoint into fp16/bf16/fp32 weights"),
    ("estimate-memory", "pretrain.commands.estimate_memory", "per-GPU memory of a stage config at a given scale"),
    ("data", "pretrain.commands.data", "inspect webdataset shards (data check)"),
    ("shards", "pretrain.commands.shards", "build webdataset shards (shards make)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(importlib.import_module(args._module).main(args))
