"""`python -m pretrain.engine.universal --input_folder CKPT/step00000800 --output_folder OUT`: DeepSpeed's own
ds_to_universal conversion, with every checkpoint file loaded weights-only (see safe_loading.py).

It runs in a process of its own, started by rank 0, because the conversion forks a pool of worker processes: forking is
only safe while no other Python thread exists (CPython gh-112275: a child forked while another thread holds the
interpreter's thread-state lock hangs), so tqdm's monitor thread, the one thread the conversion would start, is off.
The forked workers inherit the weights-only switch and the allowlist.
"""
import sys
import threading

import tqdm
from deepspeed.checkpoint import ds_to_universal

from pretrain.engine.safe_loading import UnsafeCheckpointError, weights_only_loads


def main():
    tqdm.tqdm.monitor_interval = 0
    args = ds_to_universal.parse_arguments()
    if threading.active_count() != 1:
        raise RuntimeError(f"{threading.enumerate()} are running; forking the conversion workers could hang")
    try:
        with weights_only_loads(args.input_folder):
            ds_to_universal.main(args)
    except UnsafeCheckpointError as error:
        sys.exit(f"UnsafeCheckpointError: {error}")  # the message, not a traceback: the rank reports it


if __name__ == "__main__":
    main()
