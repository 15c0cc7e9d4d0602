"""One rank of a stage under torchrun; prints the stage's return value as JSON on rank 0 and records its pid.

DataLoader workers start from a forkserver, and multiprocessing re-runs the main script's top level in each of them
(as __mp_main__): hence the guard, and the imports inside main(), which keep a worker start cheap."""
import json
import os
import sys
from pathlib import Path


def main():
    from pretrain.config import load_stage_config
    from pretrain.engine import run_stage

    config, overrides = sys.argv[1], sys.argv[2:]
    pids = Path(load_stage_config(config, overrides).run_dir) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    result = run_stage(config, overrides)
    if os.environ["RANK"] == "0":
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
