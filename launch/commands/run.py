"""`pretrain run SCHEDULE_OR_STAGE --launcher local|slurm [options] [key=value ...]`.

A schedule YAML (with a `stages:` list) runs its stages in order into RUN_DIR/<stage>/, each starting from the previous
stage's exported backbone; any other YAML is one stage config. Re-running the same command resumes: finished stages
are skipped and an unfinished one resumes from its run_dir. Every stage's config, and the launcher's options, are
checked here before any rank starts.
"""
from __future__ import annotations

import argparse

from pretrain.commands.overrides import accept_late_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from launch import launchers

    parser.add_argument("source", metavar="SCHEDULE_OR_STAGE", help="a schedule YAML (with `stages:`) or a stage config")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides for every stage (max_steps=8 checkpoint.every=4 seed=3); "
                             "STAGE:KEY=VALUE for one stage; run_dir=DIR names the run directory")
    parser.add_argument("--launcher", choices=sorted(launchers()), default="local")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (rank commands, sbatch scripts) and the resolved configs")
    for name, launcher in launchers().items():
        launcher.add_arguments(parser.add_argument_group(f"--launcher {name}: {launcher.description}"))
    parser.add_argument("--engine", default="pretrain.engine", help=argparse.SUPPRESS)  # test seam
    accept_late_overrides(parser)


def _check(plan, engine_name: str, dry_run: bool) -> dict:
    """Every stage's config, validated in this process: the engine's check_config (values, unknown keys, the files
    they name) where the engine has one, else the raw YAML with its overrides. A dry run shows the plan even where files
    are missing (a login node may not see the data), naming each on stderr."""
    import importlib
    import sys

    from launch.schedule import resolved_config
    from pretrain.config import MissingFile

    check = getattr(importlib.import_module(engine_name), "check_config", None)
    configs = {}
    for stage in plan.stages:
        try:
            if check is None:
                configs[stage.name] = resolved_config(stage, validate=False)
            else:
                configs[stage.name] = check(stage.config, stage.overrides, stage.pretrained_from is not None)
        except MissingFile as error:
            if not dry_run:
                raise ValueError(f"stage {stage.name!r} ({stage.config}): {error}") from None
            print(f"pretrain run: warning: stage {stage.name!r}: {error} (a real run stops here)", file=sys.stderr)
            configs[stage.name] = error.config
        except (OSError, ValueError) as error:
            raise ValueError(f"stage {stage.name!r} ({stage.config}): {error}") from None
    return configs


def _batch_and_schedule(stage, cfg, ranks: int) -> str:
    """What a practitioner checks before queueing a stage; a global batch the ranks do not give stops it here, not
    after a wait in the queue."""
    from pretrain.engine.optim import global_batch, peak_lr

    try:
        batch = global_batch(cfg, ranks)
    except ValueError as error:
        raise ValueError(f"stage {stage.name!r} on {ranks} ranks: {error}") from None
    optim = cfg.optim
    return (f"stage {stage.name}: {ranks} ranks x batch {cfg.batch_size} x accumulation {optim.grad_accumulation} = "
            f"global batch {batch:,}; {cfg.max_steps:,} steps ({cfg.max_steps * batch:,} samples){_scaled(cfg)}; "
            f"peak lr {peak_lr(cfg, ranks):.3g} (optim.lr {optim.lr:g} per {optim.lr_batch}), "
            f"warm-up {optim.warmup_steps:,} steps, min lr {optim.min_lr:g}")


def _scaled(cfg) -> str:
    """Says so when max_steps replaced the epoch count and the epoch-based schedule was scaled to it."""
    if cfg.epochs is None or cfg.max_steps == round(cfg.epochs * (cfg.data.samples_per_epoch // cfg.global_batch)):
        return ""
    return f" = {cfg.epochs:g} epochs scaled to max_steps, warm-up with them"


def _print_configs(plan, configs: dict) -> None:
    import yaml

    for stage in plan.stages:
        print(f"# ---- stage {stage.name}: {stage.config}")
        print(f"# overrides: {' '.join(stage.overrides)}")
        config = configs[stage.name]
        print(yaml.safe_dump(config if isinstance(config, dict) else config.to_dict(), sort_keys=False).rstrip())


def main(args: argparse.Namespace) -> int:
    import sys

    from launch import launchers
    from launch.schedule import build_plan

    launcher = launchers()[args.launcher](args, log=lambda message: print(message, flush=True))
    try:
        plan = build_plan(args.source, args.overrides)
        configs = _check(plan, args.engine, args.dry_run)
        launcher.check(plan)
        summaries = [_batch_and_schedule(stage, configs[stage.name], launcher.ranks(stage))
                     for stage in plan.stages if not isinstance(configs[stage.name], dict)]
    except (OSError, ValueError) as error:
        print(f"pretrain run: {error}", file=sys.stderr)
        return 2
    kind = "schedule" if plan.is_schedule else "stage"
    print(f"{kind} {plan.source}: {' -> '.join(s.name for s in plan.stages)}; run_dir {plan.run_dir}", flush=True)
    for line in summaries:
        print(line, flush=True)
    if args.dry_run:
        print(launcher.dry_run(plan))
        _print_configs(plan, configs)
        return 0
    return launcher.run(plan)
