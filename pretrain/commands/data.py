"""`pretrain data check SHARDS --format ...`: one pass over shards; prints one JSON line of counts."""
from pretrain.data.config import SAMPLE_FORMATS


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = sub.add_parser("check", help="iterate the whole pipeline once and count good and skipped samples",
                           description="Iterate the shards once through the pipeline; print one JSON line with "
                                       "samples, skipped and skipped_by_reason. Exit 1 if a shard cannot be read or "
                                       "no sample survives, 2 if the shards cannot be listed.")
    check.add_argument("shards", help="brace pattern, '::'-joined list or pipe: URL of tar shards")
    check.add_argument("--format", choices=SAMPLE_FORMATS, required=True, help="the sample format the shards hold")
    check.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    check.add_argument("--batch-size", type=int, default=64)
    check.add_argument("--image-size", type=int, default=224)
    limits = check.add_argument_group("limits", "data.limits of the stage configs; unset: the same defaults")
    limits.add_argument("--member-bytes", type=int, help="largest tar member read (bytes)")
    limits.add_argument("--image-pixels", type=int, help="largest image decoded (width x height)")
    limits.add_argument("--caption-chars", type=int, help="captions are cut to this many characters")


def main(args) -> int:
    import json

    from pretrain.data.check import check_shards, is_healthy

    limits = {key: getattr(args, key) for key in ("member_bytes", "image_pixels", "caption_chars")
              if getattr(args, key) is not None}
    try:
        report = check_shards(args.shards, args.format, workers=args.workers, batch_size=args.batch_size,
                              image_size=args.image_size, limits=limits)
    except (FileNotFoundError, ValueError) as error:
        print(json.dumps({"error": str(error), "samples": 0, "skipped": 0, "skipped_by_reason": {}}))
        return 2
    print(json.dumps(report))
    return 0 if is_healthy(report) else 1
