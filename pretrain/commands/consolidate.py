"""`pretrain consolidate CKPT_DIR --out DIR --dtype fp16|bf16|fp32 --weights live|ema`."""


def add_arguments(parser):
    parser.add_argument("checkpoint_dir", help="a run's checkpoints/ directory (DeepSpeed format)")
    parser.add_argument("--out", required=True, help="output directory for backbone.safetensors / backbone.pth")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--tag", help="checkpoint tag to export (default: the newest complete one)")
    parser.add_argument("--weights", choices=["live", "ema"], default="live",
                        help="the trained weights, or their EMA (runs with ema_decay; what eval.ema evaluates)")
    parser.add_argument("--full-model", action="store_true", help="also write model.safetensors with every weight")


def main(args) -> int:
    import json
    import sys

    from pretrain.engine.consolidate import consolidate
    from pretrain.engine.safe_loading import UnsafeCheckpointError

    try:
        written = consolidate(args.checkpoint_dir, args.out, args.dtype, tag=args.tag, full_model=args.full_model,
                              weights=args.weights)
    except (UnsafeCheckpointError, FileNotFoundError, RuntimeError) as error:
        print(f"pretrain consolidate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(written, indent=2))
    return 0
