"""`python -m pretrain.engine.universal --input_folder CKPT/step00000800 --output_folder OUT`: DeepSpeed's own
ds_to_universal conversion, with every checkpoint file loaded weights-only (see safe_loading.py), resumable after a
kill.

Resuming. A ZeRO-3 checkpoint is converted in ds_to_universal's phases, called one by one, each made of units: the
extraction of one rank's optimizer shard into per-parameter fragment files (a unit per shard file), the merge of one
parameter's fragments (a unit per parameter), the common optimizer state, the copy of the model-state files. A unit's
marker, OUT/progress/NAME, is written only once the unit's files are complete and durable (syncfs), so a rerun into the
same OUT skips every marked unit and redoes one that a kill cut off (its files are written again, whole).
OUT/progress/source.json lists the input's files (size, mtime): an OUT left by the conversion of anything else is
discarded first. Calling the phases one by one uses ds_to_universal's private functions; tests/test_universal_resume.py
pins them (the result must equal its main()'s, tensor by tensor). Checkpoints of ZeRO stages 0-2 go through its main()
in one piece, from scratch at every attempt. Neither writes DeepSpeed's `latest_universal`: checkpoint.py names the
converted folder by its tag.

It runs in a process of its own, started by rank 0, because the conversion forks a pool of worker processes: forking is
only safe while no other Python thread exists (CPython gh-112275: a child forked while another thread holds the
interpreter's thread-state lock hangs), so tqdm's monitor thread, the one thread the conversion would start, is off.
The forked workers inherit the weights-only switch and the allowlist.
"""
import ctypes
import json
import os
import shutil
import sys
import threading
from functools import partial
from pathlib import Path

import torch
import tqdm
from deepspeed.checkpoint import ds_to_universal as ds

from pretrain.engine.safe_loading import UnsafeCheckpointError, weights_only_loads
from pretrain.fileio import atomic_write_json

PROGRESS = "progress"
SOURCE = "source.json"
LIBC = ctypes.CDLL(None, use_errno=True)


def main():
    tqdm.tqdm.monitor_interval = 0
    args = ds.parse_arguments()
    if threading.active_count() != 1:
        raise RuntimeError(f"{threading.enumerate()} are running; forking the conversion workers could hang")
    try:
        with weights_only_loads(args.input_folder):
            convert(args)
    except UnsafeCheckpointError as error:
        shutil.rmtree(args.output_folder, ignore_errors=True)  # nothing converted from a refused checkpoint is kept
        sys.exit(f"UnsafeCheckpointError: {error}")  # the message, not a traceback: the rank reports it


def convert(args):
    output = Path(args.output_folder)
    model_files = ds._get_zero3_model_state_files(args.input_folder)
    if torch.load(model_files[0], map_location="cpu")["ds_config"]["zero_optimization"]["stage"] < 3:
        shutil.rmtree(output, ignore_errors=True)
        ds.main(args)
        return
    progress = output / PROGRESS
    keep_only_from(output, source_files(Path(args.input_folder)))
    convert_zero3(args, model_files, progress)


def source_files(folder: Path) -> dict:
    """What identifies a checkpoint folder's content: each file's size and modification time."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}


def keep_only_from(output: Path, source: dict):
    """Keep what `output` holds only if it was converted from `source`; start it afresh otherwise."""
    record = output / PROGRESS / SOURCE
    if record.is_file() and json.loads(record.read_text()) == source:
        return
    shutil.rmtree(output, ignore_errors=True)
    (output / PROGRESS).mkdir(parents=True)
    atomic_write_json(record, source)


def convert_zero3(args, model_files, progress: Path):
    """ds_to_universal.main's ZeRO-3 path, without tensor parallelism or AutoEP (the project uses neither), each unit
    skipped when marked."""
    optim_files = ds._filter_zero3_optim_files(ds._get_optim_files(args.input_folder))
    param_shapes = ds._parse_model_states_stage3(model_files)
    _, tp_degree, dp_degree = ds._build_zero3_rank_grid(model_files)
    optim_files_grid, *_ = ds._build_zero3_rank_grid(optim_files)
    if tp_degree != 1:
        raise NotImplementedError(f"a checkpoint of {tp_degree} tensor-parallel ranks")
    temp_dir = os.path.join(args.output_folder, "tmp")
    zero_dir = os.path.join(args.output_folder, "zero")
    param_names = sorted(name for group in param_shapes for name in group)
    merges = [name for name in param_names if not is_done(progress, "merge." + name)]
    if merges:  # once every parameter is merged, the fragments are gone and need no extraction
        print("*** 1. Extracting ZeRO fragments")
        shards = [dp for dp in range(dp_degree) if not is_done(progress, f"extract.{dp}")]
        extract = partial(extract_shard, optim_files_grid, [param_shapes], dp_degree, temp_dir, progress)
        ds._do_parallel_work(extract, shards, args.num_extract_workers)
        print("*** 2. Merging slices .....")
        merge = partial(merge_parameter, dp_degree, zero_dir, temp_dir, progress)
        ds._do_parallel_work(merge, merges, args.num_merge_workers)
    if not is_done(progress, "optimizer_state"):
        print("*** 3. Saving common optimizer states")
        ds._save_optimizer_state_stage3(args, optim_files)
        mark_done(progress, "optimizer_state")
    if not args.keep_temp_folder:
        shutil.rmtree(temp_dir, ignore_errors=True)
    if not is_done(progress, "model_states"):
        for model_file in model_files:
            shutil.copy2(model_file, args.output_folder)
        mark_done(progress, "model_states")


def extract_shard(optim_files_grid, param_shapes_grid, dp_degree, temp_dir, progress: Path, dp_index: int):
    """DeepSpeed's extraction of rank `dp_index`'s optimizer shard into one file per parameter and state, marked."""
    ds.extract_zero_shards_stage3(optim_files_grid, param_shapes_grid, dp_degree, temp_dir, (0, dp_index))
    mark_done(progress, f"extract.{dp_index}")


def merge_parameter(dp_degree, zero_dir, temp_dir, progress: Path, name: str):
    """DeepSpeed's merge of one parameter's fragments into its fp32, exp_avg and exp_avg_sq files, marked."""
    ds.merge_zero3_slices(dp_degree, zero_dir, temp_dir, name)
    mark_done(progress, "merge." + name)


def is_done(progress: Path, unit: str) -> bool:
    return (progress / unit).is_file()


def mark_done(progress: Path, unit: str):
    """Make everything written so far durable, then mark `unit` done. The marker is an empty file, whole as soon as it
    exists; if a crash loses it, the unit is merely done again."""
    sync_filesystem(progress)
    (progress / unit).touch()


def sync_filesystem(path: Path):
    """syncfs(2) of the file system holding `path`: its written files and their directory entries made durable in one
    call, where an fsync per file would commit the file system's journal once per fragment (thousands a shard)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {path} failed")
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
