"""One rank of a stage under torchrun; prints the stage's return value as JSON on rank 0 and records its pid. With
PRETRAIN_FAULT set, a fault is injected into the engine (tests/fault_engine.py).

DataLoader workers start from a forkserver, and multiprocessing re-runs the main script's top level in each of them
(as __mp_main__): hence the guard, and the imports inside main(), which keep a worker start cheap."""
import json
import os
import sys
from pathlib import Path


def main():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fault_engine import run_stage  # the real engine; with a fault injected when PRETRAIN_FAULT is set

    config, overrides = sys.argv[1], sys.argv[2:]
    result = run_stage(config, overrides)
    if os.environ["RANK"] == "0":
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
