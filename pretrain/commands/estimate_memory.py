"""`pretrain estimate-memory CONFIG --nodes N --gpus-per-node G [overrides]`."""
from pretrain.commands.overrides import accept_late_overrides


def add_arguments(parser):
    parser.add_argument("config", help="a stage config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch_size=16 zero.stage=3")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, to report the headroom")
    accept_late_overrides(parser)


def main(args) -> int:
    import json
    import sys

    from pretrain.engine.config_checks import load_config
    from pretrain.engine.memory import GIB, estimate

    try:
        if args.nodes <= 0 or args.gpus_per_node <= 0:
            raise ValueError(f"--nodes and --gpus-per-node must be > 0, got {args.nodes} and {args.gpus_per_node}")
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError) as error:
        print(f"pretrain estimate-memory: {error}", file=sys.stderr)
        return 2
    devices = args.nodes * args.gpus_per_node
    result = estimate(cfg, devices)
    checkpointing = cfg.model.activation_checkpointing
    total = result.total(checkpointing) / GIB
    report = {"model": cfg.model.name, "devices": devices, "zero_stage": cfg.zero.stage, "precision": cfg.precision,
              "micro_batch": cfg.batch_size, "image_size": cfg.data.image_size,
              "activation_checkpointing": checkpointing, "per_device_gib": result.as_gib(),
              "total_gib": round(total, 2), "fits": total <= args.gpu_memory_gb}
    print(json.dumps(report, indent=2))
    return 0 if report["fits"] else 1
