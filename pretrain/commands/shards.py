"""`pretrain shards make`: write webdataset shards (and sizes.json) from an image folder, a table, or the demo set."""


def add_make_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folder", metavar="DIR", help="classification shards: one class per sub-folder")
    source.add_argument("--from-table", metavar="FILE", help="image-text shards from a .csv/.parquet of path,caption")
    source.add_argument("--demo", action="store_true", help="the scikit-learn digits demo (both tasks, train/val)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=32, help="demo images are upscaled to this size")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    add_make_arguments(sub.add_parser("make", help="write shards and sizes.json", description=__doc__))


def main(args) -> int:
    import json
    import os

    from pretrain.data import make
    from pretrain.data.demo import ensure_demo_shards
    from pretrain.data.writer import write_shards

    if args.demo:
        result = ensure_demo_shards(args.out, args.image_size)
    elif args.from_folder:
        classes = make.folder_classes(args.from_folder)
        pattern = write_shards(make.folder_samples(args.from_folder, classes), args.out, args.samples_per_shard)
        with open(os.path.join(args.out, "classes.json"), "w") as f:
            json.dump(classes, f, indent=0)
        result = {"shards": pattern, "classes": classes}
    else:
        result = {"shards": write_shards(make.table_samples(args.from_table), args.out, args.samples_per_shard)}
    print(json.dumps(result))
    return 0
