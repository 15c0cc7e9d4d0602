"""`pretrain run SCHEDULE_OR_STAGE --launcher local|slurm [options] [key=value ...]`.

A schedule YAML (with a `stages:` list) runs its stages in order into RUN_DIR/<stage>/, each starting from the previous
stage's exported backbone; any other YAML is one stage config. Re-running the same command resumes: finished stages
are skipped and an unfinished one resumes from its run_dir.
"""
from __future__ import annotations

import argparse
import types


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SCHEDULE_OR_STAGE", help="a schedule YAML (with `stages:`) or a stage config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides for every stage (max_steps=8 checkpoint.every=4 seed=3); "
                             "STAGE:KEY=VALUE for one stage; run_dir=DIR names the run directory")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--nproc", type=int, default=1, help="local: rank processes per stage (default 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved configs (and, for slurm, the sbatch scripts) without running")
    slurm = parser.add_argument_group("slurm (override a stage's `slurm:` block in the schedule)")
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--tasks-per-node", type=int, help="ranks per node: one per GPU (or per CPU rank)")
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--mem-gb", type=float)
    slurm.add_argument("--time", type=int, dest="time_min", metavar="MIN", help="time limit per job, minutes")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--signal-delay-s", type=int,
                       help="seconds before the time limit at which ranks save and the job requeues (default 90)")
    slurm.add_argument("--submitit-dir", help="submitit's folder (default RUN_DIR/submitit/<timestamp>/%%j)")
    slurm.add_argument("--no-wait", action="store_true", help="print the job ids and return once queued")
    slurm.add_argument("--wait-timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--engine", default="pretrain.engine", help=argparse.SUPPRESS)  # test seam
    # Overrides may come after options (`run demo.yaml --launcher slurm max_steps=8`): argparse leaves such trailing
    # positionals unrecognised, so collect every leftover KEY=VALUE into `overrides`.
    parser.parse_known_args = types.MethodType(_parse_known_args, parser)


def _parse_known_args(self, args=None, namespace=None):
    namespace, extras = argparse.ArgumentParser.parse_known_args(self, args, namespace)
    late = [a for a in extras if "=" in a and not a.startswith("-")]
    namespace.overrides = list(getattr(namespace, "overrides", None) or []) + late
    return namespace, [a for a in extras if a not in late]


def _check(plan, engine_name: str, slurm_options=None) -> dict:
    """Every stage's resolved config, validated in this process before any rank starts: the engine's check_config
    (values, unknown keys, the files they name) where the engine has one, and the SLURM options for each stage."""
    import importlib

    from launch.schedule import resolved_config

    check = getattr(importlib.import_module(engine_name), "check_config", None)
    configs = {}
    for stage in plan.stages:
        try:
            if check is None:
                configs[stage.name] = resolved_config(stage, validate=False)
            else:
                configs[stage.name] = check(stage.config, stage.overrides, stage.pretrained_from is not None).to_dict()
            if slurm_options is not None:
                slurm_options.for_stage(stage)
        except (OSError, ValueError) as error:
            raise ValueError(f"stage {stage.name!r} ({stage.config}): {error}") from None
    return configs


def _print_configs(plan, configs: dict) -> None:
    import yaml

    for stage in plan.stages:
        print(f"# ---- stage {stage.name}: {stage.config}")
        print(f"# overrides: {' '.join(stage.overrides)}")
        print(yaml.safe_dump(configs[stage.name], sort_keys=False).rstrip())


def main(args: argparse.Namespace) -> int:
    import sys

    from launch.schedule import build_plan

    options = None
    if args.launcher == "slurm":
        from launch import slurm

        options = slurm.SlurmOptions(
            nodes=args.nodes, tasks_per_node=args.tasks_per_node, gpus_per_node=args.gpus_per_node,
            cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min, partition=args.partition,
            account=args.account, qos=args.qos, constraint=args.constraint, signal_delay_s=args.signal_delay_s,
            folder=args.submitit_dir,
        )
    try:
        plan = build_plan(args.source, args.overrides)
        configs = _check(plan, args.engine, options)
    except (OSError, ValueError) as error:
        print(f"pretrain run: {error}", file=sys.stderr)
        return 2
    kind = "schedule" if plan.is_schedule else "stage"
    print(f"{kind} {plan.source}: {' -> '.join(s.name for s in plan.stages)}; run_dir {plan.run_dir}", flush=True)

    if args.launcher == "local":
        from launch import local

        if args.dry_run:
            for stage in plan.stages:
                print(f"# {stage.name}: {args.nproc} x " + " ".join(local.rank_command(stage, args.engine)))
            _print_configs(plan, configs)
            return 0
        return local.run_plan(plan, args.nproc, args.engine, log=lambda m: print(m, flush=True))

    if args.dry_run:
        prev = None
        for stage in plan.stages:
            dependency = f"afterok:<job id of {prev}>" if prev else None
            print(f"# ---- sbatch script for stage {stage.name}")
            print(slurm.sbatch_script(plan, stage, options, dependency).rstrip())
            prev = stage.name
        _print_configs(plan, configs)
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    submitted = slurm.submit(plan, options, args.engine, log=log)
    if not submitted:
        log("nothing to submit: every stage has completed")
        return 0
    if args.no_wait:
        print(" ".join(s.job_id for s in submitted))
        return 0
    try:
        return slurm.wait(plan, submitted, log=log, timeout_s=args.wait_timeout)
    except KeyboardInterrupt:
        log(f"stopped waiting; the jobs stay queued: {' '.join(s.job_id for s in submitted)} (scancel them to stop)")
        return 130
