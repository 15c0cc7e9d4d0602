"""The universal conversion (pretrain/engine/universal.py) SIGKILLing itself part-way, as the OOM killer or a kill -9
would: `killed_conversion.py extract|merge ARGS...`, ARGS those of universal.py. Its workers run in this process (one
of each kind), so the kill is the converting process's.
  extract: at rank 1's second fragment, once rank 0's shard is extracted (and marked) and one fragment of rank 1's is.
  merge:   at the second parameter's merge, once the first one's is merged (and marked)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from deepspeed.checkpoint import ds_to_universal  # noqa: E402

from pretrain.engine import universal  # noqa: E402


def killed_at_call(function, nth, counted=lambda *args: True):
    """`function`, but the process SIGKILLs itself at the `nth` call that `counted` counts, before it runs."""
    calls = 0

    def killing(*args):
        nonlocal calls
        calls += counted(*args)
        if calls == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args)

    return killing


def main():
    point = sys.argv.pop(1)
    if point == "extract":  # dump_param_fragment(dir, tp_index, dp_index, state, tensor, name, offset, numel)
        ds_to_universal.dump_param_fragment = killed_at_call(ds_to_universal.dump_param_fragment, 2,
                                                             lambda folder, tp, dp, *rest: dp == 1)
    else:
        ds_to_universal.merge_zero3_slices = killed_at_call(ds_to_universal.merge_zero3_slices, 2)
    sys.argv += ["--num_extract_workers", "1", "--num_merge_workers", "1"]
    universal.main()


if __name__ == "__main__":
    main()
