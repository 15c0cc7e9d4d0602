"""`pretrain` command line (`python -m launch`): one sub-command per module, under launch/commands/ for the two that
drive the launchers (run, rehearse) and under pretrain/commands/ for the rest. It sits here, in the top layer, because
it reaches both packages, and pretrain/ never imports launch/.

Each command module defines `add_arguments(parser)` and `main(args) -> int`, and imports torch, DeepSpeed and the like
inside `main`, so `pretrain --help` stays fast.
"""
import argparse
import importlib
import sys

# (command, module, one-line help). Nested groups ("data check") are their own tables in their modules.
COMMANDS = [
    ("run", "launch.commands.run", "run a stage config or a schedule, locally or on SLURM; resumes from run_dir"),
    ("rehearse", "launch.commands.rehearse", "rehearse a schedule on its real data, model shrunk, before a cluster"),
    ("consolidate", "pretrain.commands.consolidate", "turn a DeepSpeed checkpoint into fp16/bf16/fp32 weights"),
    ("export", "pretrain.commands.export", "export consolidated weights to another format (export onnx)"),
    ("estimate-memory", "pretrain.commands.estimate_memory", "per-GPU memory of a stage config at a given scale"),
    ("data", "pretrain.commands.data", "inspect webdataset shards (data check)"),
    ("shards", "pretrain.commands.shards", "build webdataset shards (shards make)"),
]


DESCRIPTION = "Pretrain InternImage vision foundation models: image-text pretraining and classification fine-tuning " \
              "on DeepSpeed ZeRO-3, locally or on SLURM."
EXAMPLES = """examples:
  pretrain run configs/schedules/demo.yaml --launcher local --nproc 2        # the demo (make demo)
  pretrain rehearse configs/schedules/internimage_h.yaml                    # before booking the cluster
  pretrain run configs/schedules/internimage_h.yaml --launcher slurm --partition gpu --account proj
  pretrain run configs/demo/pretrain.yaml --launcher local --nproc 2 max_steps=8 run_dir=runs/try
  pretrain estimate-memory configs/internimage_h/in1k_640.yaml --nodes 4 --gpus-per-node 8
  pretrain consolidate runs/demo/finetune/checkpoints --out export/ --dtype fp16
  pretrain export onnx export/ --out internimage.onnx
  pretrain shards make --demo data/demo
  pretrain data check 'data/demo/image-text/train/{00000..00007}.tar' --format image-text

Re-running a `run` command on the same run_dir resumes it. `pretrain COMMAND --help` describes each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(importlib.import_module(args._module).main(args))
