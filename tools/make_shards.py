"""Write webdataset shards; the same code as `pretrain shards make` (run with the package installed: pip install -e .).

    python tools/make_shards.py --from-folder imagenet/train out/train --samples-per-shard 5000
    python tools/make_shards.py --from-table captions.csv out/cc --samples-per-shard 10000
    python tools/make_shards.py --demo data/demo
"""
import argparse
import sys

from pretrain.commands import shards

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shards.add_make_arguments(parser)
    sys.exit(shards.main(parser.parse_args()))
