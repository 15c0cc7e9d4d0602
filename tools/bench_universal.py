"""Seconds of the universal conversion (pretrain/engine/checkpoint.py, convert_to_universal) of a checkpoint saved on 2
ranks, and its size: `python tools/bench_universal.py --model internimage_t`.

It trains the demo's image-text stage for one step with the named backbone (2 CPU ranks, ZeRO-3, the local launcher)
to get a checkpoint, then converts it as a resume on another number of ranks would, before any process group exists.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pretrain.engine.checkpoint import convert_to_universal, newest_complete, read_manifest  # noqa: E402
from pretrain.engine.safe_loading import load_file  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "launch", "run", str(REPO / "configs/demo/pretrain.yaml"),
                        "--launcher", "local", "--nproc", "2", f"run_dir={run_dir}", f"model.name={args.model}",
                        "model.args={}", f"data.image_size={args.image_size}", "max_steps=1", "batch_size=4",
                        "optim.warmup_steps=0", "logging.every=1", "logging.progress_bar=false",
                        "data.workers=0", f"data.demo_root={REPO / 'data/demo'}"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        directory = run_dir / "checkpoints"
        tag = newest_complete(directory)
        size = sum(read_manifest(directory / tag)["files"].values())
        shapes = load_file(directory / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")["param_shapes"]
        params = sum(shape.numel() for group in shapes for shape in group.values())
        start = time.perf_counter()
        convert_to_universal(directory, tag, world_size=1)
        seconds = time.perf_counter() - start
        load = os.getloadavg()[1]  # the machine is shared: the 5-minute load says what else ran meanwhile
        print(f"{args.model}: checkpoint of {params / 1e6:.0f}M parameters (the text tower's included), "
              f"{size / 2**30:.2f} GiB (2 ranks), converted in {seconds:.1f} s "
              f"({size / 2**20 / seconds:.0f} MiB/s), 5-minute load average {load:.1f} at the end")


if __name__ == "__main__":
    main()
