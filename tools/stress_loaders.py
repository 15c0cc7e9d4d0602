"""Start the training and evaluation loaders again and again the way a rank does, and count the starts that hang.

A rank starts DataLoader workers (a training loader every epoch, an evaluation loader every evaluation) while gloo,
DeepSpeed and TensorBoard threads run; on CPython before 3.12 a worker forked at the wrong moment hangs for ever
(gh-112275). Here a gloo process group, a ZeRO-3 DeepSpeed engine (one step taken) and an open TensorBoard writer are
alive, and each start pulls one batch under a deadline: a start that misses it has its workers killed, is counted as a
hang, and the run goes on. The loaders are the project's own, on the demo data of the stage config.

    python tools/stress_loaders.py --starts 500                              # workers as the loaders start them
    python tools/stress_loaders.py --starts 500 --start-method fork          # the old path, for comparison
    python tools/stress_loaders.py --starts 500 --start-method fork --churn 2   # ... with native threads entering
    python tools/stress_loaders.py --starts 200 --start-method both          # start-up cost, the two alternating
    torchrun --nproc-per-node 2 tools/stress_loaders.py --starts 250         # two ranks

`--churn N` adds N threads that keep starting native threads which each call into Python once, as callbacks from C++
threads do: each makes and drops a thread state under the interpreter's HEAD_LOCK without holding the GIL, which is
what a fork needs to catch to hang, made frequent. Prints one JSON line (rank 0): starts, hangs, start-up seconds.
Not part of the test suite. Heavy imports stay inside functions: a worker re-runs this file's top level (as
multiprocessing does for a script's __main__), so that is kept cheap.
"""
import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from launch.rendezvous import free_port

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=500, help="starts of each loader (per rank)")
    parser.add_argument("--config", default=str(REPO / "configs/demo/pretrain.yaml"), help="stage config")
    parser.add_argument("--workers", type=int, help="data.workers (default: the config's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a start may take before it is a hang")
    parser.add_argument("--start-method", choices=("forkserver", "fork", "both"), default="forkserver",
                        help="fork: how workers were started before (the rank forks itself); both: alternate")
    parser.add_argument("--churn", type=int, default=0, help="threads starting native threads that enter Python")
    return parser.parse_args()


def rank_threads(run_dir: str):
    """gloo, a ZeRO-3 engine that has taken a step, and a TensorBoard writer: the threads a rank has running."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.utils.tensorboard import SummaryWriter

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(free_port()))):
        os.environ.setdefault(key, value)  # torchrun sets them for two ranks
    deepspeed.init_distributed("gloo", verbose=False)
    world = argparse.Namespace(rank=dist.get_rank(), size=dist.get_world_size())
    model = torch.nn.Linear(16, 16)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    engine.backward(engine(torch.randn(1, 16)).sum())
    engine.step()
    writer = SummaryWriter(os.path.join(run_dir, f"rank{world.rank}"))
    writer.add_scalar("stress/start", 0, 0)
    return world, engine, writer


def start_native_churn(threads: int) -> None:
    libc = ctypes.CDLL(None)
    entry = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    libc.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p, entry, ctypes.c_void_p]
    libc.pthread_join.argtypes = [ctypes.c_ulong, ctypes.c_void_p]
    enter_python = entry(lambda _: None)  # ctypes takes the GIL for it through PyGILState_Ensure

    def churn():
        thread = ctypes.c_ulong()
        while True:
            libc.pthread_create(ctypes.byref(thread), None, enter_python, None)
            libc.pthread_join(thread, None)

    for _ in range(threads):
        threading.Thread(target=churn, daemon=True, name="native-churn").start()


@contextlib.contextmanager
def deadline(seconds: float):
    """Kill this process's worker processes if the block runs past `seconds`, so a hung start fails, not blocks."""
    expired = threading.Event()

    def expire():
        expired.set()
        for child in multiprocessing.active_children():
            child.kill()

    timer = threading.Timer(seconds, expire)
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()


def timed_start(pull, seconds: float) -> float | None:
    """Seconds `pull` took to bring its first batch, or None if it hung."""
    with deadline(seconds) as expired:
        start = time.perf_counter()
        try:
            pull()
        except RuntimeError:  # the DataLoader's report of the killed workers
            if not expired.is_set():
                raise
            return None
        return time.perf_counter() - start


def loader_starts(cfg, world):
    """Two callables, each starting a loader and pulling one batch. The training loader is one TrainLoader whose
    iteration is begun anew each time, as an epoch begins (fresh workers, resumed from its position)."""
    import dataclasses

    from pretrain.data import build_eval_loader, build_train_loader

    train = build_train_loader(cfg.data, rank=world.rank, world_size=world.size, batch_size=cfg.batch_size,
                               seed=cfg.seed)
    eval_data = dataclasses.replace(cfg.data, format="classification")  # as the trainer's zero-shot evaluation

    def pull_train():
        batches = iter(train)
        next(batches)
        batches.close()

    def pull_eval():
        batches = iter(build_eval_loader(eval_data, rank=world.rank, world_size=world.size,
                                         batch_size=cfg.batch_size))
        next(batches)
        del batches  # shuts its workers down

    return {"train": pull_train, "eval": pull_eval}


def summary(seconds: list[float]) -> dict:
    """Over the starts in the order they came; the first one alone too (it starts the forkserver)."""
    if not seconds:
        return {}
    ordered = sorted(seconds)
    return {"mean_s": round(statistics.fmean(ordered), 4), "p50_s": round(ordered[len(ordered) // 2], 4),
            "p99_s": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
            "first_s": round(seconds[0], 4)}


def worker_contexts(loader, start_method: str) -> dict:
    """By start method, what loader.worker_context is to return: its own forkserver, or the rank forking itself."""
    contexts = {"forkserver": loader.worker_context, "fork": lambda: multiprocessing.get_context("fork")}
    return {method: contexts[method] for method in (contexts if start_method == "both" else (start_method,))}


def run(args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from tqdm import tqdm

    from pretrain.config import load_stage_config
    from pretrain.data import loader

    contexts = worker_contexts(loader, args.start_method)
    overrides = [f"data.workers={args.workers}"] if args.workers is not None else []
    cfg = load_stage_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        world, _engine, writer = rank_threads(run_dir)
        start_native_churn(args.churn)
        starts = loader_starts(cfg, world)
        keys = [f"{method} {kind}" for method in contexts for kind in starts]
        seconds, hangs = {key: [] for key in keys}, {key: 0 for key in keys}
        threads = len(os.listdir("/proc/self/task"))
        for i in tqdm(range(args.starts), disable=world.rank != 0, desc=f"{args.start_method} starts"):
            for method, context in contexts.items():
                loader.worker_context = context
                for kind, pull in starts.items():
                    took = timed_start(pull, args.timeout)
                    if took is None:
                        hangs[f"{method} {kind}"] += 1
                    else:
                        seconds[f"{method} {kind}"].append(took)
            writer.add_scalar("stress/start", i + 1, i + 1)
        writer.close()
        gathered = [None] * world.size
        dist.all_gather_object(gathered, {"seconds": seconds, "hangs": hangs, "threads": threads})
    return report(args, cfg, gathered)


def report(args: argparse.Namespace, cfg, ranks: list[dict]) -> dict:
    keys = ranks[0]["seconds"]
    return {
        "start_method": args.start_method, "ranks": len(ranks), "workers": cfg.data.workers, "churn": args.churn,
        "starts": {key: args.starts * len(ranks) for key in keys},
        "hangs": {key: sum(r["hangs"][key] for r in ranks) for key in keys},
        "start_up": {key: summary([s for r in ranks for s in r["seconds"][key]]) for key in keys},
        "threads_per_rank": [r["threads"] for r in ranks], "timeout_s": args.timeout,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }


def main() -> None:
    args = parse_args()
    result = run(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
