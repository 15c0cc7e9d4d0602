"""The AdamW step on the tensors ZeRO-3 hands the optimizer: torch's AdamW (for-each and fused) against DeepSpeed's
CPU Adam (the optimizer ZeRO-Offload uses by default, a C++ op DeepSpeed compiles at the first run) and, with
--device cuda, DeepSpeed's FusedAdam (JIT-compiled with nvcc) and apex's FusedAdam where apex is installed.

ZeRO-3 steps each rank's flat fp32 partition in sub-groups (zero.sub_group_size elements), so the benchmark steps
flat fp32 tensors of that size holding --params elements in all: InternImage-H's 1.08e9 over 64 ranks is ~1.7e7 a
rank. Prints ms per step (median of --repeats after a warm-up step); --json writes the result to a file.

    python tools/bench_optimizer.py --params 2e7 --sub-group 1e7            # CPU: what ZeRO-Offload steps
    python tools/bench_optimizer.py --params 1.7e7 --sub-group 1e8 --device cuda
"""
import argparse
import json
import statistics
import time

import torch

SETTINGS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)


def partitions(total: int, sub_group: int, device: str) -> list[torch.Tensor]:
    sizes = [sub_group] * (total // sub_group) + ([total % sub_group] if total % sub_group else [])
    params = [torch.nn.Parameter(torch.randn(size, device=device)) for size in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def candidates(device: str) -> dict:
    """name -> a function building the optimizer for a list of parameters; the ones that cannot be built are left
    out with the reason printed."""
    found = {"torch AdamW (for-each)": lambda ps: torch.optim.AdamW(ps, foreach=True, **SETTINGS),
             "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, fused=True, **SETTINGS)}
    if device == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        found["DeepSpeed CPUAdam"] = lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **SETTINGS)
    else:
        from deepspeed.ops.adam import FusedAdam
        found["DeepSpeed FusedAdam"] = lambda ps: FusedAdam(ps, adam_w_mode=True, **SETTINGS)
        try:
            from apex.optimizers import FusedAdam as ApexFusedAdam
            found["apex FusedAdam"] = lambda ps: ApexFusedAdam(ps, adam_w_mode=True, **SETTINGS)
        except ImportError as error:
            print(f"apex FusedAdam: not installed ({error})")
    return found


def time_steps(optimizer, device: str, repeats: int) -> list[float]:
    optimizer.step()  # the first step allocates the moments (and builds a JIT op)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2e7, help="fp32 elements stepped in all (one rank's share)")
    parser.add_argument("--sub-group", type=float, default=1e7, help="elements per tensor (zero.sub_group_size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="where to write the result")
    args = parser.parse_args()
    results = {"params": int(args.params), "sub_group": int(args.sub_group), "device": args.device,
               "threads": torch.get_num_threads(), "ms_per_step": {}}
    for name, build in candidates(args.device).items():
        start = time.perf_counter()
        optimizer = build(partitions(int(args.params), int(args.sub_group), args.device))
        built_s = time.perf_counter() - start
        times = time_steps(optimizer, args.device, args.repeats)
        results["ms_per_step"][name] = statistics.median(times)
        print(f"{name:24s} {statistics.median(times):9.1f} ms/step (runs {', '.join(f'{t:.1f}' for t in times)}; "
              f"built in {built_s:.1f} s)")
        del optimizer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
